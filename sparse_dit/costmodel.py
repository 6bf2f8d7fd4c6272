"""What a plan costs: a per-pattern cost table and the attention speed-up a profile should give.

A cost table prices one head's attention with a pattern relative to one dense attention call of the same
shape (the fastest dense attention of the device, cuDNN/FlashAttention through SDPA)::

    cost(pattern, density) = density * pair_cost + overhead[pattern]      (dense: 1.0)

``pair_cost`` is what one computed (query, key) pair costs in sparse-dit's kernel relative to a pair of the
dense kernel; ``overhead[pattern]`` is the pattern's own work per call (permutation gathers, k-means, key
scoring) relative to a dense call. Two sources, always named in the table's ``source``:

- `measure_cost_model`: timed on the GPU the profile is made on (``"measured": true``, the device named):
  each candidate's layout is run through `sparse_dit.kernels.block_sparse_attention` against dense SDPA and
  the two coefficients are fitted.
- `flop_cost_model`: a FLOP estimate (``"measured": false``), used where no GPU is available: pairs cost the
  same as dense pairs, and overheads are the FLOPs of k-means (Lloyd iterations on queries and keys) and of
  prune's key scoring. It ignores memory traffic and kernel efficiency, so it overstates the speed-up of
  sparse layouts on real hardware; treat it as an upper bound.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.patterns import PatternSpec


def flop_cost_model(geometry: Geometry, block_size: int = 128, warm_iters: int = 2) -> dict[str, Any]:
    """A FLOP-based cost table for calls of ``geometry`` (clearly labelled as not measured).

    Dense attention is ``4 S^2 D`` FLOPs per head. k-means clusters the V video queries into V/256 and the keys
    into V/64 clusters with ``warm_iters`` Lloyd iterations per call once warm-started (distances: 2 V C D
    FLOPs per iteration); prune scores keys with 64 sampled queries (2 * 64 * V * D FLOPs, softmax included).
    """
    S, V = geometry.seq_len, geometry.video_len
    dense = 4.0 * S * S  # per head, per head-dim unit
    kmeans = warm_iters * 2.0 * V * (V / 256 + V / 64) / dense
    prune = 2.0 * 2.0 * 64 * V / dense
    return {
        "pair_cost": 1.0,
        "overhead": {"dense": 0.0, "tile": 0.0, "radial": 0.0, "kmeans": round(kmeans, 5), "prune": round(prune, 5), "mask": 0.0},
        "source": f"FLOP estimate, not measured (grid {'x'.join(map(str, geometry.grid))}, {S} tokens): an upper bound on the speed-up",
        "measured": False,
    }


def candidate_cost(spec: PatternSpec, density: float, cost_model: dict[str, Any]) -> float:
    """Relative cost of one head with ``spec`` at ``density`` under ``cost_model`` (dense: 1.0)."""
    if spec.name == "dense":
        return 1.0
    return density * float(cost_model["pair_cost"]) + float(cost_model["overhead"].get(spec.name, 0.0))


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (synchronised on CUDA)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{device.type.upper()} ({platform.processor() or platform.machine()})"


@torch.no_grad()
def measure_cost_model(
    geometry: Geometry,
    candidates: Sequence[PatternSpec],
    block_size: int = 128,
    device: "str | torch.device" = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 5,
) -> dict[str, Any]:
    """Time every candidate on ``device`` (the GPU the profile is made on) at ``geometry`` (random q/k/v) and fit
    the cost table.

    pair_cost: the median over static candidates of (kernel time / dense time) / density; overhead[pattern]:
    the median over that pattern's candidates of the layout-planning time (dynamic patterns plan from q and k
    every call) plus the kernel time beyond ``density * pair_cost``, relative to dense. Works on any device (the
    table then prices that device: a CPU's table says little about a GPU).
    """
    import torch.nn.functional as F

    from sparse_dit.kernels import block_sparse_attention

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    B, H, D, S = geometry.batch, geometry.heads, geometry.head_dim, geometry.seq_len
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
    dense_s = _timed(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), repeats, device)
    pair_ratios, per_pattern = [], {}
    for spec in candidates:
        if spec.name == "dense":
            continue
        if spec.static:
            layout = spec.module.build(geometry, H, block_size, device, **spec.params)
            plan_s = 0.0
        else:
            state: dict = {}
            build = lambda: spec.module.build(geometry, H, block_size, device, q=q, k=k, state=state, **spec.params)  # noqa: E731
            layout = build()
            plan_s = _timed(build, repeats, device)
        density = float(layout.density_per_head().float().mean())
        kernel_s = _timed(lambda: block_sparse_attention(q, k, v, layout), repeats, device)
        per_pattern.setdefault(spec.name, []).append((density, kernel_s / dense_s, plan_s / dense_s))
        if spec.static and density > 0.02:
            pair_ratios.append(kernel_s / dense_s / density)
    pair_cost = sorted(pair_ratios)[len(pair_ratios) // 2] if pair_ratios else 1.0
    overhead = {"dense": 0.0}
    for name, rows in per_pattern.items():
        extra = sorted(max(0.0, kernel - density * pair_cost) + plan for density, kernel, plan in rows)
        overhead[name] = round(extra[len(extra) // 2], 5)
    name = device_name(device)
    return {
        "pair_cost": round(pair_cost, 5),
        "overhead": overhead,
        "source": f"measured on {name} ({str(dtype).replace('torch.', '')}, grid {'x'.join(map(str, geometry.grid))}, "
        f"{S} tokens, {H} heads, head dim {D}, dense {dense_s * 1e3:.3f} ms per call)",
        "measured": True,
        "device": name,
    }


def expected_speedup(profile: Any, cost_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Expected attention speed-up of ``profile`` over dense attention under ``cost_model`` (default: the
    profile's own ``cost_model``): on its sparse steps (buckets weighted by the calibration timesteps they
    hold) and over a whole generation with the dense warm-up (the share of calibration timesteps above
    ``dense_above`` run at cost 1)."""
    cost_model = cost_model or profile.header.get("cost_model")
    if not cost_model:
        raise ValueError("the profile has no cost model")
    timesteps = (profile.header.get("calibration") or {}).get("timesteps") or []
    weights = []
    for lo, hi in profile.buckets:
        weights.append(sum(1 for t in timesteps if lo - 1e-6 <= t <= hi + 1e-6 and t <= profile.dense_above + 1e-6))
    if not any(weights):
        weights = [1] * len(profile.buckets)
    bucket_costs = [
        sum(candidate_cost(c.spec, c.density, cost_model) for layer in bucket for c in layer) / max(1, sum(len(layer) for layer in bucket))
        for bucket in profile.plan
    ]
    sparse_cost = sum(w * c for w, c in zip(weights, bucket_costs)) / sum(weights)
    dense_share = sum(1 for t in timesteps if t > profile.dense_above + 1e-6) / len(timesteps) if timesteps else 0.0
    overall = dense_share + (1 - dense_share) * sparse_cost
    return {
        "sparse_steps": round(1.0 / sparse_cost, 3) if sparse_cost > 0 else math.inf,
        "with_dense_warmup": round(1.0 / overall, 3) if overall > 0 else math.inf,
        "per_bucket": [round(1.0 / c, 3) if c > 0 else math.inf for c in bucket_costs],
        "dense_step_share": round(dense_share, 4),
        "measured": bool(cost_model.get("measured", False)),
        "source": cost_model.get("source", "unknown"),
    }
