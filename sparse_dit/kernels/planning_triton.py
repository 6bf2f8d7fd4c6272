"""Fused Triton kernels for the dynamic patterns' planning (k-means assignment + centroid sums, prune key scores).

Everything here is launched without a host synchronisation: shapes depend only on the inputs' shapes, never on
values, and results stay on the device. The PyTorch functions in ``sparse_dit/patterns/kmeans.py`` and ``sparse_dit/patterns/prune.py``
are the reference these kernels are tested against (tests/test_planning_triton.py, under the interpreter).

Inputs are read in place from diffusers' ``(B, S, h, D)`` layout (any strides), so planning makes no fp32 copy of
the tokens and never holds a (tokens x clusters) or (samples x keys) matrix in memory: distances and logits live
in registers, one tile at a time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_attention import _build_chunk_tables

__all__ = ["kmeans_step", "kmeans_lloyd", "prune_scores"]


# ------------------------------------------------------------------------------------------------- k-means
# How `_lloyd` forms the new centroids (the module's one default; `_lloyd(update=...)` overrides it per call):
# "atomic": the assignment kernel adds each token's D-vector into its cluster's fp32 sum (D atomics per token);
# "segment": it only counts (one int32 atomic per token, whose returned old count is the token's rank in its
# cluster), then the tokens are grouped by cluster (prefix sum + scatter) and one program per cluster sums its rows.
# Measured on the H200 at Wan 480p (benchmarks/results/planning.md, 2026-12-03): "segment" takes 12% less GPU time
# per warm plan (1.53 vs 1.75 ms) but 0.6 ms more host time (2 more launches per Lloyd step and their torch ops);
# "atomic" stays the default until an end-to-end run shows which of the two a pipeline feels.
CENTROID_UPDATE = "atomic"
# Assignment tile (BLOCK_S tokens x BLOCK_C centroids) and its warps. 128 x 64 with 8 warps: one Lloyd step 8% faster
# than 64 x 64 x 4 for both query (128 clusters) and key (512) tokens on the H200 at Wan 480p; wider centroid
# tiles were 15-50% slower (planning.md, `--lloyd-blocks`). Re-checked on 2026-12-04 after the relaxed atomics and the
# one-reduction argmin: still the fastest for key tokens at both Wan shapes (720p: 2.96 ms against 3.10-3.23 ms for
# 128x32x4, 64x64x4, 64x32x4), within 5% of the best for query tokens.
ASSIGN_BLOCKS = {"block_s": 128, "block_c": 64, "num_warps": 8}
# Memory order of the assignment kernel's atomics ("relaxed"; "acq_rel", Triton's default, only for the benchmark's
# before/after rows)
ATOMIC_SEM = "relaxed"
# Rows gathered per step by the segment kernel, and its warps.
SEGMENT_BLOCKS = {"block_m": 64, "num_warps": 4}


@triton.jit
def _assign_accumulate_kernel(
    X, CENT, CSQ, LABELS, SUMS, COUNTS, RANKS,
    S, NUM_C, h,
    sx_b, sx_s, sx_h, sx_d,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACCUMULATE: tl.constexpr,
    ATOMIC_SEM: tl.constexpr,
):
    """One program: BLOCK_S tokens of problem n = b * h + head. Nearest centroid by ``||c||^2 - 2 x.c`` (the
    ``||x||^2`` term does not change the argmin), scanning the centroids BLOCK_C at a time with a running
    (min, argmin) so distances never leave registers. ACCUMULATE: the token is added to its cluster's sum and count
    (atomics: clusters are scattered over the sequence, a sort would cost more than the contention). Else only the
    count is incremented, and the count before the increment -- unique per token of a cluster -- goes to RANKS
    (N, S), the token's slot in its cluster's range of the grouped order (SUMS is not touched)."""
    pid_s = tl.program_id(0)
    n = tl.program_id(1)
    b = n // h
    head = n % h
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    d_ok = offs_d < D
    x_ptr = X + b.to(tl.int64) * sx_b + head.to(tl.int64) * sx_h + offs_s[:, None].to(tl.int64) * sx_s + offs_d[None, :] * sx_d
    x = tl.load(x_ptr, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    best = tl.full((BLOCK_S,), float("inf"), tl.float32)
    arg = tl.zeros((BLOCK_S,), tl.int32)
    cent_base = CENT + n.to(tl.int64) * NUM_C * D
    # (a running minimum kept per (token, centroid slot) with one argmin at the end was 15-40% slower on the H200,
    # 2026-12-04, planning.md: the per-tile argmin's shuffles cost less than the extra registers)
    for t in range(0, tl.cdiv(NUM_C, BLOCK_C)):
        c0 = t * BLOCK_C
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < NUM_C
        cen = tl.load(cent_base + offs_c[:, None] * D + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        csq = tl.load(CSQ + n * NUM_C + offs_c, mask=c_ok, other=float("inf"))
        dot = tl.dot(x, tl.trans(cen))  # (BLOCK_S, BLOCK_C) fp32 accumulation
        dist = csq[None, :] - 2.0 * dot  # a padded slot: inf - 2 * 0 = inf, never below a real distance
        m, a = tl.min(dist, 1, return_indices=True, return_indices_tie_break_left=True)  # one reduction for both
        upd = m < best  # strict: on a tie across tiles the earlier centroid wins, as torch.argmin does
        best = tl.where(upd, m, best)
        arg = tl.where(upd, a + c0, arg)
    # a row of NaN distances (NaN activations) could name a padded slot: keep every label a valid cluster id, since
    # the atomics below index by it
    arg = tl.minimum(arg, NUM_C - 1)
    tl.store(LABELS + n.to(tl.int64) * S + offs_s, arg, mask=s_ok)
    slot = n.to(tl.int64) * NUM_C + arg
    if ACCUMULATE:
        # relaxed: nothing in this kernel reads what the atomics write, and the next kernel sees them all; the default
        # acq_rel put a memory barrier around each of the D atomics per token and returned values never read (ATOMG;
        # relaxed and unused: REDG), which was most of a Lloyd step's fixed cost per token
        tl.atomic_add(SUMS + slot[:, None] * D + offs_d[None, :], x.to(tl.float32), mask=s_ok[:, None] & d_ok[None, :],
                      sem=ATOMIC_SEM)
        tl.atomic_add(COUNTS + slot, tl.full((BLOCK_S,), 1, tl.int32), mask=s_ok, sem=ATOMIC_SEM)
    else:
        # a token held by several threads (the argmin's slice layout) gets its one atomic's result on every copy only
        # since triton broadcasts it (triton-lang/triton#7460, 3.5+); the benchmark's lloyd rows check the ranks
        rank = tl.atomic_add(COUNTS + slot, tl.full((BLOCK_S,), 1, tl.int32), mask=s_ok, sem=ATOMIC_SEM)
        tl.store(RANKS + n.to(tl.int64) * S + offs_s, rank, mask=s_ok)


@triton.jit
def _scatter_kernel(LABELS, RANKS, ENDS, COUNTS, ORDER, S, NUM_C, BLOCK_S: tl.constexpr):
    """BLOCK_S tokens of problem n (grid (cdiv(S, BLOCK_S), N)): token s goes to ORDER[n, start(label) + rank],
    start = the exclusive prefix sum of the counts (ENDS inclusive minus COUNTS), so ORDER (N, S) lists the tokens
    grouped by cluster. The ranks came from the counting atomics: no atomic here, no sort."""
    pid_s = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = offs_s < S
    lab = tl.load(LABELS + n * S + offs_s, mask=ok, other=0)
    rank = tl.load(RANKS + n * S + offs_s, mask=ok, other=0)
    slot = n * NUM_C + lab
    count = tl.load(COUNTS + slot, mask=ok, other=0)
    start = tl.load(ENDS + slot, mask=ok, other=0) - count
    # a rank outside [0, count) could only come from a Triton that does not broadcast atomic results (refused in
    # `_lloyd`); the mask keeps such a value from writing outside the problem's row of ORDER
    tl.store(ORDER + n * S + start + rank, offs_s, mask=ok & (rank >= 0) & (rank < count))


@triton.jit
def _segment_centroid_kernel(
    X, ORDER, ENDS, COUNTS, CENT, CENT_LP, CSQ, SIZES,
    S, NUM_C, h,
    sx_b, sx_s, sx_h, sx_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (cluster c, problem n): the fp32 sum of its members' rows of x, gathered BLOCK_M at a time
    through its range of ORDER, gives the new centroid (the mean; the old one where the cluster is empty), written
    in place over CENT with its size to SIZES and COUNTS zeroed for the next assignment; then, as
    `_centroid_kernel`, the copy rounded to x's dtype (CENT_LP) and its squared norm (CSQ). Each cluster's sum has
    one owner, so no atomics; the loop runs over the cluster's own size (a large cluster is a long program)."""
    c = tl.program_id(0)
    n = tl.program_id(1)
    b = n // h
    head = n % h
    slot = n.to(tl.int64) * NUM_C + c
    cnt = tl.load(COUNTS + slot)
    start = tl.load(ENDS + slot) - cnt
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = X + b.to(tl.int64) * sx_b + head.to(tl.int64) * sx_h
    order_base = ORDER + n.to(tl.int64) * S + start
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for m0 in range(0, cnt, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < cnt
        tok = tl.load(order_base + offs_m, mask=m_ok, other=0)
        # a bad entry (only if the ranks were wrong) must not read outside x: it shows as a wrong mean instead
        tok = tl.minimum(tl.maximum(tok, 0), S - 1).to(tl.int64)
        rows = tl.load(x_base + tok[:, None] * sx_s + offs_d[None, :] * sx_d, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += rows.to(tl.float32)
    sums = tl.sum(acc, 0)
    ptr = slot * D + offs_d
    old = tl.load(CENT + ptr, mask=d_ok, other=0.0)
    cent = tl.where(cnt > 0, sums / tl.maximum(cnt, 1).to(tl.float32), old)
    tl.store(CENT + ptr, cent, mask=d_ok)
    tl.store(SIZES + slot, cnt)
    tl.store(COUNTS + slot, cnt * 0)
    lp = cent.to(CENT_LP.dtype.element_ty)
    tl.store(CENT_LP + ptr, lp, mask=d_ok)
    lpf = lp.to(tl.float32)
    tl.store(CSQ + slot, tl.sum(lpf * lpf, 0))


@triton.jit
def _centroid_kernel(
    SUMS, COUNTS, CENT, CENT_LP, CSQ, SIZES, NC,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, UPDATE: tl.constexpr,
):
    """BLOCK_R centroids per program. UPDATE: the new centroid is its cluster's mean (the old one where the cluster
    is empty), written in place over CENT (fp32); the cluster sizes go to SIZES and SUMS/COUNTS are zeroed for the
    next assignment. Always: the centroids rounded to x's dtype (CENT_LP, what the distance GEMM reads) and their
    squared norms (CSQ, of the rounded values). One launch replaces ~10 small torch ops per Lloyd iteration."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < NC
    ok = r_ok[:, None] & (offs_d[None, :] < D)
    ptr = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    cent = tl.load(CENT + ptr, mask=ok, other=0.0)
    if UPDATE:
        cnt = tl.load(COUNTS + rows, mask=r_ok, other=0)
        sums = tl.load(SUMS + ptr, mask=ok, other=0.0)
        mean = sums / tl.maximum(cnt, 1).to(tl.float32)[:, None]
        cent = tl.where(cnt[:, None] > 0, mean, cent)
        tl.store(CENT + ptr, cent, mask=ok)
        tl.store(SIZES + rows, cnt, mask=r_ok)
        tl.store(COUNTS + rows, tl.zeros_like(cnt), mask=r_ok)
        tl.store(SUMS + ptr, tl.zeros_like(sums), mask=ok)
    lp = cent.to(CENT_LP.dtype.element_ty)
    tl.store(CENT_LP + ptr, lp, mask=ok)
    lpf = lp.to(tl.float32)
    tl.store(CSQ + rows, tl.sum(lpf * lpf, 1), mask=r_ok)


def _centroids(sums, counts, cent, cent_lp, csq, sizes, update: bool) -> None:
    n, D = cent.shape[0] * cent.shape[1], cent.shape[2]
    bd = max(16, triton.next_power_of_2(D))
    br = 16
    _centroid_kernel[(triton.cdiv(n, br),)](sums, counts, cent, cent_lp, csq, sizes, n, D=D, BLOCK_D=bd, BLOCK_R=br, UPDATE=update)


def _triton_version() -> tuple[int, ...]:
    from packaging.version import Version  # as calibrate.py reads diffusers' version (packaging comes with diffusers)

    return Version(triton.__version__).release[:2]


def _lloyd(
    x: torch.Tensor,
    init: torch.Tensor,
    iters: int,
    update: str | None = None,
    block_s: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
    block_m: int | None = None,
    atomic_sem: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations: x (B, S, h, D), init (N, C, D) (not modified). ``update`` (default
    `CENTROID_UPDATE`): "atomic", 1 + 2 * iters launches; "segment", 1 + 4 * iters (assign + count, prefix sum,
    scatter, segment sums + update). The block sizes default to `ASSIGN_BLOCKS` / `SEGMENT_BLOCKS`."""
    B, S, h, D = x.shape
    N, C, Dc = init.shape
    if N != B * h or Dc != D:
        raise ValueError(f"kmeans_step: centroids {tuple(init.shape)} do not fit x {tuple(x.shape)}")
    update = CENTROID_UPDATE if update is None else update
    if update not in ("atomic", "segment"):
        raise ValueError(f"kmeans: centroid update {update!r}, expected 'atomic' or 'segment'")
    if update == "segment" and _triton_version() < (3, 5):
        raise RuntimeError(f"kmeans: the 'segment' centroid update needs triton >= 3.5 (atomic results broadcast to "
                           f"every thread); this is {triton.__version__}: use 'atomic' or upgrade triton")
    bs = ASSIGN_BLOCKS["block_s"] if block_s is None else int(block_s)
    bc = ASSIGN_BLOCKS["block_c"] if block_c is None else int(block_c)
    warps = ASSIGN_BLOCKS["num_warps"] if num_warps is None else int(num_warps)
    bm = SEGMENT_BLOCKS["block_m"] if block_m is None else int(block_m)
    sem = ATOMIC_SEM if atomic_sem is None else atomic_sem
    if sem not in ("relaxed", "acq_rel"):
        raise ValueError(f"kmeans: atomic_sem {sem!r}, expected 'relaxed' or 'acq_rel'")
    bd = max(16, triton.next_power_of_2(D))
    dev = x.device
    segment = update == "segment"
    cent = torch.empty(N, C, D, dtype=torch.float32, device=dev)
    cent.copy_(init)  # updated in place
    cent_lp = torch.empty(N, C, D, dtype=x.dtype, device=dev)
    csq = torch.empty(N, C, dtype=torch.float32, device=dev)
    labels = torch.empty(N, S, dtype=torch.int32, device=dev)
    counts = torch.zeros(N, C, dtype=torch.int32, device=dev)
    sizes = torch.empty(N, C, dtype=torch.int32, device=dev)
    if segment:  # int32 work space of 2 * N * S + N * C instead of the fp32 sums' N * C * D
        ranks = torch.empty(N, S, dtype=torch.int32, device=dev)
        order = torch.empty(N, S, dtype=torch.int32, device=dev)
        ends = torch.empty(N, C, dtype=torch.int32, device=dev)
        sums = counts  # not read: the kernel's SUMS argument is dead when ACCUMULATE is off
    else:
        sums = torch.zeros(N, C, D, dtype=torch.float32, device=dev)
        ranks = labels  # likewise dead
    grid = (triton.cdiv(S, bs), N)
    strides = x.stride()
    _centroids(sums, counts, cent, cent_lp, csq, sizes, False)
    for _ in range(max(1, int(iters))):
        _assign_accumulate_kernel[grid](
            x, cent_lp, csq, labels, sums, counts, ranks, S, C, h, *strides,
            D=D, BLOCK_S=bs, BLOCK_C=bc, BLOCK_D=bd, ACCUMULATE=not segment, ATOMIC_SEM=sem, num_warps=warps,
        )
        if segment:
            torch.cumsum(counts, 1, dtype=torch.int32, out=ends)  # on the device: no value reaches the host
            _scatter_kernel[(triton.cdiv(S, 256), N)](labels, ranks, ends, counts, order, S, C, BLOCK_S=256)
            _segment_centroid_kernel[(C, N)](
                x, order, ends, counts, cent, cent_lp, csq, sizes, S, C, h, *strides,
                D=D, BLOCK_M=bm, BLOCK_D=bd, num_warps=SEGMENT_BLOCKS["num_warps"],
            )
        else:
            _centroids(sums, counts, cent, cent_lp, csq, sizes, True)
    return cent, labels, sizes


def kmeans_step(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd iteration of B * h problems: x (B, S, h, D) any strides/dtype, centroids (B * h, C, D).

    Returns (new centroids (N, C, D) float32 -- the means of the new clusters, the old centroid where a cluster is
    empty --, labels (N, S) int32, sizes (N, C) int32). The distance GEMM runs in x's dtype (bf16 distances only
    decide near-ties; the means are accumulated in fp32)."""
    return _lloyd(x, centroids, 1)


def kmeans_lloyd(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations from ``init`` (N, C, D): x (B, S, h, D). A fixed count, no convergence test (that
    test would read a value on the host). Returns centroids (N, C, D) float32, labels (N, S) int32, sizes (N, C).
    Per iteration two launches (assignment + sums, then the centroid update that also zeroes the sums for the next
    one), plus one to round the initial centroids; with `CENTROID_UPDATE` = "segment" four (assignment + counts,
    a device prefix sum, the scatter by cluster, the per-cluster sums + update). No value is read on the host."""
    return _lloyd(x, init, iters)


# --------------------------------------------------------------------------------------------------- prune
@triton.jit
def _sampled_logits(
    Q, K, ROWS, V, M, h, qk_scale, sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The program's (key block, problem) tile: (BLOCK_M, BLOCK_K) base-2 logits of the sampled queries against
    BLOCK_K keys, with the problem index, the sampled-row offsets and both validity masks."""
    kb = tl.program_id(0)
    n = tl.program_id(1)
    b = n // h
    head = n % h
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    k_ok = offs_k < V
    d_ok = offs_d < D
    rows = tl.load(ROWS + offs_m, mask=m_ok, other=0).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * sq_b + head * sq_h + rows[:, None] * sq_s + offs_d[None, :] * sq_d, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(K + b.to(tl.int64) * sk_b + head * sk_h + offs_k[:, None].to(tl.int64) * sk_s + offs_d[None, :] * sk_d, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    return s, n, kb, offs_m, offs_k, m_ok, k_ok


@triton.jit
def _prune_stats_kernel(
    Q, K, ROWS, MAX, SUM,
    V, M, h, nkb, qk_scale,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1, one program per (key block, problem): each sampled query's max logit and sum of exp over these keys
    (base 2), written to (N, nkb, M) partials; the logits are never stored."""
    s, n, kb, offs_m, offs_k, m_ok, k_ok = _sampled_logits(
        Q, K, ROWS, V, M, h, qk_scale, sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, D, BLOCK_M, BLOCK_K, BLOCK_D
    )
    s = tl.where(k_ok[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    sm = tl.sum(tl.exp2(s - mx[:, None]), 1)
    out = (n.to(tl.int64) * nkb + kb) * M + offs_m
    tl.store(MAX + out, mx, mask=m_ok)
    tl.store(SUM + out, sm, mask=m_ok)


@triton.jit
def _prune_scores_kernel(
    Q, K, ROWS, MAX, LSUM, OUT,
    V, M, h, qk_scale, inv_m,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2: score_j = mean_i exp2(s_ij - max_i) / sum_i over the sampled queries i, for BLOCK_K keys."""
    s, n, kb, offs_m, offs_k, m_ok, k_ok = _sampled_logits(
        Q, K, ROWS, V, M, h, qk_scale, sq_b, sq_s, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, D, BLOCK_M, BLOCK_K, BLOCK_D
    )
    mx = tl.load(MAX + n * M + offs_m, mask=m_ok, other=0.0)
    ls = tl.load(LSUM + n * M + offs_m, mask=m_ok, other=1.0)
    p = tl.exp2(s - mx[:, None]) / ls[:, None]
    p = tl.where(m_ok[:, None], p, 0.0)
    tl.store(OUT + n.to(tl.int64) * V + offs_k, tl.sum(p, 0) * inv_m, mask=k_ok)


@triton.jit
def _prune_combine_kernel(MAX, SUM, OUT_MAX, OUT_SUM, nkb, M, BLOCK_M: tl.constexpr, BLOCK_KB: tl.constexpr):
    """One program per problem: the (nkb, M) partial softmax statistics of pass 1 folded into each sampled row's
    max and sum (online rescaling), so pass 2 reads M values instead of a torch amax / exp2 / sum chain."""
    n = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, nkb, BLOCK_KB):
        offs_k = k0 + tl.arange(0, BLOCK_KB)
        ok = (offs_k[:, None] < nkb) & m_ok[None, :]
        ptr = (n * nkb + offs_k[:, None]) * M + offs_m[None, :]
        mx = tl.load(MAX + ptr, mask=ok, other=float("-inf"))
        sm = tl.load(SUM + ptr, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(mx, 0))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - safe) + tl.sum(sm * tl.exp2(mx - safe[None, :]), 0)
        run_max = new_max
    tl.store(OUT_MAX + n * M + offs_m, run_max, mask=m_ok)
    tl.store(OUT_SUM + n * M + offs_m, run_sum, mask=m_ok)


_ROWS: dict = {}


def _sample_rows(V: int, m: int, device: torch.device) -> torch.Tensor:
    """The reference's evenly strided sample rows, built once per (V, m, device) (three torch ops per call before)."""
    key = (V, m, str(device))
    rows = _ROWS.get(key)
    if rows is None:
        rows = _ROWS[key] = torch.linspace(0, V - 1, m, device=device).round().to(torch.int32)
    return rows


def prune_scores(q: torch.Tensor, k: torch.Tensor, sample_queries: int = 64) -> torch.Tensor:
    """AT-EDM-style key importance ``mean_i softmax_j(q_i . k_j / sqrt(D))`` over ``sample_queries`` evenly strided
    queries: q, k (B, V, h, D) video tokens, any strides -> (B, h, V) float32. Two passes over the keys (row
    statistics, then the normalised column sums); nothing of size (samples x keys) is stored."""
    B, V, h, D = k.shape
    N = B * h
    m = min(int(sample_queries), V)
    rows = _sample_rows(V, m, q.device)  # same rows as the reference
    bm = max(16, triton.next_power_of_2(m))
    if bm > 128:
        raise ValueError(f"prune_scores: sample_queries up to 128 in the Triton path; got {sample_queries}")
    bk = 64
    bd = max(16, triton.next_power_of_2(D))
    nkb = triton.cdiv(V, bk)
    qk_scale = 1.0 / math.sqrt(D) * 1.4426950408889634  # exp2 domain
    pmax = torch.empty(N, nkb, m, dtype=torch.float32, device=q.device)
    psum = torch.empty(N, nkb, m, dtype=torch.float32, device=q.device)
    args = (*q.stride(), *k.stride())
    _prune_stats_kernel[(nkb, N)](q, k, rows, pmax, psum, V, m, h, nkb, qk_scale, *args, D=D, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
    row_max = torch.empty(N, m, dtype=torch.float32, device=q.device)
    row_sum = torch.empty(N, m, dtype=torch.float32, device=q.device)
    _prune_combine_kernel[(N,)](pmax, psum, row_max, row_sum, nkb, m, BLOCK_M=bm, BLOCK_KB=32)
    out = torch.empty(N, V, dtype=torch.float32, device=q.device)
    _prune_scores_kernel[(nkb, N)](
        q, k, rows, row_max, row_sum, out, V, m, h, qk_scale, 1.0 / m, *args,
        D=D, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd,
    )
    return out.view(B, h, V)


# ------------------------------------------------------------------------------------- kernel chunk tables
@triton.jit
def _cover_tables_kernel(
    COVER, COUNT, SEG_S, SEG_E, NFULL, FULL, NPART, PS, PE,
    NC, V, G, CF,
    ALIGN: tl.constexpr, BN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_F: tl.constexpr,
    TABLES: tl.constexpr,
):
    """One program per (problem, query block) row of ``COVER`` (rows, NC) bool, the ALIGN-token chunks of the key
    order that row attends. Writes its segments (runs of kept chunks: count, start, end in tokens, zero past the
    count) and the attention kernel's chunk tables for BLOCK_N = BN (BN divides ALIGN): every BN-chunk of a kept
    chunk that ends by V is a full chunk, in ascending order; the one possible tail is the end of the order."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < NC
    base = COVER + r * NC
    kept = tl.load(base + offs, mask=ok, other=0).to(tl.int32)
    prev = tl.load(base + offs - 1, mask=ok & (offs > 0), other=0).to(tl.int32)
    nxt = tl.load(base + offs + 1, mask=(offs + 1) < NC, other=0).to(tl.int32)
    is_s = kept * (1 - prev)
    is_e = kept * (1 - nxt)
    rank_s = tl.cumsum(is_s, 0) - 1
    rank_e = tl.cumsum(is_e, 0) - 1
    count = tl.sum(is_s, 0)
    tl.store(SEG_S + r * G + rank_s, offs * ALIGN, mask=is_s > 0)
    tl.store(SEG_E + r * G + rank_e, tl.minimum((offs + 1) * ALIGN, V), mask=is_e > 0)
    og = tl.arange(0, BLOCK_G)
    zero_g = (og >= count) & (og < G)
    tl.store(SEG_S + r * G + og, tl.zeros_like(og), mask=zero_g)
    tl.store(SEG_E + r * G + og, tl.zeros_like(og), mask=zero_g)
    tl.store(COUNT + r, count)
    if TABLES:
        # full BN-chunks: chunk j holds (min(V, (j + 1) * ALIGN) - j * ALIGN) // BN of them
        nf = kept * ((tl.minimum((offs + 1) * ALIGN, V) - offs * ALIGN) // BN)
        first = tl.cumsum(nf, 0) - nf
        n_full = tl.sum(nf, 0)
        for i in tl.static_range(ALIGN // BN):
            tl.store(FULL + r * CF + first + i, offs * ALIGN + i * BN, mask=(i < nf) & ok)
        for f0 in range(0, CF, BLOCK_F):
            of = f0 + tl.arange(0, BLOCK_F)
            tl.store(FULL + r * CF + of, tl.zeros_like(of), mask=(of >= n_full) & (of < CF))
        tl.store(NFULL + r, n_full)
        last_kept = tl.load(base + NC - 1).to(tl.int32)
        tail = tl.where(V % BN != 0, last_kept, 0)
        tl.store(NPART + r, tail)
        tl.store(PS + r, tail * ((V // BN) * BN))
        tl.store(PE + r, tail * V)


def cover_tables(cover: torch.Tensor, seq: int, align: int, block_n: int | None) -> tuple:
    """Segments and (when ``block_n`` divides ``align``) the attention kernel's chunk tables of chunk-snapped key
    selections, in one launch: cover (..., NQ, NC) bool, chunk c = tokens [c * align, min(seq, (c + 1) * align)).

    Returns (count (..., NQ), start, end (..., NQ, G) int32 with G = ceil(NC / 2), chunk tables or None): the same
    segments as ``patterns.kmeans._aligned_segments_fixed`` and the same tables as `chunk_tables` (full-chunk width
    ``max(1, seq // block_n)``, one tail), all int32, with no temporary beyond the outputs. The key order must hold
    no padding slot (every full chunk is clean: ``n_clean`` is ``n_full``)."""
    *lead, NC = cover.shape
    R = math.prod(lead)
    G = max(1, (NC + 1) // 2)
    dev = cover.device
    bn = block_n if block_n is not None and align % block_n == 0 else align
    with_tables = bn == block_n
    CF = max(1, seq // bn)
    i32 = dict(dtype=torch.int32, device=dev)
    count, n_full, n_part = (torch.empty(R, **i32) for _ in range(3))
    seg_s, seg_e = torch.empty(R, G, **i32), torch.empty(R, G, **i32)
    if with_tables:
        full, ps, pe = torch.empty(R, CF, **i32), torch.empty(R, 1, **i32), torch.empty(R, 1, **i32)
    else:  # segments only (TABLES=False: the table pointers are not touched)
        full = ps = pe = n_full
    if R:
        _cover_tables_kernel[(R,)](
            cover.contiguous(), count, seg_s, seg_e, n_full, full, n_part, ps, pe,
            NC, seq, G, CF,
            ALIGN=align, BN=bn, BLOCK_C=max(16, triton.next_power_of_2(NC)), BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_F=1024,
            TABLES=with_tables,
        )
    segs = (count.view(*lead), seg_s.view(*lead, G), seg_e.view(*lead, G))
    if not with_tables:
        return (*segs, None)
    nf = n_full.view(*lead)
    return (*segs, (nf, nf, full.view(*lead, CF), n_part.view(*lead), ps.view(*lead, 1), pe.view(*lead, 1)))


def chunk_tables(
    layout, block_n: int, device: torch.device | str | None = None, max_tails: int | None = None
) -> tuple[torch.Tensor, ...]:
    """The attention kernel's chunk tables (``triton_attention._build_chunk_tables``'s six tensors, same meaning and
    order of entries) with fixed widths instead of the largest count, so building them reads nothing on the host:
    full chunks ``max(1, K // block_n)`` (disjoint segments of a K-key order hold at most that many), tails
    ``max_tails`` (default ``G``: at most one per segment; a planner that knows a smaller bound passes it, e.g. 1
    for segments snapped to multiples of block_n, whose only possible tail is the end of the key order). Entries
    past the counts are 0, as there."""
    device = layout.device if device is None else torch.device(device)
    G = layout.kv_start.shape[-1]
    tails = G if max_tails is None or max_tails >= G else max(1, max_tails)
    return _build_chunk_tables(layout, block_n, device, full_width=max(1, layout.kv_order_len // block_n), tail_width=tails)


def single_segment_tables(L: int, H: int, NQ: int, K: int, block_n: int, device) -> tuple[torch.Tensor, ...]:
    """`chunk_tables` of a layout where every query block attends the one segment ``[0, K)`` of a key order without
    padding (prune's), from host integers: six small fills instead of the generic builder's ~40 ops."""
    n_full, tail = K // block_n, K % block_n
    cf = max(1, K // block_n)
    i32 = dict(dtype=torch.int32, device=device)
    full = torch.full((L, H, NQ), n_full, **i32)
    starts = (torch.arange(cf, **i32) * block_n) if n_full else torch.zeros(1, **i32)
    part = torch.full((L, H, NQ), 1 if tail else 0, **i32)
    ps = torch.full((L, H, NQ, 1), n_full * block_n if tail else 0, **i32)
    pe = torch.full((L, H, NQ, 1), K if tail else 0, **i32)
    return full, full, starts.expand(L, H, NQ, cf).contiguous(), part, ps, pe


def attention_block_n(block_q: int, dtype: torch.dtype, head_dim: int) -> int:
    """The attention kernel's default BLOCK_N for layouts of ``block_q``-row query blocks (the key it caches chunk
    tables under)."""
    from .triton_attention import default_config

    return int(default_config(head_dim, max(16, triton.next_power_of_2(block_q)), dtype)["BLOCK_N"])


def prime_chunk_tables(
    layout, dtype: torch.dtype, head_dim: int, device: torch.device | str | None = None, align: int | None = None
) -> None:
    """Put `chunk_tables` for the attention kernel's default BLOCK_N into ``layout``'s derived cache under the key
    the kernel looks up, so the kernel launch after a dynamic plan does not build them with a host sync. (A call
    with another BLOCK_N, e.g. a benchmark's config override, still builds its own.)"""
    from .triton_attention import default_config

    device = layout.device if device is None else torch.device(device)
    block_m = max(16, triton.next_power_of_2(layout.block_q))
    block_n = int(default_config(head_dim, block_m, dtype)["BLOCK_N"])
    tails = 1 if align is not None and align % block_n == 0 else None
    layout.cached(("triton_chunks", block_n, str(device)), lambda: chunk_tables(layout, block_n, device, tails))
