"""Key/value token pruning (after ToMe, AsymRnR, AT-EDM): per head, attend only the most important keys.

What is scored (``score="attn"``, the default): the attention mass each video key receives from a
small, evenly strided sample of ``sample_queries`` video queries of the same head,
``score_j = mean_i softmax_j(q_i · k_j / sqrt(D))``. That is AT-EDM's column-sum importance
estimated on m sampled rows instead of the S x S map: it costs m * S * D per head (m = 64 is about
0.2% of dense attention at S = 32760) and, unlike a key norm, it accounts for which keys the queries
actually look at (a key with a large norm pointing away from every query gets no mass). The strided
sample covers the video uniformly in space and time, so keys important to any region are seen;
per-head scores let every head keep different tokens (AsymRnR's point that one reduction for all
heads and all tokens is wasteful). ``score="norm"`` (the key's L2 norm, no queries needed) is kept
as a cheaper baseline.

The ``ceil(keep_ratio * V)`` best video keys of each (batch, head) are kept; ``kv_perm`` lists exactly
them (in raster order, for locality) so they are one contiguous segment ``[0, n_keep)`` that every
query block attends. Text keys are always kept (``text_kv``) and text queries attend everything.
The layout is per batch element (L = B). With ``record=True`` (inspection and tests) ``state[b]``
receives ``kept`` (h, n_keep) original token indices and ``scores`` (h, V); off by default, because the
caller keeps a state per layer, where the scores would hold ~0.5 GB at Wan-14B 720p (40 layers x 40
heads x 75600 keys in fp32; ~1 GB when states were kept per CFG branch). Prune keeps nothing between
calls otherwise. (Reusing query rows from the previous step, which ToMe-style caching allows, is not done.)

On a CUDA GPU with triton, ``score="attn"`` can run as fused kernel passes (``planning_triton.prune_scores``: row
softmax statistics, their combination, then normalised column sums) that never store the (samples x keys) logits
(``build(..., planner=)`` chooses; ``key_scores`` is the reference). ``planner="auto"`` (the default) takes the
Triton scorer from ``TRITON_SCORE_MIN`` scored (batch x head x key) entries up, which covers every video shape: with
the host work cut to 28 ops per plan it is the faster of the two at both Wan shapes (H200, 2026-12-03 15:03 UTC,
benchmarks/results/planning.md: Wan 480p, 12 x 32760 = 0.39M entries, 0.27 vs 0.50 ms GPU and 0.58 vs 0.85 ms per
call; Wan 720p, 40 x 75600 = 3.0M, 1.03 vs 3.13 ms GPU) and holds 1.01x dense peak memory against 1.36x (480p).
Toy shapes below the threshold keep the PyTorch scorer (a few torch ops beat three kernel launches there). Either
way, on a GPU the attention kernel's chunk tables are filled here from host integers (one segment per query
block), so the plan and the attention call read nothing back from the GPU.
"""

from __future__ import annotations

import math

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

from ._tiling import text_ranges

NAME = "prune"
TRITON_SCORE_MIN = 1 << 16  # (batch x heads x video keys) from which "auto" scores with Triton (see above)
STATIC = False
SCORES = ("attn", "norm")


def check_params(
    geometry: Geometry | None, keep_ratio: float = 0.5, score: str = "attn", sample_queries: int = 64, record: bool = False
) -> dict:
    """Normalise parameters; raise ValueError for keep_ratio outside (0, 1], unknown score, bad sample size."""
    try:
        keep_ratio = float(keep_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"prune pattern: keep_ratio must be a number in (0, 1]; got {keep_ratio!r}") from None
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"prune pattern: keep_ratio must lie in (0, 1] (fraction of video keys kept); got {keep_ratio!r}")
    if score not in SCORES:
        raise ValueError(f"prune pattern: score must be one of {SCORES}; got {score!r}")
    if isinstance(sample_queries, bool) or int(sample_queries) != sample_queries or sample_queries < 1:
        raise ValueError(f"prune pattern: sample_queries must be an int >= 1; got {sample_queries!r}")
    return {"keep_ratio": keep_ratio, "score": score, "sample_queries": int(sample_queries), "record": bool(record)}


def key_scores(q: torch.Tensor, k: torch.Tensor, score: str = "attn", sample_queries: int = 64) -> torch.Tensor:
    """Importance of each key: q, k (B, V, h, D) video tokens -> (B, h, V) float32 (higher = keep)."""
    B, V, h, D = k.shape
    if score == "norm":
        return k.float().norm(dim=-1).transpose(1, 2)
    m = min(int(sample_queries), V)
    rows = torch.linspace(0, V - 1, m, device=q.device).round().long()
    qs = q[:, rows]
    scores = torch.empty(B, h, V, dtype=torch.float32, device=k.device)
    # a few heads at a time bounds the (B, heads, m, V) fp32 temporaries (~0.8 GB for all 40 heads of
    # Wan-14B at 720p); the logits only rank keys, so they are computed in the activations' dtype
    # (tensor cores, no fp32 copy of k) and normalised in fp32
    step = max(1, (1 << 24) // max(1, B * m * V))
    for h0 in range(0, h, step):
        hs = slice(h0, h0 + step)
        logits = torch.einsum("bmhd,bvhd->bhmv", qs[:, :, hs], k[:, :, hs]).float() / math.sqrt(D)
        scores[:, hs] = torch.softmax(logits, -1).mean(2)
    return scores


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    q: torch.Tensor,
    k: torch.Tensor,
    state: dict,
    keep_ratio: float = 0.5,
    score: str = "attn",
    sample_queries: int = 64,
    record: bool = False,
    planner: str | None = None,
) -> Layout:
    """Per-batch layout (L = B, H = num_heads): every query attends the kept keys of its head.

    ``planner`` (not a pattern parameter): ``"triton"`` scores keys with the fused two-pass kernel of
    ``sparse_dit.kernels.planning_triton`` (no (samples x keys) fp32 matrix, no host sync), ``"torch"`` with the
    reference, ``None``/``"auto"`` Triton on CUDA when triton is importable. ``score="norm"`` is one torch op either way."""
    from .kmeans import _planner, triton_available

    p = check_params(geometry, keep_ratio=keep_ratio, score=score, sample_queries=sample_queries, record=record)
    B, S, h, D = k.shape
    if S != geometry.seq_len or h != num_heads:
        raise ValueError(f"prune pattern: k has shape {tuple(k.shape)}, expected (B, {geometry.seq_len}, {num_heads}, D)")
    V, v0 = geometry.video_len, geometry.video_start
    chosen = _planner(planner, q)
    if planner in (None, "auto") and B * h * V < TRITON_SCORE_MIN:
        chosen = "torch"
    fused = chosen == "triton" and p["score"] == "attn" and p["sample_queries"] <= 128
    if fused:
        from sparse_dit.kernels.planning_triton import prune_scores

        scores = prune_scores(q[:, v0 : v0 + V], k[:, v0 : v0 + V], p["sample_queries"])
    else:
        scores = key_scores(q[:, v0 : v0 + V], k[:, v0 : v0 + V], p["score"], p["sample_queries"])
    n_keep = max(1, math.ceil(p["keep_ratio"] * V - 1e-9))
    kept = scores.topk(n_keep, dim=-1).indices.sort(-1).values + v0  # (B, h, n_keep)
    NQ = -(-S // block_q)
    count = torch.ones(B, h, NQ, dtype=torch.int32, device=k.device)
    start = torch.zeros(B, h, NQ, 1, dtype=torch.int32, device=k.device)
    end = torch.full((B, h, NQ, 1), n_keep, dtype=torch.int32, device=k.device)
    if p["record"]:
        for b in range(B):
            state[b] = {"kept": kept[b], "scores": scores[b]}
    # topk gives n_keep distinct in-range indices by construction: the bounds check (a host sync) is skipped
    lay = Layout(geometry.seq_len, block_q, count, start, end, None, kept, **text_ranges(geometry), _trusted=True)
    dev = torch.device(device)
    if dev.type != lay.device.type or (dev.index is not None and dev.index != lay.device.index):
        lay = lay.to(device)
    if chosen == "triton" or triton_available(q):  # sync-free chunk tables, whichever scorer ran
        from sparse_dit.kernels.planning_triton import attention_block_n, single_segment_tables

        bn = attention_block_n(block_q, q.dtype, D)
        tables = single_segment_tables(B, h, NQ, n_keep, bn, lay.device)
        lay.cached(("triton_chunks", bn, str(lay.device)), lambda: tables)
    return lay
