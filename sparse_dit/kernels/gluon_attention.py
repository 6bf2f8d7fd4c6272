"""Optional Gluon engine (``triton.experimental.gluon``, Triton 3.6) for Hopper (sm_90) behind the same `Layout`.

Checked on an H200 (2026-12-03 23:35 UTC; 2026-12-04 03:33 after the one-release-barrier change; 2026-12-04 12:45
for the persistent kernel, whose outputs were bit-identical to the per-tile kernel's, and its GPU tests at 12:50;
`benchmarks/gluon_engine_check.py`, raw in benchmarks/results/raw/gluon_engine_h200_2335/, _0333/ and
gluon_persistent_h200_1243/): equal to the
reference and the Triton kernel on ragged lengths, batch 1/2, shared and per-batch tables, empty query blocks, lse,
fp16/bf16, a permuted layout; at Wan 480p (B=2 H=12 S=32760, bf16) 581-657 effective TFLOP/s at densities 0.1-0.5,
1.16-1.44x the Triton kernel and above cuDNN dense (573-576) in both runs. `kernels.EngineChooser` measures it
against the Triton kernel (and FA4 where installed) per call shape under ``backend="auto"``; ``backend="gluon"``
prefers it. It is compiled by Triton at the first call of each (dtype, ragged, lse) case (~2-4 s).

A block-sparse attention forward written in Gluon with explicit async wgmma, after the "pingpong" prototype
measured in benchmarks/results/kernel.md (its notes: ``benchmarks/gluon_attention_NOTES.md``; its code in git
history). Each 128-query block (a "tile") is taken by two consumer warpgroups (64 query rows each, own
``gl.warp_specialize`` partitions) fed by a 1-warp TMA producer that streams the listed K/V blocks through a 2-slot
mbarrier ring; the softmax of S_j runs under the PV wgmma of block j-1 (FA3's intra-warpgroup overlap).

The grid is persistent: at most one CTA per SM, each taking tiles pid, pid + grid, ... (query block fastest, then
head, then batch, so neighbouring CTAs share K/V in L2). The ring's iterations are numbered across a CTA's tiles
(consumer iteration g frees K_g and V_(g-1)), so the producer streams the next tile's K/V while the consumers finish
the current one; each warpgroup loads its next tile's Q as soon as its last S GEMM is done and writes O through its
own buffer, leaving the TMA store in flight until that buffer is needed again. H200, 2026-12-04 (Nsight Compute, SM
cycles of one launch at Wan 480p, against one CTA per tile): 6.2% / 5.8% fewer at 10% density (window / random),
2.3% at 30%, 1.6% at 50%; outputs bit-identical. ``persistent=False`` launches one CTA per tile (for A/B runs). The
per-tile kernel it replaced also made the two warpgroups take turns issuing their GEMMs (FA3's ping-pong, through
mbarriers); that hand-over measured no cycles either way and is gone (`git show
b2428dc:sparse_dit/kernels/gluon_attention.py`).

It expresses exactly the layouts the FA4 engine does (`sparse_dit.kernels.fa4.fa4_blocks`: whole 128-key blocks,
permutations by gathers around the kernel), restricted to query blocks of 128, head dim 128, fp16/bf16. Beyond the
prototype:

- any sequence length: q/k/v/o are read and written through 3-D TMA descriptors over (B, S, H*D) with a
  [1, rows, 128] box, so a box past the end of a batch element is zero-filled on load and clipped on store (no
  reads from the next batch element, no stores past S); keys >= S are masked to -inf in the last key block only
  (constexpr ``HAS_TAIL`` when S % 128 != 0, and then a runtime branch taken on the last listed block only);
- query blocks with no kept key block produce zeros (and lse -inf) without touching any K/V barrier;
- optional lse (B, H, S) float32, natural log;
- tables shared over the batch (L = 1) or per batch element (L = B).

Nothing Triton is needed at import: the kernel definitions sit behind a guarded import, and `gluon_available` is
False (never raises) without Gluon's Hopper ops or without a CUDA device of capability (9, 0).
"""

from __future__ import annotations

import functools
import math

import torch

from sparse_dit.layout import Layout

from .fa4 import BLOCK_KV, Fa4Blocks, fa4_blocks, gather_rows
from .reference import check_qkv

BLOCK_M = 128  # query rows per CTA (2 consumer warpgroups x 64)
BLOCK_N = 128  # keys per block (FA4's tables)
HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16)
STAGES = 2  # K/V ring depth (3 measured no faster; with the O buffers it no longer fits in shared memory)
LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634

assert BLOCK_N == BLOCK_KV

# ------------------------------------------------------------------------------------------ guarded Gluon kernel
_IMPORT_ERROR: BaseException | None = None
try:  # pragma: no cover - depends on the installed Triton
    import triton  # noqa: F401
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except Exception as e:  # ImportError, or an incompatible Triton: no engine
    _IMPORT_ERROR = e

if _IMPORT_ERROR is None:  # pragma: no cover - kernel code, exercised on the GPU
    try:
        _CONSUMER1_REGS = gl.constexpr(232)  # setmaxnreg of the second consumer warpgroup (worker 0)
        _PRODUCER_REGS = gl.constexpr(24)

        @gluon.jit
        def _ge_softmax(s, m_i, l_i, qk_scale):
            """Online softmax (base 2, scale folded in) of one fp32 S tile: P (fp32, S's layout), alpha, m, l."""
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_new = l_i * alpha + gl.sum(p, axis=1)
            return p, alpha, m_new, l_new

        @gluon.jit
        def _ge_mask_tail(s, lim, s_layout: gl.constexpr):
            """Keys at or past ``lim`` (within the block) -> -inf."""
            BN: gl.constexpr = s.shape[1]
            cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            return gl.where(gl.expand_dims(cols, 0) < lim, s, float("-inf"))

        @gluon.jit
        def _ge_tile(t, NQ, H, tab_b_stride, kv_cnt_ptr, kv_idx_ptr, W, HD: gl.constexpr):
            """Tile t (query block fastest, then head, then batch) -> b, h, q0 row, column, count, index row."""
            bh = t // NQ
            pid_m = t - bh * NQ
            b = bh // H
            h = bh - b * H
            tab = b * tab_b_stride + h * NQ + pid_m
            cnt = gl.load(kv_cnt_ptr + tab)
            return b, h, pid_m, h * HD, cnt, kv_idx_ptr + tab.to(gl.int64) * W

        @gluon.jit
        def _ge_producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free,  #
                         kv_idx_ptr, kv_cnt_ptr, NQ, H, W, tab_b_stride, n_tiles, STAGES: gl.constexpr):
            """1-warp partition: K_g, V_g -> ring slot g % STAGES for the listed K/V blocks of every tile of this CTA,
            g counting on across tiles.  kv_free[e % STAGES] completes for the (e // STAGES)-th time when both
            consumers have finished their iteration e, i.e. with K_e and V_(e-1) (V_(e-1) may be the previous tile's
            last block): so K_g (g >= STAGES) waits for completion e = g - STAGES and V_g for e = g - STAGES + 1.  One
            release barrier for both K and V saves each consumer an arrive, and with it a partition barrier Triton
            puts before every arrive."""
            BN: gl.constexpr = k_desc.block_type.shape[1]
            HD: gl.constexpr = k_desc.block_type.shape[2]
            dtype: gl.constexpr = k_desc.dtype
            g0 = 0
            for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
                b, h, pid_m, col, cnt, idx_base = _ge_tile(t, NQ, H, tab_b_stride, kv_cnt_ptr, kv_idx_ptr, W, HD)
                for i in range(cnt):
                    g = g0 + i
                    s = g % STAGES
                    r = g // STAGES
                    row = gl.load(idx_base + i) * BN
                    mbarrier.wait(kv_free.index(s), (r - 1) & 1, pred=r > 0)
                    mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(k_desc, [b, row, col], k_ready.index(s),
                                                    k_smem.index(s)._reinterpret(dtype, [1, BN, HD], k_desc.layout))
                    g1 = g + 1
                    mbarrier.wait(kv_free.index(g1 % STAGES), (g1 // STAGES - 1) & 1, pred=r > 0)
                    mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(v_desc, [b, row, col], v_ready.index(s),
                                                    v_smem.index(s)._reinterpret(dtype, [1, BN, HD], v_desc.layout))
                g0 += cnt

        @gluon.jit
        def _ge_attend(qs, k_smem, v_smem, k_ready, v_ready, kv_free, g0, idx_base, cnt, qk_scale, Sk,  #
                       acc, m_i, l_i, q_desc, qs3, qb, b, next_row, col, prefetch,  #
                       s_layout: gl.constexpr, p_layout: gl.constexpr, orow_layout: gl.constexpr,  #
                       STAGES: gl.constexpr, HAS_TAIL: gl.constexpr):
            """The main loop of one consumer warpgroup over one tile's cnt >= 1 listed key blocks, ring iterations
            numbered from g0 (this CTA's earlier tiles).  After the tile's last S = Q K^T, Q's buffer is free: the
            next tile's Q is loaded into it (``prefetch``) while the last PV and the epilogue run."""
            BMW: gl.constexpr = qs.shape[0]
            BN: gl.constexpr = k_smem.shape[1]
            dtype: gl.constexpr = qs.dtype
            zero_s = gl.zeros([BMW, BN], gl.float32, s_layout)
            last = cnt - 1
            tail_lim = Sk
            if HAS_TAIL:
                tail_lim = Sk - gl.load(idx_base + last) * BN

            s0 = g0 % STAGES
            mbarrier.wait(k_ready.index(s0), (g0 // STAGES) & 1)
            s = warpgroup_mma(qs, k_smem.index(s0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            gl.thread_barrier()  # partition-local: this WG is done with K_g0 (and V_(g0-1) of the last tile)
            mbarrier.arrive(kv_free.index(s0), count=1)
            if HAS_TAIL:
                if last == 0:
                    s = _ge_mask_tail(s, tail_lim, s_layout)
            p32, alpha, m_i, l_i = _ge_softmax(s, m_i, l_i, qk_scale)
            p = gl.convert_layout(p32.to(dtype), p_layout)
            g1 = g0 + 1
            mbarrier.wait(k_ready.index(g1 % STAGES), (g1 // STAGES) & 1, pred=1 < cnt)

            for j in range(1, cnt):
                g = g0 + j
                ks = g % STAGES
                vg = g - 1
                vs = vg % STAGES
                mbarrier.wait(v_ready.index(vs), (vg // STAGES) & 1)
                s = warpgroup_mma(qs, k_smem.index(ks).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                acc = warpgroup_mma(p, v_smem.index(vs), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                if HAS_TAIL:
                    if j == last:
                        s = _ge_mask_tail(s, tail_lim, s_layout)
                p32, alpha, m_i, l_i = _ge_softmax(s, m_i, l_i, qk_scale)
                gn = g + 1  # the K_(g+1) wait keeps ptxas from hoisting the PV wait above the softmax
                mbarrier.wait(k_ready.index(gn % STAGES), (gn // STAGES) & 1, pred=j + 1 < cnt)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                p = gl.convert_layout(p32.to(dtype), p_layout)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
                gl.thread_barrier()  # partition-local: this WG is done with K_g, V_(g-1)
                mbarrier.arrive(kv_free.index(ks), count=1)

            gl.thread_barrier()  # every warp of this WG is past its last S GEMM: Q's buffer is free
            if prefetch:
                mbarrier.expect(qb, q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, next_row, col], qb, qs3)
            gl_ = g0 + last
            vs = gl_ % STAGES
            mbarrier.wait(v_ready.index(vs), (gl_ // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(vs), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            return acc, m_i, l_i

        @gluon.jit
        def _ge_consumer(q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready, kv_free,  #
                         kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W, tab_b_stride, n_tiles,  #
                         STAGES: gl.constexpr, HAS_TAIL: gl.constexpr, RETURN_LSE: gl.constexpr, WG: gl.constexpr):
            """Consumer warpgroup WG (4 warps): query rows [64 WG, 64 WG + 64) of every tile of this CTA.
            Q goes through this WG's Q buffer (the next tile's Q loaded as soon as the last S GEMM is done), O
            through its own O buffer (TMA stores left in flight until the buffer is needed again)."""
            BMW: gl.constexpr = q_desc.block_type.shape[1]
            HD: gl.constexpr = q_desc.block_type.shape[2]
            BN: gl.constexpr = k_smem.shape[1]
            NW: gl.constexpr = gl.num_warps()
            dtype: gl.constexpr = q_desc.dtype
            s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                               instr_shape=[16, BN, 16])
            o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                               instr_shape=[16, HD, 16])
            p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
            row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
            orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
            qs = q_smem.index(WG)
            qs3 = qs._reinterpret(dtype, [1, BMW, HD], q_desc.layout)
            os_ = o_smem.index(WG)
            os3 = os_._reinterpret(dtype, [1, BMW, HD], o_desc.layout)
            qb = q_bars.index(WG)

            pid = gl.program_id(0)
            n_prog = gl.num_programs(0)
            b, h, pid_m, col, cnt, idx_base = _ge_tile(pid, NQ, H, tab_b_stride, kv_cnt_ptr, kv_idx_ptr, W, HD)
            mbarrier.expect(qb, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, pid_m * (2 * BMW) + WG * BMW, col], qb, qs3)
            g0 = 0
            n_done = 0
            for t in range(pid, n_tiles, n_prog):
                b, h, pid_m, col, cnt, idx_base = _ge_tile(t, NQ, H, tab_b_stride, kv_cnt_ptr, kv_idx_ptr, W, HD)
                row_w = pid_m * (2 * BMW) + WG * BMW
                tn = t + n_prog
                prefetch = tn < n_tiles
                nb, nh, npid_m, ncol, ncnt, nidx = _ge_tile(gl.minimum(tn, n_tiles - 1), NQ, H, tab_b_stride,
                                                            kv_cnt_ptr, kv_idx_ptr, W, HD)
                next_row = npid_m * (2 * BMW) + WG * BMW
                acc = gl.zeros([BMW, HD], gl.float32, o_layout)
                m_i = gl.full([BMW], float("-inf"), gl.float32, row_layout)
                l_i = gl.zeros([BMW], gl.float32, row_layout)
                mbarrier.wait(qb, n_done & 1)
                if cnt > 0:
                    acc, m_i, l_i = _ge_attend(qs, k_smem, v_smem, k_ready, v_ready, kv_free, g0, idx_base, cnt,
                                               qk_scale, Sk, acc, m_i, l_i, q_desc, qs3, qb, nb, next_row, ncol,
                                               prefetch, s_layout, p_layout, orow_layout, STAGES, HAS_TAIL)
                else:
                    gl.thread_barrier()
                    if prefetch:
                        mbarrier.expect(qb, q_desc.block_type.nbytes)
                        tma.async_copy_global_to_shared(q_desc, [nb, next_row, ncol], qb, qs3)
                g0 += cnt
                n_done += 1

                has = l_i > 0.0
                l_safe = gl.where(has, l_i, 1.0)
                acc = acc / gl.expand_dims(gl.convert_layout(l_safe, orow_layout), 1)
                if RETURN_LSE:
                    rows = row_w + gl.arange(0, BMW, layout=row_layout)
                    lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
                    base = (b * H + h).to(gl.int64) * Sq
                    gl.store(lse_ptr + base + rows, lse, mask=rows < Sq)
                # O -> this WG's O buffer (its previous tile's store must have read it) -> TMA store, left in flight
                tma.store_wait(pendings=0)
                gl.thread_barrier()
                os_.store(acc.to(dtype))
                fence_async_shared()
                gl.thread_barrier()
                tma.async_copy_shared_to_global(o_desc, [b, row_w, col], os3)
            tma.store_wait(pendings=0)

        @gluon.jit
        def _ge_consumer0(q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready, kv_free,  #
                          kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W, tab_b_stride, n_tiles,  #
                          STAGES: gl.constexpr, HAS_TAIL: gl.constexpr, RETURN_LSE: gl.constexpr):
            _ge_consumer(q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready, kv_free,  #
                         kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W, tab_b_stride, n_tiles,  #
                         STAGES, HAS_TAIL, RETURN_LSE, 0)

        @gluon.jit
        def _ge_consumer1(q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready, kv_free,  #
                          kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W, tab_b_stride, n_tiles,  #
                          STAGES: gl.constexpr, HAS_TAIL: gl.constexpr, RETURN_LSE: gl.constexpr):
            _ge_consumer(q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready, kv_free,  #
                         kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W, tab_b_stride, n_tiles,  #
                         STAGES, HAS_TAIL, RETURN_LSE, 1)

        @gluon.jit(do_not_specialize=["qk_scale", "Sq", "Sk", "H", "NQ", "W", "tab_b_stride", "n_tiles"])
        def gluon_sparse_fwd(q_desc, k_desc, v_desc, o_desc,  #
                             kv_idx_ptr, kv_cnt_ptr, lse_ptr,  #
                             qk_scale, Sq, Sk, H, NQ, W, tab_b_stride, n_tiles,  #
                             SMEM_Q: gl.constexpr, SMEM_KV: gl.constexpr,  #
                             STAGES: gl.constexpr, HAS_TAIL: gl.constexpr, RETURN_LSE: gl.constexpr):
            """Grid (G,), G <= n_tiles = NQ * B * H; CTA pid takes tiles pid, pid + G, ... (query block fastest).
            num_warps 4 (consumer WG0; worker 0 = consumer WG1, 4 warps; worker 1 = producer, 1 warp).

            q_desc/o_desc: 3-D over (B, Sq, H*D), box [1, 64, D]; k_desc/v_desc: (B, Sk, H*D), box [1, 128, D].
            Tables: kv_cnt (L, H, NQ) int32 and kv_idx (L, H, NQ, W) int32 ascending, batch stride of the count
            table ``tab_b_stride`` (0 for L = 1, H*NQ for L = B).  lse_ptr: (B, H, Sq) float32 when RETURN_LSE.
            SMEM_Q/SMEM_KV: the 2-D NVMMA shared layouts of a [64, D] / [128, D] tile (wgmma operands)."""
            BMW: gl.constexpr = q_desc.block_type.shape[1]
            HD: gl.constexpr = q_desc.block_type.shape[2]
            BN: gl.constexpr = k_desc.block_type.shape[1]
            dtype: gl.constexpr = q_desc.dtype
            q_smem = gl.allocate_shared_memory(dtype, [2, BMW, HD], SMEM_Q)
            o_smem = gl.allocate_shared_memory(dtype, [2, BMW, HD], SMEM_Q)
            k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HD], SMEM_KV)
            v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, HD], SMEM_KV)
            q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(q_bars.index(i), count=1)
            for i in gl.static_range(STAGES):
                mbarrier.init(k_ready.index(i), count=1)
                mbarrier.init(v_ready.index(i), count=1)
                mbarrier.init(kv_free.index(i), count=2)
            fence_async_shared()
            gl.thread_barrier()

            gl.warp_specialize(
                [
                    (_ge_consumer0, (q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                                     kv_free, kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W,
                                     tab_b_stride, n_tiles, STAGES, HAS_TAIL, RETURN_LSE)),
                    (_ge_consumer1, (q_desc, o_desc, q_smem, o_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                                     kv_free, kv_idx_ptr, kv_cnt_ptr, lse_ptr, qk_scale, H, Sq, Sk, NQ, W,
                                     tab_b_stride, n_tiles, STAGES, HAS_TAIL, RETURN_LSE)),
                    (_ge_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free, kv_idx_ptr,
                                    kv_cnt_ptr, NQ, H, W, tab_b_stride, n_tiles, STAGES)),
                ],
                [4, 1],
                [_CONSUMER1_REGS, _PRODUCER_REGS],
            )

        KERNEL = gluon_sparse_fwd
    except Exception as e:  # an incompatible Gluon API: no engine
        _IMPORT_ERROR = e

KERNEL_NUM_WARPS = 4
Q_BOX = BLOCK_M // 2  # rows per consumer warpgroup


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


@functools.lru_cache(maxsize=4)
def smem_layouts(dtype: torch.dtype) -> dict:
    """The NVMMA shared layouts the kernel uses for ``dtype``: 2-D wgmma tiles and the 3-D TMA boxes."""
    g = _gl_dtype(dtype)
    get = gl.NVMMASharedLayout.get_default_for
    return dict(q2=get([Q_BOX, HEAD_DIM], g), kv2=get([BLOCK_N, HEAD_DIM], g),
                q3=get([1, Q_BOX, HEAD_DIM], g), kv3=get([1, BLOCK_N, HEAD_DIM], g))


# ------------------------------------------------------------------------------------------------ availability
# Gluon's API changes between Triton releases (3.9 has no gl.thread_barrier nor shared_memory_descriptor._reinterpret)
# and @gluon.jit compiles lazily, so an import succeeding says nothing: only the release it was written and compiled
# for counts as available.
GLUON_TRITON_RELEASES = ("3.6",)


def _triton_release() -> str | None:
    try:
        import triton

        return ".".join(triton.__version__.split(".")[:2])
    except Exception:
        return None


def _gluon_importable() -> bool:
    return _IMPORT_ERROR is None and _triton_release() in GLUON_TRITON_RELEASES


def gluon_import_error() -> str | None:
    """Why the Gluon kernel cannot be used with this Triton (None when it can)."""
    if _IMPORT_ERROR is not None:
        return repr(_IMPORT_ERROR)
    if _triton_release() not in GLUON_TRITON_RELEASES:
        return f"written for Triton {'/'.join(GLUON_TRITON_RELEASES)} Gluon; this is Triton {_triton_release()}"
    return None


def gluon_available() -> bool:
    """True when Gluon with the Hopper ops imports and the current CUDA device has capability (9, 0). Never raises."""
    try:
        if not _gluon_importable() or not torch.cuda.is_available():
            return False
        return tuple(torch.cuda.get_device_capability()) == (9, 0)
    except Exception:
        return False


def gluon_device_ok(q: torch.Tensor) -> bool:
    """True when q is on a CUDA device of capability (9, 0) and Gluon's Hopper ops are usable. Never raises."""
    try:
        return q.device.type == "cuda" and _gluon_importable() and tuple(torch.cuda.get_device_capability(q.device)) == (9, 0)
    except Exception:
        return False


def _layout_reason(layout: Layout) -> Fa4Blocks | str:
    if layout.block_q != BLOCK_M:
        return f"query blocks of {layout.block_q} (the Gluon engine needs {BLOCK_M})"
    return fa4_blocks(layout)


def _tensor_reason(q: torch.Tensor) -> str | None:
    if q.dim() != 4:
        return f"q must be (batch, seq, heads, head_dim); got shape {tuple(q.shape)}"
    if q.shape[-1] != HEAD_DIM:
        return f"head dim {q.shape[-1]} (the Gluon engine needs {HEAD_DIM})"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the Gluon engine needs float16 or bfloat16)"
    return None


def gluon_sparse_supported(q: torch.Tensor, layout: Layout) -> bool | str:
    """True when the Gluon engine can run attention of q (B, S, H, D) over ``layout`` here; otherwise a one-line
    reason (a non-empty str, so test with ``is True``). Head dim, dtype, query block size and what `fa4_blocks`
    can express are checked first (no GPU needed), then Gluon and the device."""
    reason = _tensor_reason(q)
    if reason:
        return reason
    blocks = _layout_reason(layout)
    if isinstance(blocks, str):
        return blocks
    if not gluon_device_ok(q):
        if q.device.type == "cuda" and gluon_import_error() is not None:
            return f"Gluon (triton.experimental.gluon Hopper ops) is not usable: {gluon_import_error()}"
        return "the Gluon engine needs a CUDA device of compute capability 9.0 (Hopper)"
    return True


# --------------------------------------------------------------------------------------------------- execution
def _bshd_desc(t: torch.Tensor, box_rows: int, layout3):
    """3-D TMA descriptor over (B, S, H*D) of a (B, S, H, D) tensor whose heads are packed (stride(2) == D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, S, H, D = t.shape
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], [1, box_rows, D], layout3)


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t itself when a (B, S, H*D) TMA view of it is legal (unit last stride, heads packed, 16-byte aligned strides
    and base), else a contiguous copy."""
    e = t.element_size()
    ok = (t.stride(3) == 1 and (t.stride(2) == t.shape[3] or t.shape[2] == 1) and t.data_ptr() % 16 == 0
          and (t.stride(0) * e) % 16 == 0 and (t.stride(1) * e) % 16 == 0)
    return t if ok else t.contiguous()


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(q, k, v, out, lse, cnt, idx, scale, persistent=True):
    """q (B, Sq, H, D), k/v (B, Sk, H, D), out (B, Sq, H, D) contiguous; cnt (L, H, NQ), idx (L, H, NQ, W)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    L, _, NQ, W = idx.shape
    lay = smem_layouts(q.dtype)
    q, k, v = _packed(q), _packed(k), _packed(v)
    lse_arg = lse if lse is not None else cnt  # any pointer; not read or written without RETURN_LSE
    descs = (_bshd_desc(q, Q_BOX, lay["q3"]), _bshd_desc(k, BLOCK_N, lay["kv3"]), _bshd_desc(v, BLOCK_N, lay["kv3"]),
             _bshd_desc(out, Q_BOX, lay["q3"]))
    sizes = (scale * LOG2E, Sq, Sk, H, NQ, W, 0 if L == 1 else H * NQ)
    n_tiles = NQ * B * H
    grid = (min(n_tiles, _sm_count(q.device.index)) if persistent else n_tiles,)
    KERNEL[grid](*descs, idx, cnt, lse_arg, *sizes, n_tiles, SMEM_Q=lay["q2"], SMEM_KV=lay["kv2"], STAGES=STAGES,
                 HAS_TAIL=(Sk % BLOCK_N) != 0, RETURN_LSE=lse is not None, num_warps=KERNEL_NUM_WARPS)


def gluon_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    persistent: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of q (B, S, H, D) against k, v over ``layout`` with the Gluon kernel (Hopper, fp16 or
    bf16, D = 128, query blocks of 128, layouts `fa4_blocks` expresses). Same contract as
    `sparse_dit.kernels.triton_attention.triton_block_sparse_attention`: returns out (B, S, H, D) and, with
    ``return_lse``, lse (B, H, S) float32 natural log (-inf for a row that attends no key; its output is 0).
    ``out``/``lse``: optional preallocated outputs (out contiguous (B, S, H, D); lse contiguous (B, H, S) float32).
    ``persistent``: at most one CTA per SM looping over the query blocks (the default: 1.6-6.2% fewer cycles on the
    H200); False: one CTA per query block (for A/B runs).
    Raises ValueError for an unsupported head dim, block size or layout, TypeError for a dtype,
    RuntimeError without Gluon / a Hopper GPU."""
    check_qkv(q, k, v, layout)
    if q.dtype not in DTYPES:
        raise TypeError(f"the Gluon engine supports float16 and bfloat16 inputs; got {q.dtype}")
    D = q.shape[-1]
    if D != HEAD_DIM or v.shape[-1] != HEAD_DIM:
        raise ValueError(f"the Gluon engine needs head dim {HEAD_DIM} for q, k and v; got {D} and {v.shape[-1]}: "
                         "use the Triton kernel")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("the Gluon engine is forward-only: call it under torch.no_grad()")
    if not gluon_device_ok(q):
        raise RuntimeError("sparse-dit: the Gluon engine needs triton.experimental.gluon (Triton 3.6 Hopper ops) and a "
                           f"CUDA device of capability 9.0; use the Triton kernel ({gluon_import_error() or q.device})")
    blocks = _layout_reason(layout)
    if isinstance(blocks, str):
        raise ValueError(f"sparse-dit: the Gluon engine cannot express this layout ({blocks}); use the Triton kernel")
    B, S, H, _ = q.shape
    dev = q.device
    # provided outputs are checked whatever the layout, before any work (TMA stores need 16-byte aligned bases)
    if out is not None and (
        out.shape != (B, S, H, D) or out.dtype != q.dtype or not out.is_contiguous() or out.device != dev
        or out.data_ptr() % 16
    ):
        raise ValueError(f"out must be a contiguous, 16-byte aligned {(B, S, H, D)} {q.dtype} tensor on {dev}")
    if return_lse and lse is not None and (
        lse.shape != (B, H, S) or lse.dtype != torch.float32 or not lse.is_contiguous() or lse.device != dev
    ):
        raise ValueError(f"lse must be a contiguous {(B, H, S)} float32 tensor on {dev}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    def here(t: torch.Tensor | None) -> torch.Tensor | None:  # the layout may live on another device than q
        return None if t is None else t.to(dev)

    cnt, idx = here(blocks.full_cnt).contiguous(), here(blocks.full_idx).contiguous()
    q_gather, kv_gather, q_inverse = here(blocks.q_gather), here(blocks.kv_gather), here(blocks.q_inverse)

    if q_gather is not None:
        q = gather_rows(q, q_gather)
    if kv_gather is not None:
        k, v = gather_rows(k, kv_gather), gather_rows(v, kv_gather)
    Sq = q.shape[1]
    if idx.shape[2] != -(-Sq // BLOCK_M):
        raise ValueError(f"internal: {idx.shape[2]} query blocks for {Sq} query positions")
    permuted_q = q_inverse is not None

    o = out if out is not None and not permuted_q else torch.empty(B, Sq, H, D, device=dev, dtype=q.dtype)
    lse_k = None
    if return_lse:
        if lse is not None and not permuted_q:
            lse_k = lse
        else:
            lse_k = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)

    _launch(q, k, v, o, lse_k, cnt, idx, float(scale), persistent)

    if permuted_q:
        o = gather_rows(o, q_inverse)
        if out is not None:
            out.copy_(o)
            o = out
        if return_lse:
            g = lse_k.gather(2, q_inverse.transpose(1, 2).expand(B, H, -1))
            if lse is not None:
                lse.copy_(g)
                g = lse
            lse_k = g
    return (o, lse_k) if return_lse else o


# ------------------------------------------------------------------------------------------- compile (no GPU)
def compile_for_sm90(dtype_name: str = "bf16", has_tail: bool = True, return_lse: bool = True):
    """Compile the kernel for sm_90a without a GPU (Triton 3.6's ``GluonASTSource``); returns the CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"Gluon not importable: {_IMPORT_ERROR!r}")
    g = gl.bfloat16 if dtype_name == "bf16" else gl.float16
    get = gl.NVMMASharedLayout.get_default_for
    q3, kv3 = get([1, Q_BOX, HEAD_DIM], g), get([1, BLOCK_N, HEAD_DIM], g)
    tq = f"tensordesc<{dtype_name}[1, {Q_BOX}, {HEAD_DIM}],{q3!r}>"
    tkv = f"tensordesc<{dtype_name}[1, {BLOCK_N}, {HEAD_DIM}],{kv3!r}>"
    signature = {
        "q_desc": tq, "k_desc": tkv, "v_desc": tkv, "o_desc": tq,
        "kv_idx_ptr": "*i32", "kv_cnt_ptr": "*i32", "lse_ptr": "*fp32",
        "qk_scale": "fp32", "Sq": "i32", "Sk": "i32", "H": "i32", "NQ": "i32", "W": "i32", "tab_b_stride": "i32",
        "n_tiles": "i32", "SMEM_Q": "constexpr", "SMEM_KV": "constexpr", "STAGES": "constexpr", "HAS_TAIL": "constexpr",
        "RETURN_LSE": "constexpr",
    }
    constexprs = {"SMEM_Q": get([Q_BOX, HEAD_DIM], g), "SMEM_KV": get([BLOCK_N, HEAD_DIM], g), "STAGES": STAGES,
                  "HAS_TAIL": has_tail, "RETURN_LSE": return_lse}
    src = GluonASTSource(KERNEL, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": KERNEL_NUM_WARPS})
