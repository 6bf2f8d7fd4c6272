"""Semantic-aware permutation (after Sparse VideoGen2, Yang et al. 2025): k-means clusters of queries and keys.

Per head and batch element, the video queries and the video keys are clustered separately with
Lloyd's k-means (batched over every (batch, head) problem at once in torch, no Python loop over heads),
warm-started from the centroids of the previous call kept in ``state[b]`` (the caller keeps one
``state`` per layer and head group; this module keys it by batch index, so each batch element, e.g.
each CFG branch of a batched call, has its own centroids). Tokens are sorted by cluster (stable, so a
cluster keeps raster order), which gives ``q_perm`` and ``kv_perm``.

Key cluster selection, per query cluster: ``p_c ∝ |c| * exp(q̄ · k̄_c / sqrt(D))`` (the size-weighted
centroid-score softmax, an estimate of the attention mass the cluster receives); clusters are kept in
decreasing ``p`` until their cumulative mass reaches ``top_p`` and until they hold at least
``min_fraction`` of the video keys.

Key segments (``kv_align``): with exact segments (``kv_align=1``) every kept key cluster is one
variable-length segment of the key order (adjacent kept clusters merged). A cluster averages 64 keys and
rarely starts on a chunk boundary, so the kernel, which computes keys in chunks of 64-128, spends
~35% of its work on masked slots and runs every cluster's tail through its slower masked path (measured:
k-means layouts ran at ~40% of tile's rate per unit of density on an H100, benchmarks/results/e2e.md).
By default (``kv_align=None``: the query block size) segments are snapped outward to ``kv_align``-token
chunks of the sorted key order: a chunk is computed when any kept cluster overlaps it. The keys added are
real attention (never less accurate than the exact selection) and the chunks are full; the selection
then counts whole chunks, so ``min_fraction``/``top_p`` give a somewhat higher density than exact segments.

Queries (``q_mode``): query blocks are fixed-size runs of the query order, and a cluster rarely fills
whole blocks. Two answers:

- ``"union"`` (default): no query padding; a query block attends the union of the key clusters that
  the query clusters it contains need. Every row gets at least its own cluster's keys (never less
  accurate) and no row slot is wasted. With the default ~256 queries per cluster and blocks of 128 a
  block meets one or two clusters, and neighbouring clusters in the sort often want the same keys, so
  the union costs a few percent of density where padding would cost ~block/2 dead rows per cluster
  (~25% more query rows at 128-token blocks and 256-token clusters).
- ``"pad"``: each query cluster starts a new block and is padded to a block multiple with -1 slots;
  each block attends exactly its cluster's selection. Better when clusters are much larger than a block.

Parameters: ``q_clusters``/``k_clusters`` (counts; default ``V / q_tokens_per_cluster`` and
``V / k_tokens_per_cluster``, 256 and 64 tokens per cluster, i.e. 128/512 clusters at Wan 480p and
295/1181 at 720p, in SVG2's range), ``top_p`` in (0, 1] (default 0.9), ``min_fraction`` in [0, 1]
(default 0.05), ``iters`` (max Lloyd iterations, default 16), ``tol`` (stop when at most this fraction of
tokens changes cluster, default 1e-3), ``warm_iters`` (max Lloyd iterations when warm-started, default 2:
it bounds the per-call cost; measured on an H100 in benchmarks/results/patterns.md), ``q_mode``,
``seed`` (the cold start's random tokens), ``kv_align`` (above), ``record``.

``state[b]`` keeps the centroids (warm start; in the activations' dtype when it is fp16/bf16) and ``iters``
(q, k). With ``record=True`` (inspection and tests; off by default because per layer it holds ~40 MB at 720p)
it also holds the last call's
``q_labels``/``k_labels`` (h, V) cluster ids per video token (raster order) and ``keep`` (h, Cq, Ck) bool.
Text tokens are not clustered: they attend and are attended densely (``dense_q``, ``text_kv``).

Planners (``build(..., planner=)``, not a pattern parameter). On a CUDA GPU with triton the fused kernels of
``sparse_dit.kernels.planning_triton`` plan without a host synchronisation: one kernel per Lloyd iteration does the
distance GEMM, the argmin and the centroid sums (atomics, so the centroids' last bits vary run to run) straight from
the (B, S, h, D) activations, with no fp32 copy and no (tokens x clusters) matrix; warm calls run exactly
``warm_iters`` iterations (``tol`` is not tested: that would read a value on the host), two launches per iteration
(assignment + sums, then the centroid update; with ``planning_triton.CENTROID_UPDATE = "segment"`` the assignment
only counts, one int32 atomic per token instead of D fp32 ones, and a prefix sum, a scatter by cluster and one
program per cluster form the means: four launches); segment tables and the attention kernel's chunk tables have fixed,
data-independent widths (``Layout.compact`` trims layouts kept for ``replan_every > 1``). A layout whose key chunks
are a multiple of 128 keys, with no text tokens in the sequence, records that its kept keys are whole 128-key blocks
(`sparse_dit.kernels.fa4.WHOLE_KV_BLOCKS`), so the Gluon and FA4 engines convert it without a host read. With
chunk-snapped keys (the default ``kv_align``) the chunk cover is a prefix count over clusters (`_chunk_cover_fixed`) and one launch
(``planning_triton.cover_tables``) writes the segments and the kernel's chunk tables from it, all int32.

Memory of the fused plan (`fused_plan_bytes`, checked op by op in tests/test_planning_triton.py): what the layout
keeps is int32 orders (8 bytes per video token and head), the segment table (width ceil(NC / 2), NC = key chunks)
and the full-chunk table (width V / BLOCK_N): at Wan 480p (12 heads) 9.0 MiB, 9% of the 96 MiB attention output,
and at Wan 720p (40 heads) 130 MiB, 18% of 738 MiB; the centroids kept for the warm start (bf16) add 1.9 / 14.4
MiB. Planning's transients (bounded at 51 / 563 MiB) stay below the attention output, so the call peaks at output +
layout + state: <= 1.13x dense at 480p and <= 1.22x at 720p by the bound (measured before these changes on an
H200: 1.19x and 2.36x, the generic chunk-table builder's int64 (blocks x chunks) temporaries). The remaining
excess is the fixed table widths: a row attends a data-dependent number of chunks, and trimming to it needs the
host sync `Layout.compact` does. The PyTorch functions below are the reference and the CPU path; with ``tol=0``
both give the same layout (tests/test_planning_triton.py). Cold starts begin from the same random distinct tokens on
both (`init_rows`), then run ``iters`` Lloyd iterations.
"""

from __future__ import annotations

import math

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

from ._tiling import merge_segments, text_ranges

NAME = "kmeans"
STATIC = False
Q_MODES = ("union", "pad")
_ELEMS_BUDGET = 1 << 26  # distance-matrix elements per assignment chunk (256 MiB in fp32, 128 MiB in bf16)


# parameters that only choose clusters from the clustering (not the clustering itself): calibration candidates that
# differ only in these share one warm-start state
SELECTION_PARAMS = ("top_p", "min_fraction")


def check_params(
    geometry: Geometry | None,
    q_clusters: int | None = None,
    k_clusters: int | None = None,
    q_tokens_per_cluster: float = 256.0,
    k_tokens_per_cluster: float = 64.0,
    top_p: float = 0.9,
    min_fraction: float = 0.05,
    iters: int = 16,
    tol: float = 1e-3,
    q_mode: str = "union",
    seed: int = 0,
    warm_iters: int = 2,
    kv_align: int | None = None,
    record: bool = False,
) -> dict:
    """Normalise parameters; raise ValueError for out-of-range ones."""
    for name, v in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise ValueError(f"kmeans pattern: {name} must be a positive int or None; got {v!r}")
    for name, v in (("q_tokens_per_cluster", q_tokens_per_cluster), ("k_tokens_per_cluster", k_tokens_per_cluster)):
        if not float(v) >= 1:
            raise ValueError(f"kmeans pattern: {name} must be >= 1; got {v!r}")
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"kmeans pattern: top_p must lie in (0, 1]; got {top_p!r}")
    if not 0 <= float(min_fraction) <= 1:
        raise ValueError(f"kmeans pattern: min_fraction must lie in [0, 1]; got {min_fraction!r}")
    for name, v in (("iters", iters), ("warm_iters", warm_iters)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"kmeans pattern: {name} must be an int >= 1; got {v!r}")
    if not 0 <= float(tol) < 1:
        raise ValueError(f"kmeans pattern: tol must lie in [0, 1); got {tol!r}")
    if kv_align is not None and (isinstance(kv_align, bool) or int(kv_align) != kv_align or kv_align < 1):
        raise ValueError(f"kmeans pattern: kv_align must be an int >= 1 (1 = exact cluster segments) or None; got {kv_align!r}")
    if q_mode not in Q_MODES:
        raise ValueError(f"kmeans pattern: q_mode must be one of {Q_MODES}; got {q_mode!r}")
    return {
        "q_clusters": None if q_clusters is None else int(q_clusters),
        "k_clusters": None if k_clusters is None else int(k_clusters),
        "q_tokens_per_cluster": float(q_tokens_per_cluster),
        "k_tokens_per_cluster": float(k_tokens_per_cluster),
        "top_p": float(top_p),
        "min_fraction": float(min_fraction),
        "iters": int(iters),
        "tol": float(tol),
        "q_mode": q_mode,
        "seed": int(seed),
        "warm_iters": int(warm_iters),
        "kv_align": None if kv_align is None else int(kv_align),
        "record": bool(record),
    }


# ------------------------------------------------------------------------------------------ k-means
def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid: x (N, S, D), centroids (N, C, D) float -> labels (N, S) int64.

    Chunked over S so the (N, chunk, C) distance matrix stays within a fixed memory budget."""
    N, S, _ = x.shape
    C = centroids.shape[1]
    c_sq = (centroids * centroids).sum(-1)  # (N, C)
    if x.is_cuda:  # tensor-core GEMM: bf16 distances only decide near-ties, the means stay fp32
        x, centroids, c_sq = x.to(torch.bfloat16), centroids.to(torch.bfloat16), c_sq.to(torch.bfloat16)
    chunk = max(1, _ELEMS_BUDGET // max(1, N * C))
    out = torch.empty(N, S, dtype=torch.int64, device=x.device)
    for s in range(0, S, chunk):
        xs = x[:, s : s + chunk]
        dist = torch.baddbmm(c_sq[:, None, :], xs, centroids.transpose(1, 2), alpha=-2.0)  # ||c||^2 - 2 x.c
        out[:, s : s + chunk] = dist.argmin(-1)
    return out


def update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster: x (N, S, D), labels (N, S), centroids (N, C, D) (kept where a cluster is empty).

    Returns (centroids (N, C, D), sizes (N, C) int64)."""
    N, S, D = x.shape
    C = centroids.shape[1]
    flat = (labels + torch.arange(N, device=x.device)[:, None] * C).reshape(-1)
    sums = torch.zeros(N * C, D, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(-1, D))
    # scatter_add rather than bincount: no device-to-host sync
    sizes = torch.zeros(N * C, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat)).view(N, C)
    means = sums.view(N, C, D) / sizes.clamp(min=1)[..., None].to(x.dtype)
    return torch.where(sizes[..., None] > 0, means, centroids), sizes


def init_rows(num_tokens: int, num_clusters: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """(C,) int64: the distinct tokens whose vectors start a cold k-means (the same for every problem).

    Random distinct tokens (Forgy), drawn on ``device`` from a generator seeded with ``seed``: no host sync and one
    launch, where k-means++ seeding took one sampling pass per centroid (1.5 s per call at Wan 720p on an H200,
    ~120 s for the first sparse step of a generation). Measured on the reference model's activations (16 x 32 x 32
    tokens, every layer, 256 queries / 64 keys per cluster): after 16 Lloyd iterations the inertia is within 0.1% of
    k-means++'s (0.4-0.6% after 2); a strided pick over the raster order was 3% worse."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randperm(num_tokens, generator=gen, device=device)[:num_clusters]


def sample_init(x: torch.Tensor, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """Cold-start centroids of N problems at once: x (N, S, D) -> (N, C, D), C distinct tokens (`init_rows`)."""
    if not 1 <= num_clusters <= x.shape[1]:
        raise ValueError(f"k-means: num_clusters must be between 1 and the {x.shape[1]} points; got {num_clusters}")
    return x[:, init_rows(x.shape[1], num_clusters, seed, x.device)].clone()


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    iters: int = 16,
    tol: float = 1e-3,
    init: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Batched Lloyd k-means of N independent problems: x (N, S, D) float.

    init: (N, C, D) centroids to warm-start from (else C random distinct tokens, `sample_init`).
    Stops after ``iters`` assignments or once at most ``tol`` of the points of every problem change cluster.
    Returns centroids (N, C, D) (means of the final clusters), labels (N, S), sizes (N, C), iterations run.
    """
    N, S, D = x.shape
    C = int(num_clusters)
    if init is None:
        centroids = sample_init(x, C, seed)
    else:
        centroids = init.to(x.dtype)
    labels = None
    it = 0
    sizes = torch.zeros(N, C, dtype=torch.int64, device=x.device)
    for it in range(1, iters + 1):
        new = assign(x, centroids)
        centroids, sizes = update(x, new, centroids)
        # the convergence test syncs with the host: skip it on the last iteration, where it decides nothing
        done = labels is not None and it < iters and float((new != labels).float().mean(-1).max()) <= tol
        labels = new
        if done:
            break
    assert labels is not None
    return centroids, labels, sizes, it


def inertia(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) sum of squared distances of each point to its centroid."""
    return ((x - centroids.gather(1, labels[..., None].expand_as(x))) ** 2).sum((-1, -2))


# ---------------------------------------------------------------------------------------- selection
_SELECT_BUDGET = 1 << 22  # (query cluster, key cluster) pairs per selection chunk: ~40 B each of temporaries


def select_clusters(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    k_sizes: torch.Tensor,
    top_p: float,
    min_fraction: float,
    scale: float,
) -> torch.Tensor:
    """Key clusters kept per query cluster: (N, Cq, D), (N, Ck, D), (N, Ck) -> keep (N, Cq, Ck) bool.

    p ∝ size * exp(score); clusters in decreasing p until the mass before them reaches ``top_p`` and the
    keys before them reach ``min_fraction`` of all keys. Empty clusters are never kept. Problems are taken a few at
    a time so the sort's temporaries (~40 bytes per (query cluster, key cluster) pair) stay within
    ``_SELECT_BUDGET`` pairs (~160 MB; at Wan 720p, 40 heads x 295 x 1181 pairs, that is 4 chunks instead of
    ~560 MB at once); each problem's result does not depend on the chunking."""
    N, Cq, Ck = q_centroids.shape[0], q_centroids.shape[1], k_centroids.shape[1]
    if top_p >= 1.0:
        return (k_sizes > 0)[:, None, :].expand(-1, Cq, -1).clone()
    step = max(1, _SELECT_BUDGET // max(1, Cq * Ck))
    if step >= N:
        return _select(q_centroids, k_centroids, k_sizes, top_p, min_fraction, scale)
    keep = torch.empty(N, Cq, Ck, dtype=torch.bool, device=q_centroids.device)
    for n0 in range(0, N, step):
        sl = slice(n0, n0 + step)
        keep[sl] = _select(q_centroids[sl], k_centroids[sl], k_sizes[sl], top_p, min_fraction, scale)
    return keep


def _select(q_centroids, k_centroids, k_sizes, top_p: float, min_fraction: float, scale: float) -> torch.Tensor:
    nonempty = k_sizes > 0
    logits = torch.bmm(q_centroids.float(), k_centroids.float().transpose(1, 2)).mul_(scale)
    logits.add_(torch.log(k_sizes.float().clamp(min=1e-30))[:, None, :])
    logits.masked_fill_(~nonempty[:, None, :], float("-inf"))
    p = torch.softmax(logits, -1)
    del logits
    p_sorted, order = p.sort(-1, descending=True)
    del p
    keep_sorted = p_sorted.cumsum(-1).sub_(p_sorted) < top_p  # mass before each cluster
    del p_sorted
    sizes_sorted = k_sizes.to(torch.int32)[:, None, :].expand(-1, order.shape[1], -1).gather(-1, order)
    keys_before = sizes_sorted.cumsum(-1, dtype=torch.int32).sub_(sizes_sorted)
    total = k_sizes.sum(-1)[:, None, None].float()
    keep_sorted |= keys_before.float() < min_fraction * total
    del keys_before
    keep_sorted &= sizes_sorted > 0
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _cluster_counts(V: int, p: dict) -> tuple[int, int]:
    cq = p["q_clusters"] or max(1, round(V / p["q_tokens_per_cluster"]))
    ck = p["k_clusters"] or max(1, round(V / p["k_tokens_per_cluster"]))
    return min(cq, V), min(ck, V)


def _chunk_cover(keep: torch.Tensor, k_start: torch.Tensor, k_sizes: torch.Tensor, V: int, align: int) -> torch.Tensor:
    """(N, NQ, NC) bool: ``align``-token chunks of the sorted key order overlapped by a kept cluster.

    keep (N, NQ, Ck) kept clusters per query block, k_start / k_sizes (N, Ck) where each cluster sits in the key
    order (a difference array over chunk indices: no (blocks x keys) temporary)."""
    N, NQ, _ = keep.shape
    NC = -(-V // align)
    first = (k_start // align)[:, None, :].expand(-1, NQ, -1)
    last = ((k_start + k_sizes - 1).clamp(min=0) // align + 1)[:, None, :].expand(-1, NQ, -1)
    weight = keep.to(torch.int32)
    cover = torch.zeros(N, NQ, NC + 1, dtype=torch.int32, device=keep.device)
    cover.scatter_add_(-1, first, weight).scatter_add_(-1, last, -weight)
    return cover.cumsum(-1)[..., :NC] > 0


def _chunk_cover_fixed(keep: torch.Tensor, k_start: torch.Tensor, k_sizes: torch.Tensor, V: int, align: int) -> torch.Tensor:
    """`_chunk_cover` with less memory (the fused planner's): clusters sit in the key order in cluster order, so the
    clusters meeting chunk j are the run ``c_lo(j) .. c_hi(j)`` (found by searchsorted on the cluster ends, per
    problem, not per query block) and chunk j is kept when that run holds a kept non-empty cluster: a prefix count
    over clusters read at two points. Temporaries: one (N, NQ, Ck) prefix in int16 (int32 past 32767 clusters) and
    (N, NQ, NC) gathers, instead of int32 weights, an int32 difference array and its int64 cumsum."""
    N, NQ, Ck = keep.shape
    NC = -(-V // align)
    kept = keep & (k_sizes > 0)[:, None, :]
    k_end = (k_start + k_sizes).contiguous()
    first_tok = torch.arange(NC, device=keep.device) * align
    last_tok = (first_tok + align).clamp(max=V) - 1
    lo = torch.searchsorted(k_end, first_tok.expand(N, NC).contiguous(), right=True).clamp(max=Ck - 1)
    hi = torch.searchsorted(k_end, last_tok.expand(N, NC).contiguous(), right=True).clamp(max=Ck - 1)
    dt = torch.int16 if Ck < 2**15 else torch.int32
    prefix = kept.cumsum(-1, dtype=dt)  # (N, NQ, Ck): kept clusters up to and including c
    lo, hi = lo[:, None, :].expand(N, NQ, NC), hi[:, None, :].expand(N, NQ, NC)
    n = prefix.gather(-1, hi) - prefix.gather(-1, lo)
    del prefix
    return (n + kept.gather(-1, lo).to(dt)) > 0


def _aligned_segments(
    keep: torch.Tensor, k_start: torch.Tensor, k_sizes: torch.Tensor, V: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key segments snapped outward to ``align``-token chunks of the sorted key order (see `_chunk_cover`).

    Returns merge_segments' triple (its width is the largest count: one host sync)."""
    kept = _chunk_cover(keep, k_start, k_sizes, V, align)
    N, NQ, NC = kept.shape
    chunk = torch.arange(NC, device=keep.device) * align
    start = chunk.expand(N, NQ, NC)
    return merge_segments(start, (start + align).clamp(max=V), kept)


def _scatter_runs(
    starts: torch.Tensor, ends: torch.Tensor, start_val: torch.Tensor, end_val: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs given by start/end flags (..., n) bool -> count (...,), start, end (..., G) with the fixed capacity
    G = ceil(n / 2) (runs are separated by at least one gap), unused entries 0. No host sync: the width does not
    depend on the values."""
    n = starts.shape[-1]
    G = max(1, (n + 1) // 2)
    count = starts.sum(-1)
    shape = list(starts.shape[:-1]) + [G + 1]
    out_s = torch.zeros(shape, dtype=torch.int64, device=starts.device)
    out_e = torch.zeros(shape, dtype=torch.int64, device=starts.device)
    rank_s = torch.where(starts, starts.long().cumsum(-1) - 1, G)  # non-runs go to a dump column
    rank_e = torch.where(ends, ends.long().cumsum(-1) - 1, G)
    out_s.scatter_(-1, rank_s, torch.where(starts, start_val.expand_as(starts), 0))
    out_e.scatter_(-1, rank_e, torch.where(ends, end_val.expand_as(ends), 0))
    return count, out_s[..., :G], out_e[..., :G]


def _aligned_segments_fixed(
    keep: torch.Tensor, k_start: torch.Tensor, k_sizes: torch.Tensor, V: int, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_aligned_segments` without the host sync: width ceil(NC / 2); the same segments in the same order."""
    kept = _chunk_cover(keep, k_start, k_sizes, V, align)
    NC = kept.shape[-1]
    prev = torch.nn.functional.pad(kept, (1, 0))[..., :-1]
    nxt = torch.nn.functional.pad(kept, (0, 1))[..., 1:]
    chunk = torch.arange(NC, device=keep.device)
    return _scatter_runs(kept & ~prev, kept & ~nxt, chunk * align, ((chunk + 1) * align).clamp(max=V))


def _cluster_segments_fixed(
    keep: torch.Tensor, k_start: torch.Tensor, k_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact cluster segments (kv_align=1) without the host sync: kept non-empty clusters, neighbours in the key
    order merged (empty clusters between two kept ones take no room, so those touch), width ceil(Ck / 2).
    keep (N, NQ, Ck), k_start / k_sizes (N, Ck)."""
    N, NQ, Ck = keep.shape
    nonempty = k_sizes > 0
    kept = keep & nonempty[:, None, :]
    idx = torch.arange(Ck, device=keep.device).expand(N, Ck)
    # nearest non-empty cluster before / after each cluster (-1 / Ck when none)
    last_ne = torch.where(nonempty, idx, -1).cummax(-1).values
    prev_ne = torch.nn.functional.pad(last_ne[:, :-1], (1, 0), value=-1)
    next_ne = torch.where(nonempty, idx, Ck).flip(-1).cummin(-1).values.flip(-1)
    next_ne = torch.nn.functional.pad(next_ne[:, 1:], (0, 1), value=Ck)
    pad = torch.nn.functional.pad(kept, (0, 1))  # column Ck: "no cluster", never kept
    prev_kept = pad.gather(-1, torch.where(prev_ne < 0, Ck, prev_ne)[:, None, :].expand(-1, NQ, -1))
    next_kept = pad.gather(-1, next_ne[:, None, :].expand(-1, NQ, -1))
    return _scatter_runs(
        kept & ~prev_kept, kept & ~next_kept, k_start[:, None, :], (k_start + k_sizes)[:, None, :]
    )


def fused_plan_bytes(
    B: int, h: int, V: int, D: int, block_q: int, act_bytes: int, Cq: int, Ck: int, align: int, block_n: int
) -> dict:
    """Memory of one warm fused k-means plan (``planner="triton"``, ``q_mode="union"``, ``align`` a multiple of
    ``block_n``), from the shapes alone: ``layout`` (kept until the attention call: int32 q/kv orders, segment
    table of fixed width ceil(NC / 2), chunk tables of width V // block_n), ``state`` (the centroids kept for the
    next call, in the activations' dtype when it is half, else fp32) and ``transient``, an upper bound on the other
    tensors alive at once during planning (the peak phase: the Lloyd buffers, the cluster selection in chunks of
    ``_SELECT_BUDGET`` pairs, the union product and the prefix-count cover; tests/test_planning_triton.py measures
    the real peak against it). Bytes."""
    N = B * h
    NQ, NC = -(-V // block_q), -(-V // align)
    G, CF = max(1, (NC + 1) // 2), max(1, V // block_n)
    E = N * NQ * Ck  # (block, key cluster) pairs
    P = min(N, max(1, _SELECT_BUDGET // max(1, Cq * Ck))) * Cq * Ck
    layout = 4 * (N * NQ * block_q + N * V + N * NQ * (1 + 2 * G)) + 4 * N * NQ * (CF + 4)
    state = min(act_bytes, 4) * N * D * (Cq + Ck)
    labels = 4 * N * V * 2 + 8 * N * (Cq + Ck) * 2  # both label sets and sizes, alive to the end
    # fp32 + rounded centroids, labels, counts/sizes/norms; then either update's work space: the atomic one's fp32
    # sums, or the segment one's ranks, grouped order and prefix sums (planning_triton.CENTROID_UPDATE)
    lloyd = N * Ck * D * (4 + act_bytes) + 4 * N * V + 16 * N * Ck + max(4 * N * Ck * D, 8 * N * V + 4 * N * Ck)
    select = 24 * P + N * Cq * Ck
    orders = 8 * N * V * 5 + 8 * N * NQ * block_q  # sorts (values + indices), kv_perm, q_perm before int32
    union = act_bytes * (N * NQ * Cq + N * Cq * Ck + E) + E + N * Cq * Ck
    cover = E * (1 + 1 + 2) + N * NQ * NC * (2 * 3 + 1) + 16 * N * NC
    # the Lloyd buffers are counted throughout (freed after clustering on a GPU; the interpreter keeps them longer)
    transient = labels + lloyd + max(select, orders + union, orders + cover + layout)
    return {"layout": layout, "state": state, "transient": transient}


def _warm(state: dict, B: int, key: str, shape: tuple[int, ...], device) -> torch.Tensor | None:
    """(B * h, C, D) centroids of the previous call when every batch element has them in this shape."""
    found = [state.get(b, {}).get(key) for b in range(B)]
    if any(c is None or tuple(c.shape) != shape for c in found):
        return None
    if B == 1:  # no copy: both planners copy their init before updating it
        return found[0].to(device)
    return torch.cat([c.to(device) for c in found], 0)


def triton_available(x: torch.Tensor) -> bool:
    """Whether the fused Triton planning kernels can run on x's device (the attention kernel's test: a CUDA GPU of
    compute capability >= 8.0 and triton importable)."""
    from sparse_dit.kernels import triton_supported

    return triton_supported(x)


PLANNERS = ("auto", "torch", "triton")


def _planner(planner: str | None, x: torch.Tensor) -> str:
    if planner in (None, "auto"):
        return "triton" if triton_available(x) else "torch"
    if planner not in PLANNERS:
        raise ValueError(f"kmeans pattern: planner must be one of {PLANNERS}; got {planner!r}")
    return planner


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    q: torch.Tensor,
    k: torch.Tensor,
    state: dict,
    planner: str | None = None,
    **params,
) -> Layout:
    """Per-batch layout (L = B, H = num_heads) from k-means of q, k (B, S, h, D); updates ``state``.

    ``planner`` (not a pattern parameter: it changes the cost, not the plan): ``"torch"`` is the reference
    (convergence test and compact tables, each a host sync), ``"triton"`` the fused kernels of
    ``sparse_dit.kernels.planning_triton`` with fixed iteration counts and fixed-capacity tables (no host sync;
    the same layout when the reference runs its iterations to the end), ``None``/``"auto"`` Triton on CUDA when
    triton is importable, else torch."""
    p = check_params(geometry, **params)
    B, S, h, D = q.shape
    if S != geometry.seq_len or h != num_heads:
        raise ValueError(f"kmeans pattern: q has shape {tuple(q.shape)}, expected (B, {geometry.seq_len}, {num_heads}, D)")
    fused = _planner(planner, q) == "triton"
    V, v0 = geometry.video_len, geometry.video_start
    Cq, Ck = _cluster_counts(V, p)
    N = B * h

    def cluster(x: torch.Tensor, key: str, C: int, seed: int):
        init = _warm(state, B, key, (h, C, D), q.device)
        # warm starts follow slowly drifting activations: a few Lloyd steps suffice (and bound the cost)
        iters = p["iters"] if init is None else min(p["iters"], p["warm_iters"])
        video = x[:, v0 : v0 + V]
        if fused:
            if init is None:  # cold start (once per generation): the reference's tokens, gathered without an fp32 copy
                rows = init_rows(V, C, seed, q.device)
                init = video[:, rows].float().permute(0, 2, 1, 3).reshape(N, C, D)
            from sparse_dit.kernels.planning_triton import kmeans_lloyd

            cent, labels, sizes = kmeans_lloyd(video, init, iters)
            return cent, labels, sizes.long(), iters
        # one fp32 copy at a time: q's is freed before k's is made (peak memory)
        flat = video.float().permute(0, 2, 1, 3).reshape(N, V, D)
        return kmeans(flat, C, iters, p["tol"], init, seed)

    qc, ql, qs, q_it = cluster(q, "q_centroids", Cq, p["seed"])
    kc, kl, ks, k_it = cluster(k, "k_centroids", Ck, p["seed"] + 1)
    keep = select_clusters(qc, kc, ks, p["top_p"], p["min_fraction"], 1.0 / math.sqrt(D))  # (N, Cq, Ck)

    arange_v = torch.arange(V, device=q.device)
    k_order = torch.sort(kl, dim=-1, stable=True).indices  # (N, V) raster index, sorted by cluster
    kv_perm = (k_order + v0).to(torch.int32) if fused else k_order + v0  # the layout's dtype, no int64 copy kept
    k_start = torch.nn.functional.pad(ks.cumsum(-1), (1, 0))[:, :-1]  # (N, Ck)
    q_sorted_lab, q_order = torch.sort(ql, dim=-1, stable=True)
    q_sorted_lab = q_sorted_lab.long()

    if p["q_mode"] == "union":
        NQ = -(-V // block_q)
        q_perm = torch.full((N, NQ * block_q), -1, dtype=torch.int32 if fused else torch.int64, device=q.device)
        q_perm[:, :V] = q_order + v0
        # 0/1 products summed: any dtype keeps a positive count positive; the fused path uses the activations'
        # (half the fp32 (N, NQ, Ck) product at bf16)
        mdt = q.dtype if fused and q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        member = torch.zeros(N, NQ, Cq, dtype=mdt, device=q.device)
        member.view(N, -1).scatter_(1, (arange_v // block_q) * Cq + q_sorted_lab, 1.0)
        keep_block = torch.bmm(member, keep.to(mdt)) > 0  # (N, NQ, Ck)
        del member
    else:
        padded = -(-qs // block_q) * block_q  # (N, Cq)
        p_end = padded.cumsum(-1)
        p_start = p_end - padded
        q_start = qs.cumsum(-1) - qs
        if fused:  # each cluster wastes less than one block: a bound that needs no host sync
            NQ = -(-V // block_q) + Cq
        else:
            NQ = max(block_q, int(p_end[:, -1].max())) // block_q
        Lq = NQ * block_q
        slot = p_start.gather(1, q_sorted_lab) + arange_v - q_start.gather(1, q_sorted_lab)  # (N, V)
        q_perm = torch.full((N, Lq), -1, dtype=torch.int64, device=q.device)
        q_perm.scatter_(1, slot, q_order + v0)
        block_first = torch.arange(NQ, device=q.device) * block_q
        block_cluster = torch.searchsorted(p_end, block_first[None].expand(N, -1).contiguous(), right=True)
        has_rows = block_cluster < Cq
        keep_block = keep.gather(1, block_cluster.clamp(max=Cq - 1)[..., None].expand(-1, -1, Ck))
        keep_block &= has_rows[..., None]

    align = p["kv_align"] or block_q
    tables = None
    if align > 1 and fused:  # segments and the kernel's chunk tables in one launch, from the chunk cover
        from sparse_dit.kernels.planning_triton import attention_block_n, cover_tables

        cover = _chunk_cover_fixed(keep_block, k_start, ks, V, align)
        del keep_block
        block_n = attention_block_n(block_q, q.dtype, D)
        count, seg_s, seg_e, tables = cover_tables(cover, V, align, block_n)
        del cover
        if tables is not None:  # (N, NQ, ...) -> the layout's (B, h, NQ, ...)
            tables = tuple(t.view(B, h, *t.shape[1:]) for t in tables)
    elif align > 1:
        count, seg_s, seg_e = _aligned_segments(keep_block & (ks > 0)[:, None, :], k_start, ks, V, align)
    elif fused:
        count, seg_s, seg_e = _cluster_segments_fixed(keep_block, k_start, ks)
    else:
        start = k_start[:, None, :].expand(-1, NQ, -1)
        count, seg_s, seg_e = merge_segments(start, start + ks[:, None, :], keep_block)

    G = seg_s.shape[-1]
    lay = Layout(
        geometry.seq_len,
        block_q,
        count.view(B, h, NQ),
        seg_s.view(B, h, NQ, G),
        seg_e.view(B, h, NQ, G),
        q_perm.view(B, h, -1),
        kv_perm.view(B, h, V),
        **text_ranges(geometry),
        # the fused path's tables are correct by construction; checking them would read a flag on the host
        _trusted=fused,
    )
    # kept for the warm start in the activations' precision when that is half: the next call's first assignment
    # measures distances to centroids rounded to it anyway (the fused planner rounds them first), and the update
    # recomputes every non-empty centroid from its tokens; half the bytes held per layer between calls (Wan2.1-1.3B
    # 480p: 56 instead of 112 MiB over 30 layers; the patch keeps one state per layer for both CFG branches)
    kept = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else qc.dtype
    for b in range(B):
        sl = slice(b * h, (b + 1) * h)
        state[b] = {"q_centroids": qc[sl].detach().to(kept), "k_centroids": kc[sl].detach().to(kept), "iters": (q_it, k_it)}
        if p["record"]:  # over the layers these would hold GBs at 720p: only on request
            state[b].update(q_labels=ql[sl].to(torch.int32), k_labels=kl[sl].to(torch.int32), keep=keep[sl])
    dev = torch.device(device)
    if dev.type != lay.device.type or (dev.index is not None and dev.index != lay.device.index):
        lay = lay.to(device)  # (a second Layout, only when the device differs)
    from sparse_dit.kernels.fa4 import BLOCK_KV, mark_whole_kv_blocks

    if align % BLOCK_KV == 0 and lay.text_kv is None and lay.dense_q is None and lay.text_valid is None:
        # segments snapped outward to align-token chunks of the key order (ending at most at V, its end), which has
        # no padded slots: the Gluon/FA4 engines can take this layout without a host-side check
        mark_whole_kv_blocks(lay)
    if tables is not None and lay.device == q.device:
        lay.cached(("triton_chunks", block_n, str(lay.device)), lambda: tables)
    elif fused:  # the attention kernel's chunk tables, built here without the host sync the generic builder has
        from sparse_dit.kernels.planning_triton import prime_chunk_tables

        prime_chunk_tables(lay, q.dtype, D, align=align if align > 1 else None)
    return lay
