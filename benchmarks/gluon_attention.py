#!/usr/bin/env python3
"""Gluon (triton.experimental.gluon, Triton 3.6) prototype of a block-sparse
attention forward for Hopper (sm_90) with FA3-style intra-warpgroup overlap.

Self-contained: imports only torch (lazily, GPU path only), triton and
triton.experimental.gluon.  Not part of the sparse_dit package.

Layout: q, k, v, o are (B, S, H, D) bf16 contiguous (diffusers layout).  The
kernel sees them as 2-D (B*S, H*D) views; one TMA box is [128 rows, 128 cols]
at row b*S + 128*blk and column h*D.  S must be a multiple of 128 so a box
never straddles two batches.

Sparsity: kv_idx int32 (B*H, NQ, MAXK) lists the key blocks (128 keys each)
that query block (bh, qb) visits, kv_cnt int32 (B*H, NQ) how many of them are
valid.  Every listed block is a full block (no masking inside a block).

Schedule per consumer warpgroup (one 128-query block per CTA, two consumer
warpgroups x 64 rows, see "Kernel" below):

    S_0 = Q K_0^T ; wait ; softmax(S_0) -> P_0 ; wait(K_1 landed)
    for j = 1 .. n-1:
        S_j  = Q K_j^T          (wgmma async, committed, not waited)
        O   += P_{j-1} V_{j-1}  (wgmma async, RS: P from registers)
        wgmma wait <= 1 outstanding               -> S_j ready
        softmax(S_j) in fp32 -> P_j, alpha_j      (runs under the PV wgmma)
        mbarrier wait K_{j+1} landed              (basic-block boundary, see below)
        wgmma wait 0 outstanding                  -> O ready
        P_j -> bf16 A-operand registers ; O *= alpha_j
        release the K_j, V_{j-1} ring slots to the producer (mbarrier arrive)
    O += P_{n-1} V_{n-1} ; wait ; O /= l ; TMA store

The ptxas trap (found in SASS while writing this): within one basic block
ptxas hoists `wgmma.wait_group 0` (SASS WARPGROUP.DEPBAR.LE gsb0, 0x0) up to
right after the row max, so the exp2s run *after* the PV wgmma retired, i.e.
no overlap, although the PTX order is right and ptxas prints no warning.
Putting the K_{j+1} mbarrier wait (a try_wait loop, hence a block boundary)
between the softmax and the wgmma wait pins the DEPBAR below the softmax:
`--compile-only` counts the MUFU.EX2 between DEPBAR 0x1 and DEPBAR 0x0 (66 =
64 exp2 of P + 2 of alpha per thread, i.e. the whole softmax).

Kernel: "pingpong" (gluon_attn_fwd_pp; FA3 inter-warpgroup overlap): a 1-warp
producer partition does the TMA loads, gated by k_empty/v_empty mbarriers;
each of the two consumer warpgroups is its own warp_specialize partition with
its own 64 query rows; they take turns issuing their GEMMs through two "turn"
mbarriers, release ring slots separately (empty barriers count 2), and share
no CTA-wide barrier inside the loop.  The earlier "simple" and "ws" variants
were removed after the 2026-12-03 H200 measurements (pingpong 590-643 TFLOP/s
against 476-520); their numbers are in benchmarks/results/kernel.md and their
design in benchmarks/gluon_attention_NOTES.md.

Usage:
    python3 benchmarks/gluon_attention.py --compile-only     # no GPU needed
    python3 benchmarks/gluon_attention.py --out OUTDIR       # H100/H200
"""
import argparse
import json
import math
import os
import re
import sys
import time
import traceback

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M = 128
BLOCK_N = 128
HEAD_D = 128
DEFAULT_STAGES = 2
PP_CONSUMER_REGS = gl.constexpr(232)  # setmaxnreg for the pingpong variant's second consumer WG

# ---------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """Online softmax (base 2, scale folded in) of one fp32 S tile.
    Returns P (fp32, still in the S accumulator layout), alpha, new m, new l.
    The bf16 conversion into the wgmma A-operand registers is done by the
    caller *after* the PV wait (see _to_a_operand)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _to_a_operand(p, p_layout: gl.constexpr):
    return gl.convert_layout(p.to(gl.bfloat16), p_layout)


# ---------------------------------------------------------------------------
# "pingpong" variant: 2 consumer warpgroups (own partitions, 64 query rows
# each) + 1 producer warp; inter-warpgroup ping-pong through mbarriers.
# ---------------------------------------------------------------------------


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,  #
              kv_idx_base, cnt, row0, col, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """Producer partition: streams K_i, V_i into ring slot i % STAGES.  The
    r-th (r >= 1) reuse of a slot waits for the consumers' r-th release of it
    (mbarrier phase parity (r - 1) & 1; the empty barriers count one arrive
    per consumer warpgroup)."""
    for i in range(cnt):
        s = i % STAGES
        r = i // STAGES
        blk = gl.load(kv_idx_base + i)
        row = row0 + blk * BLOCK_N
        mbarrier.wait(k_empty.index(s), (r - 1) & 1, pred=r > 0)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, col], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), (r - 1) & 1, pred=r > 0)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, col], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _pp_consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,  #
                 cnt, qk_scale, row_q, col, STAGES: gl.constexpr, WG: gl.constexpr):
    """One consumer warpgroup (4 warps) owning query rows [64*WG, 64*WG+64) of
    the CTA's 128-row block.  The intra-warpgroup schedule of the module
    docstring, plus a ping-pong handshake: the GEMM-issue batch number k of this WG
    (k = 0: S_0, k = j: S_j + PV_{j-1}, k = cnt: last PV) starts only after
    the other WG issued its batch k - 1 + WG, and is followed by an arrive on
    the other WG's turn barrier.  All barriers inside a partition
    (gl.thread_barrier, membar) are partition-local (128 threads)."""
    BLOCK_MW: gl.constexpr = q_desc.block_type.shape[0]  # 64
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    NW: gl.constexpr = gl.num_warps()  # 4
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    my_turn = turn.index(WG)
    other_turn = turn.index(1 - WG)
    qs = q_smem.index(WG)
    qb = q_bars.index(WG)
    row_w = row_q + WG * BLOCK_MW

    mbarrier.expect(qb, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row_w, col], qb, qs)

    zero_s = gl.zeros([BLOCK_MW, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_MW, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_MW], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_MW], gl.float32, row_layout)

    mbarrier.wait(qb, 0)
    mbarrier.wait(k_ready.index(0), 0)
    # batch 0: WG0 goes first (no wait), WG1 waits for WG0's batch 0.
    mbarrier.wait(my_turn, (WG - 1) & 1, pred=WG > 0)
    s = warpgroup_mma(qs, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(other_turn, count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    gl.thread_barrier()  # this warpgroup (partition-local) is done with K_0
    mbarrier.arrive(k_empty.index(0), count=1)
    p32, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    p = _to_a_operand(p32, p_layout)
    mbarrier.wait(k_ready.index(1 % STAGES), (1 // STAGES) & 1, pred=1 < cnt)

    for j in range(1, cnt):
        ks = j % STAGES
        vj = j - 1
        vs = vj % STAGES
        mbarrier.wait(v_ready.index(vs), (vj // STAGES) & 1)
        # batch j: wait for the other WG's batch j - 1 + WG
        kk = j - 1 + WG
        mbarrier.wait(my_turn, kk & 1)
        s = warpgroup_mma(qs, k_smem.index(ks).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(vs), acc, is_async=True)
        mbarrier.arrive(other_turn, count=1)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        p32, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
        jn = j + 1
        mbarrier.wait(k_ready.index(jn % STAGES), (jn // STAGES) & 1, pred=jn < cnt)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        p = _to_a_operand(p32, p_layout)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
        gl.thread_barrier()  # partition-local: this WG is done with K_j, V_{j-1}
        mbarrier.arrive(k_empty.index(ks), count=1)
        mbarrier.arrive(v_empty.index(vs), count=1)

    vj = cnt - 1
    vs = vj % STAGES
    mbarrier.wait(v_ready.index(vs), (vj // STAGES) & 1)
    kk = cnt - 1 + WG
    mbarrier.wait(my_turn, kk & 1)
    acc = warpgroup_mma(p, v_smem.index(vs), acc, is_async=True)
    mbarrier.arrive(other_turn, count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_layout), 1)

    gl.thread_barrier()
    qs.store(acc.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(o_desc, [row_w, col], qs)
    tma.store_wait(pendings=0)


@gluon.jit
def _pp_consumer0(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,  #
                  cnt, qk_scale, row_q, col, STAGES: gl.constexpr):
    _pp_consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,  #
                 cnt, qk_scale, row_q, col, STAGES, 0)


@gluon.jit
def _pp_consumer1(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,  #
                  cnt, qk_scale, row_q, col, STAGES: gl.constexpr):
    _pp_consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty, turn,  #
                 cnt, qk_scale, row_q, col, STAGES, 1)


@gluon.jit
def gluon_attn_fwd_pp(q_desc, k_desc, v_desc, o_desc,  #
                      kv_idx_ptr, kv_cnt_ptr,  #
                      qk_scale, S, H, NQ, MAXK,  #
                      STAGES: gl.constexpr):
    """num_warps must be 4: default partition = consumer WG0, worker 0 =
    consumer WG1 (4 warps), worker 1 = TMA producer (1 warp).  q_desc/o_desc
    have a [64, D] box; the CTA covers 2 x 64 = 128 query rows."""
    BLOCK_MW: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype

    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh - b * H
    row0 = b * S
    col = h * HEAD_D
    row_q = row0 + pid_m * (2 * BLOCK_MW)
    tab = bh * NQ + pid_m
    cnt = gl.load(kv_cnt_ptr + tab)  # host guarantees cnt >= 1
    kv_idx_base = kv_idx_ptr + tab.to(gl.int64) * MAXK

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_MW, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    gl.thread_barrier()

    gl.warp_specialize(
        [
            (_pp_consumer0, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty,
                             turn, cnt, qk_scale, row_q, col, STAGES)),
            (_pp_consumer1, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, k_empty, v_empty,
                             turn, cnt, qk_scale, row_q, col, STAGES)),
            (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, kv_idx_base, cnt,
                         row0, col, STAGES, BLOCK_N)),
        ],
        [4, 1],
        [PP_CONSUMER_REGS, 24],
    )


# ---------------------------------------------------------------------------
# host wrapper (GPU)
# ---------------------------------------------------------------------------

KERNELS = {"pingpong": gluon_attn_fwd_pp}
KERNEL_WARPS = {"pingpong": 4}
KERNEL_QBOX = {"pingpong": BLOCK_M // 2}
# "simple" (gluon_attn_fwd) and "ws" (gluon_attn_fwd_ws) lost to pingpong on
# the H200 (2026-12-03: 476-520 against 590-643 TFLOP/s) and were removed.
REMOVED_VARIANTS = ("simple", "ws")


def _smem_layout(rows=BLOCK_M):
    return gl.NVMMASharedLayout.get_default_for([rows, HEAD_D], gl.bfloat16)


def gluon_block_sparse_attention(q, k, v, kv_idx, kv_cnt, sm_scale=None, stages=DEFAULT_STAGES, variant="pingpong",
                                 check_table=False):
    """q, k, v: (B, S, H, D) bf16 contiguous.  kv_idx int32 (B*H, NQ, MAXK),
    kv_cnt int32 (B*H, NQ), every count in [1, MAXK] (cnt == 0 would hang the
    kernel; check_table=True verifies it, at the cost of a device sync).
    Returns o (B, S, H, D) bf16.  variant: only "pingpong" (2 consumer
    warpgroup partitions, 64 rows each, ping-pong scheduled through
    mbarriers, + 1 producer warp)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, S, H, D = q.shape
    assert D == HEAD_D and S % BLOCK_M == 0 and S % BLOCK_N == 0
    assert q.dtype == torch.bfloat16 and k.dtype == q.dtype and v.dtype == q.dtype
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert k.shape == q.shape and v.shape == q.shape
    NQ = S // BLOCK_M
    assert kv_idx.dtype == torch.int32 and kv_cnt.dtype == torch.int32
    assert kv_idx.is_contiguous() and kv_cnt.is_contiguous()
    assert kv_idx.shape[0] == B * H and kv_idx.shape[1] == NQ
    assert tuple(kv_cnt.shape) == (B * H, NQ)
    MAXK = kv_idx.shape[2]
    if check_table:
        assert int(kv_cnt.min()) >= 1 and int(kv_cnt.max()) <= MAXK, "kv_cnt must be in [1, MAXK]"
        assert int(kv_idx.min()) >= 0 and int(kv_idx.max()) < S // BLOCK_N, "kv_idx out of range"
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    o = torch.empty_like(q)

    def desc(t, blk):
        t2 = t.view(B * S, H * D)
        return TensorDescriptor(t2, [B * S, H * D], [H * D, 1], [blk, HEAD_D], _smem_layout(blk))

    grid = (NQ, B * H)
    qbox = KERNEL_QBOX[variant]
    KERNELS[variant][grid](desc(q, qbox), desc(k, BLOCK_N), desc(v, BLOCK_N), desc(o, qbox),  #
                           kv_idx, kv_cnt, qk_scale, S, H, NQ, MAXK,  #
                           STAGES=stages, num_warps=KERNEL_WARPS[variant])
    return o


# ---------------------------------------------------------------------------
# compile-only (no GPU)
# ---------------------------------------------------------------------------


def compile_only(stages=DEFAULT_STAGES, variant="pingpong", dump_dir=None):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = KERNELS[variant]
    layout = _smem_layout()
    td = f"tensordesc<bf16[{BLOCK_M}, {HEAD_D}],{layout!r}>"
    qbox = KERNEL_QBOX[variant]
    tdq = f"tensordesc<bf16[{qbox}, {HEAD_D}],{_smem_layout(qbox)!r}>"
    signature = {
        "q_desc": tdq, "k_desc": td, "v_desc": td, "o_desc": tdq,
        "kv_idx_ptr": "*i32", "kv_cnt_ptr": "*i32",
        "qk_scale": "fp32", "S": "i32", "H": "i32", "NQ": "i32", "MAXK": "i32",
        "STAGES": "constexpr",
    }
    src = GluonASTSource(fn, signature, constexprs={"STAGES": stages})
    target = GPUTarget("cuda", 90, 32)
    t0 = time.time()
    ck = triton.compile(src, target=target, options={"num_warps": KERNEL_WARPS[variant]})
    dt = time.time() - t0
    ptx = ck.asm["ptx"]
    n_wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
    n_commit = len(re.findall(r"wgmma\.commit_group", ptx))
    n_fence = len(re.findall(r"wgmma\.fence", ptx))
    n_tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    n_bar = len(re.findall(r"\bbar\.sync|barrier\.sync", ptx))
    n_setmaxnreg = len(re.findall(r"setmaxnreg", ptx))
    reqntid = re.findall(r"\.reqntid\s+(\d+)", ptx)
    md = ck.metadata
    shared = getattr(md, "shared", None)
    nonzero = [w for w in waits if int(w) != 0]
    print(f"[compile-only] {fn.__name__} variant={variant} STAGES={stages} num_warps={KERNEL_WARPS[variant]} "
          f"target=sm_90a compiled in {dt:.1f}s")
    print(f"  threads per CTA (.reqntid)          : {reqntid}")
    print(f"  wgmma.mma_async instructions in PTX : {n_wgmma}")
    print(f"  wgmma.commit_group / wgmma.fence    : {n_commit} / {n_fence}")
    print(f"  wgmma.wait_group N values           : {waits}")
    print(f"  wait_group with nonzero count       : {bool(nonzero)} ({len(nonzero)} sites)")
    print(f"  TMA cp.async.bulk.tensor            : {n_tma}")
    print(f"  bar.sync / barrier.sync             : {n_bar}")
    print(f"  setmaxnreg                          : {n_setmaxnreg}")
    print(f"  shared memory (bytes)               : {shared}")
    info = dict(variant=variant, stages=stages, n_wgmma=n_wgmma, waits=waits, shared=shared, n_tma=n_tma,
                n_bar_sync=n_bar, reqntid=reqntid)
    info["loops"] = _loop_barrier_check(ptx)
    info["ptxas"] = _ptxas_check(ptx)
    info["sass"] = _sass_check(ck.asm.get("cubin"))
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        for ext in ("ttgir", "llir", "ptx"):
            if ext in ck.asm:
                with open(os.path.join(dump_dir, f"{fn.__name__}_s{stages}.{ext}"), "w") as f:
                    f.write(ck.asm[ext])
        print(f"  dumped IR to {dump_dir}")
    return info


def _loop_barrier_check(ptx):
    """Per loop body in the PTX (label ... backward branch to it): the
    barrier instructions it executes per iteration, as 'id,threads' (no
    thread count = all threads of the CTA, i.e. a CTA-wide barrier), plus the
    wgmma and mbarrier ops in it.  For pingpong the consumer loops must show
    only partition-local barriers ('N,128')."""
    lines = ptx.splitlines()
    labels = {}
    for i, ln in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", ln.strip())
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = lines[labels[m.group(1)]:i + 1]
            bars = []
            for b in body:
                mb = re.search(r"\b(?:bar|barrier)\.sync(?:\.aligned)?\s+(\d+)(?:,\s*(\d+))?;", b)
                if mb:
                    bars.append(f"{mb.group(1)},{mb.group(2) or 'ALL'}")
            n_mma = sum("wgmma.mma_async" in b for b in body)
            if n_mma == 0 and not bars:
                continue
            loops.append(dict(label=m.group(1), lines=len(body), barriers=bars, n_wgmma=n_mma,
                              n_mbar_wait=sum("try_wait" in b for b in body),
                              n_mbar_arrive=sum(bool(re.search(r"mbarrier\.arrive", b)) for b in body),
                              start=labels[m.group(1)], end=i))
    # keep innermost loops only (the warp_specialize dispatch loop of the
    # idle workers encloses whole partitions and is entered once per region)
    loops = [lp for lp in loops
             if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]
    for lp in loops:
        cta = [b for b in lp["barriers"] if b.endswith(",ALL") or b.endswith(",384") or b.endswith(",256")]
        print(f"  loop {lp['label']}: {len(lp['barriers'])} bar.sync/iter {lp['barriers']} "
              f"(CTA/multi-WG-wide: {len(cta)}), wgmma={lp['n_wgmma']}, mbarrier waits={lp['n_mbar_wait']}, "
              f"arrives={lp['n_mbar_arrive']}")
    return loops


def _ptxas_check(ptx):
    """ptxas -v on the PTX (wgmma serialisation warnings, registers, spills): gluon_engine_check.py's check."""
    from gluon_engine_check import _ptxas_check as check
    return check(ptx)


def _sass_check(cubin):
    """HGMMA / WARPGROUP.DEPBAR counts and the softmax EX2s under the PV wgmma: gluon_engine_check.py's check."""
    from gluon_engine_check import _sass_check as check
    return check(cubin)


# ---------------------------------------------------------------------------
# GPU: correctness + benchmark
# ---------------------------------------------------------------------------


def make_table(B, H, NQ, NK, density, device, seed=0):
    """Random per-(b, h, query block) choice of key blocks.  Returns kv_idx
    (B*H, NQ, MAXK=nsel) int32 (sorted indices), kv_cnt (B*H, NQ) int32, the
    boolean block mask (B*H, NQ, NK) and nsel (blocks per query block)."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    nsel = max(1, min(NK, int(round(density * NK))))
    if nsel == NK:
        idx = torch.arange(NK, dtype=torch.int32).expand(B * H, NQ, NK).contiguous()
    else:
        r = torch.rand(B * H, NQ, NK, generator=g)
        idx = torch.topk(r, nsel, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
    cnt = torch.full((B * H, NQ), nsel, dtype=torch.int32)
    mask = torch.zeros(B * H, NQ, NK, dtype=torch.bool)
    mask.scatter_(2, idx.long(), True)
    return idx.to(device), cnt.to(device), mask.to(device), nsel


def reference(q, k, v, mask_blocks, sm_scale):
    """fp32 masked dense SDPA (math).  q,k,v (B,S,H,D); mask (B*H, NQ, NK)."""
    import torch.nn.functional as F
    B, S, H, D = q.shape
    m = mask_blocks.view(B, H, S // BLOCK_M, S // BLOCK_N)
    m = m.repeat_interleave(BLOCK_M, dim=2).repeat_interleave(BLOCK_N, dim=3)
    qt, kt, vt = (x.permute(0, 2, 1, 3).float() for x in (q, k, v))
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=sm_scale)
    return o.permute(0, 2, 1, 3)


class _Watchdog:
    """A GPU hang (e.g. an mbarrier phase error) cannot be interrupted from
    Python.  Each case arms this; if it is not disarmed within `timeout` s,
    the partial results are written and the process exits with code 124."""

    def __init__(self, args, results):
        self.args, self.results, self.timer = args, results, None

    def arm(self, name):
        import threading
        self.disarm()
        if self.args.case_timeout <= 0:
            return

        def fire():
            msg = f"WATCHDOG: case '{name}' exceeded {self.args.case_timeout}s -- probable hang; exiting"
            print(msg, flush=True)
            self.results.setdefault("hang", []).append(name)
            try:
                _dump(self.results, self.args)
            finally:
                os._exit(124)

        self.timer = threading.Timer(self.args.case_timeout, fire)
        self.timer.daemon = True
        self.timer.start()

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _dump(results, args):
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gluon_attention.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        return path


def check_variant(variant, args, results, wd):
    import torch
    dev = "cuda"
    D = HEAD_D
    S = args.check_seq
    for B, H in [(1, 2), (2, 12)]:
        for density in [1.0, 0.5, 0.1]:
            case = dict(variant=variant, B=B, H=H, S=S, density=density)
            wd.arm(f"check {variant} B={B} H={H} S={S} density={density}")
            try:
                torch.manual_seed(1)
                q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16)
                k = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16)
                NQ = S // BLOCK_M
                idx, cnt, mask, nsel = make_table(B, H, NQ, S // BLOCK_N, density, dev, seed=B * 100 + H)
                sm_scale = 1.0 / math.sqrt(D)
                o = gluon_block_sparse_attention(q, k, v, idx, cnt, sm_scale, stages=args.stages, variant=variant,
                                                 check_table=True)
                torch.cuda.synchronize()
                ref = reference(q, k, v, mask, sm_scale)
                err = (o.float() - ref).abs().max().item()
                scale = ref.abs().max().item()
                rel = err / max(scale, 1e-6)
                ok = rel < 2e-2 and bool(torch.isfinite(o).all())
                case.update(max_abs_err=err, ref_max=scale, rel_err=rel, ok=ok, nsel=nsel)
                print(f"[check {variant}] B={B} H={H} S={S} density={density} blocks/row={nsel}: "
                      f"max_abs_err={err:.3e} ref_max={scale:.3e} rel={rel:.3e} {'OK' if ok else 'FAIL'}",
                      flush=True)
                assert ok, f"relative error {rel} >= 2e-2"
            except Exception as e:  # keep going
                case.update(ok=False, error=repr(e))
                print(f"[check {variant}] B={B} H={H} S={S} density={density}: EXCEPTION {e!r}", flush=True)
                traceback.print_exc()
            wd.disarm()
            results["correctness"].append(case)
            _dump(results, args)
            torch.cuda.empty_cache()


def bench_variant(variant, args, results, qkv, wd):
    import torch
    q, k, v = qkv
    B, S, H, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    NQ, NK = S // BLOCK_M, S // BLOCK_N
    for density in [1.0, 0.5, 0.3, 0.1]:
        case = dict(kind=f"gluon_{variant}", B=B, H=H, S=S, D=D, density=density, stages=args.stages)
        wd.arm(f"bench {variant} density={density}")
        try:
            idx, cnt, mask, nsel = make_table(B, H, NQ, NK, density, "cuda", seed=7)
            del mask
            eff = nsel / NK
            fn = lambda: gluon_block_sparse_attention(q, k, v, idx, cnt, sm_scale, stages=args.stages,  # noqa
                                                      variant=variant)
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep)
            tflops = 4 * B * H * S * S * D * eff / (ms * 1e-3) / 1e12
            case.update(ms=ms, tflops=tflops, blocks_per_row=nsel, eff_density=eff)
            print(f"[bench {variant}] B={B} H={H} S={S} D={D} density={density} (eff {eff:.4f}): "
                  f"{ms:.3f} ms  {tflops:.1f} TFLOP/s", flush=True)
        except Exception as e:
            case.update(error=repr(e))
            print(f"[bench {variant}] density={density}: EXCEPTION {e!r}", flush=True)
            traceback.print_exc()
        wd.disarm()
        results["bench"].append(case)
        _dump(results, args)


def bench_cudnn(args, results, qkv):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = qkv
    B, S, H, D = q.shape
    sm_scale = 1.0 / math.sqrt(D)
    case = dict(kind="cudnn_sdpa_dense", B=B, H=H, S=S, D=D, density=1.0)
    try:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B,H,S,D) views of the BSHD storage

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, scale=sm_scale)

        sdpa()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(sdpa, warmup=args.warmup, rep=args.rep)
        tflops = 4 * B * H * S * S * D / (ms * 1e-3) / 1e12
        case.update(ms=ms, tflops=tflops)
        print(f"[bench] cuDNN SDPA dense B={B} H={H} S={S} D={D}: {ms:.3f} ms  {tflops:.1f} TFLOP/s", flush=True)
    except Exception as e:
        case.update(error=repr(e))
        print(f"[bench] cuDNN SDPA: EXCEPTION {e!r}", flush=True)
        traceback.print_exc()
    results["bench"].append(case)
    _dump(results, args)


def run_gpu(args, results):
    import torch
    results.update(device=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
                   stages=args.stages, variants=args.variants, correctness=[], bench=[])
    print(f"device={results['device']} triton={triton.__version__} torch={torch.__version__} "
          f"stages={args.stages} variants={args.variants}", flush=True)
    B, H, S, D = args.bench_shape
    torch.manual_seed(0)
    qkv = tuple(torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # Variants run one after the other (check, then bench), results dumped
    # after every case, so a hang in a later variant keeps the earlier numbers.
    wd = _Watchdog(args, results)
    for i, variant in enumerate(args.variants):
        check_variant(variant, args, results, wd)
        bench_variant(variant, args, results, qkv, wd)
        if i == 0:
            bench_cudnn(args, results, qkv)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90a without a GPU")
    ap.add_argument("--out", default=None, help="directory for results JSON (and IR dumps)")
    ap.add_argument("--stages", type=int, default=DEFAULT_STAGES, help="K/V ring depth (2 or 3)")
    ap.add_argument("--variants", default="pingpong",
                    help="comma list of kernels to run; only 'pingpong' remains ('simple' and 'ws' were removed "
                         "after the 2026-12-03 H200 measurements, see benchmarks/results/kernel.md)")
    ap.add_argument("--check-seq", type=int, default=4096)
    ap.add_argument("--bench-shape", type=int, nargs=4, default=[2, 12, 32768, 128], metavar=("B", "H", "S", "D"))
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--skip-compile-report", action="store_true")
    ap.add_argument("--case-timeout", type=float, default=30.0,
                    help="seconds before a single case is declared hung (writes JSON, exits 124); 0 = off")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v in REMOVED_VARIANTS:
            ap.error(f"variant '{v}' was removed from the code after the 2026-12-03 H200 measurements "
                     f"(it lost to pingpong; numbers in benchmarks/results/kernel.md); use --variants pingpong")
        if v not in KERNELS:
            ap.error(f"unknown variant '{v}'; the only variant is 'pingpong'")

    if args.compile_only:
        infos = []
        rc = 0
        for variant in args.variants:
            for st in sorted({args.stages, 2, 3}):
                try:
                    infos.append(compile_only(st, variant, dump_dir=args.out))
                except Exception as e:
                    print(f"[compile-only] {variant} STAGES={st}: FAILED {e!r}")
                    traceback.print_exc()
                    infos.append(dict(variant=variant, stages=st, error=repr(e)))
                    if st == args.stages:
                        rc = 1
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "compile_only.json"), "w") as f:
                json.dump(infos, f, indent=1, default=str)
        sys.exit(rc)

    results = {"compile": []}
    if not args.skip_compile_report:
        for variant in args.variants:
            try:
                results["compile"].append(compile_only(args.stages, variant, dump_dir=args.out))
            except Exception as e:
                print(f"[compile report] {variant}: EXCEPTION {e!r}")
                traceback.print_exc()
    run_gpu(args, results)
    path = _dump(results, args)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
