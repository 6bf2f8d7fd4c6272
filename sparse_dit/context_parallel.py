"""sparse-dit under diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``).

What one rank's attention call sees under Ulysses (diffusers 0.42, ``TemplatedUlyssesAttention``): each rank holds a
contiguous shard of every sharded input (``tensor.chunk``/``tensor_split`` along the sequence, one shard per input:
the video latents, and for joint-attention families the text separately), projects q/k/v for all heads of its
shard, and an all-to-all hands rank ``r`` the *whole* sequence for the contiguous head range
``[r * ceil(H/N), min(H, (r+1) * ceil(H/N)))`` (``ulysses_anything`` pads H up to a multiple of N and drops the
padding on the last rank; without it H % N == 0 and the range is ``[r H/N, (r+1) H/N)``). The gathered sequence is
the ranks' local sequences one after the other, so for a joint [text, image] sequence it is
``[text_0, image_0, text_1, image_1, ...]``, not diffusers' single-device order: `gathered_positions` says where
each token went, and the patch builds its layouts in single-device order through that permutation.

sparse-dit's interceptor sits inside diffusers' native forward op, after the all-to-all, so it sees q/k/v of shape
(B, S_full, H/N, D): `UlyssesSlice` tells the patch which slice of the plan that is. Ring attention (``ring_degree >
1``, alone or unified with Ulysses) splits keys into chunks per ring step and needs the log-sum-exp of each, which
diffusers' native op does not give; a sparse layout cut by key chunk would also have to follow the ring's rotation.
sparse-dit refuses it (`check_parallel_config`) rather than run it wrongly.

Per-head cost balance: under Ulysses the ranks wait for each other at the all-to-all after attention, so a layer
takes as long as its most expensive head slice. `rank_imbalance` measures that for a profile; diffusers slices heads
contiguously and the projections fix which head is which, so heads cannot be reassigned to ranks without changing
weights: the remedy is the plan itself (`balance_choices`, the profiler's ``balance_ranks`` option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

RING_REFUSED = (
    "sparse-dit does not support ring attention (ContextParallelConfig ring_degree={ring}): its key chunks would cut "
    "sparse layouts per ring step; use ContextParallelConfig(ulysses_degree=N) with ring_degree=1, or unpatch the model"
)


@dataclass(frozen=True)
class UlyssesSlice:
    """This rank's place in a Ulysses group: ``rank`` of ``degree``."""

    rank: int
    degree: int

    def heads(self, total: int) -> tuple[int, int]:
        """[start, end) of the ``total`` heads this rank attends (diffusers' contiguous head slicing)."""
        per = -(-total // self.degree)
        start = min(total, self.rank * per)
        return start, min(total, start + per)

    def split(self, length: int) -> list[int]:
        """Shard sizes of a sequence of ``length`` over the ranks (``tensor_split``; ``chunk`` when divisible)."""
        base, extra = divmod(length, self.degree)
        return [base + (1 if r < extra else 0) for r in range(self.degree)]


def _cp_config(parallel_config: Any) -> Any:
    """The ContextParallelConfig inside a diffusers ParallelConfig (or the config itself), or None."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config if hasattr(parallel_config, "ring_degree") else None)


TP_REFUSED = (
    "sparse-dit does not support diffusers' tensor parallelism (each rank's attention sees a slice of the heads that "
    "sparse-dit cannot place yet); use ContextParallelConfig(ulysses_degree=N), or unpatch the model"
)


def check_parallel_config(parallel_config: Any) -> None:
    """Raise a one-line ValueError for a parallel setting sparse-dit cannot serve: ring attention (alone or unified
    with Ulysses) and tensor parallelism."""
    if getattr(parallel_config, "tensor_parallel_config", None) is not None:
        raise ValueError(TP_REFUSED)
    cp = _cp_config(parallel_config)
    if cp is not None and int(getattr(cp, "ring_degree", 1) or 1) > 1:
        raise ValueError(RING_REFUSED.format(ring=cp.ring_degree))


def ulysses_slice(module: torch.nn.Module) -> UlyssesSlice | None:
    """The Ulysses slice an attention module's processor attends under (None: not context parallel). Raises for ring."""
    processor = getattr(module, "processor", None)
    cp = _cp_config(getattr(processor, "_parallel_config", None))
    if cp is None:
        return None
    check_parallel_config(cp)
    degree = int(cp.ulysses_degree or 1)
    if degree <= 1:
        return None
    return UlyssesSlice(int(cp._ulysses_local_rank), degree)


def gathered_positions(segments: Sequence[int], cp: UlyssesSlice) -> torch.Tensor:
    """(S,) int64: for each token in single-device order, its position in the sequence a rank attends after the
    all-to-all. ``segments``: lengths of the separately sharded parts in single-device order (e.g. [text, image]
    for a joint sequence with text first; one part for video-only self-attention, where this is the identity)."""
    sizes = [cp.split(int(n)) for n in segments]
    rank_len = [sum(s[r] for s in sizes) for r in range(cp.degree)]
    rank_start = [sum(rank_len[:r]) for r in range(cp.degree)]
    parts = []
    for i, seg in enumerate(sizes):
        for r in range(cp.degree):
            start = rank_start[r] + sum(sizes[j][r] for j in range(i))
            parts.append(torch.arange(start, start + seg[r]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------------ stats
_SUMMED = ("sparse_calls", "dense_calls", "density_sum", "recomputed_calls", "skipped_calls")


def sum_stats(stats: Iterable[dict]) -> dict:
    """One stats dict (`PatchState.stats`) for several ranks: counts and density sums added, reasons merged,
    ``mean_density`` recomputed (each rank counts each layer call once, for its own heads)."""
    out: dict[str, Any] = {k: 0 for k in _SUMMED}
    out["dense_reasons"] = {}
    for s in stats:
        for k in _SUMMED:
            out[k] += s.get(k, 0)
        for reason, n in s.get("dense_reasons", {}).items():
            out["dense_reasons"][reason] = out["dense_reasons"].get(reason, 0) + n
    out["mean_density"] = out["density_sum"] / out["sparse_calls"] if out["sparse_calls"] else 1.0
    return out


def gather_stats(model: torch.nn.Module, group: Any = None) -> list[dict]:
    """Every rank's stats of a patched ``model`` (``torch.distributed.all_gather_object``; a collective: call it on
    every rank). Sum them with `sum_stats`."""
    import torch.distributed as dist

    from sparse_dit.patching import patch_state

    state = patch_state(model)
    if state is None:
        raise ValueError("gather_stats: the model is not patched; call sparse_dit.patch first")
    mine = state.stats
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    return out


# -------------------------------------------------------------------------------------------- balance
def slice_costs(costs: torch.Tensor, degree: int) -> torch.Tensor:
    """(..., H) per-head costs -> (..., N) summed cost of each rank's head slice (diffusers' Ulysses slicing)."""
    H = costs.shape[-1]
    out = []
    for r in range(degree):
        a, b = UlyssesSlice(r, degree).heads(H)
        out.append(costs[..., a:b].sum(-1))
    return torch.stack(out, -1)


def imbalance(costs: torch.Tensor, degree: int) -> torch.Tensor:
    """(..., H) per-head costs -> (...) max rank-slice cost / mean rank-slice cost (1 = balanced)."""
    per_rank = slice_costs(costs.double(), degree)
    return per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1e-12)


def rank_imbalance(profile: Any, degree: int, cost_model: dict | None = None) -> dict[str, Any]:
    """How unevenly ``profile``'s plan spreads attention cost over ``degree`` Ulysses ranks.

    Per (bucket, layer): max rank cost / mean rank cost, from each head's `costmodel.candidate_cost` at its
    calibrated density (default cost model: the profile's own). ``mean`` weights layers equally; ``step_slowdown``
    is the attention time of a step with the plan's imbalance over a perfectly balanced one (sum of per-layer max over
    sum of per-layer mean), ``worst`` the most imbalanced layer as (bucket, layer, ratio)."""
    from sparse_dit.costmodel import candidate_cost
    from sparse_dit.profiler import DEFAULT_COST_MODEL

    if not 1 <= degree <= profile.heads:
        raise ValueError(f"degree must be between 1 and the profile's {profile.heads} heads; got {degree}")
    cost_model = cost_model or profile.header.get("cost_model") or DEFAULT_COST_MODEL
    costs = torch.tensor(
        [[[candidate_cost(c.spec, c.density if c.density == c.density else 1.0, cost_model) for c in layer] for layer in bucket] for bucket in profile.plan],
        dtype=torch.float64,
    )  # (buckets, layers, heads)
    per_rank = slice_costs(costs, degree)
    ratio = per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1e-12)
    b, layer = divmod(int(ratio.argmax()), ratio.shape[1])
    return {
        "degree": degree,
        "mean": round(float(ratio.mean()), 4),
        "step_slowdown": round(float(per_rank.max(-1).values.sum() / per_rank.mean(-1).sum()), 4),
        "worst": (b, layer, round(float(ratio[b, layer]), 4)),
        "per_bucket": [round(float(r.mean()), 4) for r in ratio],
    }


def balance_choices(
    choice: torch.Tensor,
    errors: torch.Tensor,
    densities: torch.Tensor,
    costs: torch.Tensor,
    degree: int,
    max_error_increase: float = 0.1,
    max_swaps: int = 64,
) -> torch.Tensor:
    """Even out the cost of the ``degree`` rank slices of every (bucket, layer) by swapping the choices of two heads
    on different ranks, without raising the layer's summed density.

    choice: (..., H) long candidate per head; errors, densities, costs: (..., H, C). Greedy per layer: while the most
    expensive slice can be made cheaper, take the swap between a head of it and a head of the cheapest slice that
    lowers the max slice cost most per unit of added error; a layer's summed error may grow by at most
    ``max_error_increase`` (relative), its summed density not at all. Returns the new choice (same shape)."""
    H, C = errors.shape[-2:]
    flat = choice.reshape(-1, H).clone()
    e, d, c = (t.reshape(-1, H, C).double() for t in (errors, densities, costs))
    slices = [UlyssesSlice(r, degree).heads(H) for r in range(degree)]
    heads = torch.arange(H)
    for i in range(flat.shape[0]):
        ch = flat[i]
        err0, dens0 = float(e[i, heads, ch].sum()), float(d[i, heads, ch].sum())
        err_now, dens_now = err0, dens0
        for _ in range(max_swaps):
            own = c[i, heads, ch]
            per_rank = torch.stack([own[a:b].sum() for a, b in slices])
            hi, lo = int(per_rank.argmax()), int(per_rank.argmin())
            if float(per_rank[hi] - per_rank[lo]) < 1e-9:
                break
            A, B = torch.arange(*slices[hi]), torch.arange(*slices[lo])
            ca, cb = ch[A], ch[B]  # current choices of the two slices' heads
            # swapping head a (slice hi) and head b (slice lo): a takes b's choice and b takes a's
            new_hi = per_rank[hi] - c[i, A, ca][:, None] + c[i, A[:, None], cb[None, :]]
            new_lo = per_rank[lo] - c[i, B, cb][None, :] + c[i, B[None, :], ca[:, None]]
            others = [float(per_rank[r]) for r in range(degree) if r not in (hi, lo)]
            new_max = torch.maximum(new_hi, new_lo).clamp(min=max(others, default=0.0))
            gain = per_rank[hi] - new_max
            d_err = e[i, A[:, None], cb[None, :]] + e[i, B[None, :], ca[:, None]] - e[i, A, ca][:, None] - e[i, B, cb][None, :]
            d_dens = d[i, A[:, None], cb[None, :]] + d[i, B[None, :], ca[:, None]] - d[i, A, ca][:, None] - d[i, B, cb][None, :]
            ok = (gain > 1e-9) & (ca[:, None] != cb[None, :]) & (dens_now + d_dens <= dens0 + 1e-9)
            ok &= err_now + d_err <= err0 * (1 + max_error_increase) + 1e-12
            if not bool(ok.any()):
                break
            score = torch.where(ok, gain / d_err.clamp(min=1e-9), torch.full_like(gain, -1.0))
            a, b = divmod(int(score.argmax()), len(B))
            err_now += float(d_err[a, b])
            dens_now += float(d_dens[a, b])
            ch[A[a]], ch[B[b]] = int(cb[b]), int(ca[a])
        flat[i] = ch
    return flat.reshape(choice.shape)
