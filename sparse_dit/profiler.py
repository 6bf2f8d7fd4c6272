"""The offline head profiler: calibrate candidate patterns against dense attention, then allocate.

Calibration runs the dense model (any callable that drives the patched transformer, e.g. a pipeline
call per prompt). At every self-attention call, for every head, it samples query rows, computes their
dense attention output, and the output each candidate pattern gives on the same rows (the candidate's
key mask for those rows, applied to the same scores). The error is the relative L2 error
``||o_cand - o_dense|| / ||o_dense||`` over the sampled rows of one head, averaged over calls. Nothing
of size S x S or "all q/k/v of all layers" is stored: per call only ``rows x S`` scores of one batch
element, then running sums.

The error metric is choosable (`METRICS`): ``rel_l2`` (the above), ``out_proj_sq`` (the head's error after
the layer's output projection, squared and relative to the layer's whole projected output, so heads the
residual stream barely sees count less and errors add over heads) and ``mass`` (attention mass dropped);
several can be recorded in one pass, the first drives the allocation. ``measure_step`` restricts which
denoising steps are measured; `sparse_dit.calibrate` chooses prompts, seeds and images.

Allocation picks, per (timestep bucket, layer, head), one candidate: with ``target_density`` (one value,
or one per bucket) it minimises the summed error subject to the mean density (a Lagrangian sweep over the multiple-choice
knapsack: exact dynamic programme when small, Lagrangian sweep plus greedy fill when large); with ``max_error`` it picks the cheapest
candidate (cost model below) whose error stays under the ceiling.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import sparse_dit
from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout
from sparse_dit.patterns import PatternSpec
from sparse_dit.costmodel import candidate_cost
from sparse_dit.profile import HeadChoice, Profile

# Cost of a candidate relative to one dense attention call: see sparse_dit.costmodel. These coefficients
# are the fallback for statistics without a geometry; build_profile prices with a FLOP estimate for the
# calibration geometry unless a measured table (costmodel.measure_cost_model) is passed in.
DEFAULT_COST_MODEL: dict[str, Any] = {
    "pair_cost": 1.2,
    "overhead": {"dense": 0.0, "tile": 0.01, "radial": 0.01, "kmeans": 0.05, "prune": 0.02, "mask": 0.0},
    "source": "defaults (not measured on a GPU)",
    "measured": False,
}


def default_candidates(geometry: Geometry, block_size: int, patterns: Sequence[str] | None = None) -> list[PatternSpec]:
    """Candidates sized for ``geometry``: tile windows, radial decays, k-means top-p, prune keep ratios.

    The ladder is dense enough (about 40 candidates, densities from a few percent to about 0.6) that
    the allocation can spend a budget in small steps and that every family has a member near any
    target density. Tile windows combine two spatial extents (the whole tile grid and about half of
    it) with temporal extents of 1 to 7, 9, 11 and 13 tile-frames, so heads that look along time and
    heads that look across the frame both find a window that fits them.
    """
    from sparse_dit import patterns as registry

    names = set(registry.names()) if patterns is None else set(patterns) & set(registry.names())
    out = [PatternSpec("dense")]
    if "tile" in names:
        from sparse_dit.patterns._tiling import default_tile

        tile = default_tile(block_size, geometry.grid)
        nt = [-(-g // t) for g, t in zip(geometry.grid, tile)]
        total = nt[0] * nt[1] * nt[2]
        spatial = [(nt[1], nt[2]), (max(1, min(nt[1], math.ceil(nt[1] / 2) | 1)), max(1, min(nt[2], math.ceil(nt[2] / 2) | 1)))]
        seen = set()
        for wh, ww in spatial:
            for wt in (1, 2, 3, 4, 5, 6, 7, 9, 11, 13):
                window = (min(wt, nt[0]), wh, ww)
                if window in seen or window == tuple(nt) or window[0] * wh * ww > 0.65 * total:
                    continue
                seen.add(window)
                out.append(PatternSpec("tile", window=window))
    if "radial" in names:
        out += [PatternSpec("radial", decay=d) for d in (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)]
    if "kmeans" in names:
        out += [PatternSpec("kmeans", top_p=p) for p in (0.35, 0.5, 0.65, 0.75, 0.9)]
    if "prune" in names:
        out += [PatternSpec("prune", keep_ratio=r) for r in (0.1, 0.15, 0.25, 0.35, 0.5)]
    return out


METRICS: dict[str, str] = {
    "rel_l2": "relative L2 error of each head's attention output vs dense on sampled query rows, mean over calls",
    "out_proj_sq": "squared L2 error of each head's attention output after the layer's output projection, relative "
    "to the squared norm of the layer's projected dense output (all heads), on sampled query rows, mean over calls "
    "(additive over heads when their errors are uncorrelated)",
    "mass": "attention probability mass each head's pattern drops on sampled query rows (1 - kept mass), mean over calls",
}


@dataclass
class CalibrationStats:
    """Running sums per (timestep, layer, head, candidate).

    err_sum/dens_sum/calls: the primary ``metric``'s error, density and call counts at each measured timestep;
    extra_err_sum[name][t]: the same sums for every further metric measured in the same pass;
    seen_timesteps: every timestep the model ran at, measured or not (the dense warm-up and the buckets are cut
    on these, so measuring a subset of steps does not move them).
    """

    candidates: list[PatternSpec]
    layers: int
    heads: int
    geometry: Geometry | None = None
    head_dim: int = 0
    err_sum: dict[float, torch.Tensor] = field(default_factory=dict)  # t -> (layers, heads, C)
    dens_sum: dict[float, torch.Tensor] = field(default_factory=dict)
    calls: dict[float, torch.Tensor] = field(default_factory=dict)  # t -> (layers,) number of observed calls
    metric: str = "rel_l2"
    extra_err_sum: dict[str, dict[float, torch.Tensor]] = field(default_factory=dict)
    seen_timesteps: set[float] = field(default_factory=set)

    def add(self, t: float, layer: int, err: torch.Tensor, dens: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Add one call's (heads, C) errors and densities (and ``extra`` metrics' errors) at timestep ``t``."""
        t = round(float(t), 6)
        self.seen_timesteps.add(t)
        if t not in self.err_sum:
            shape = (self.layers, self.heads, len(self.candidates))
            self.err_sum[t] = torch.zeros(shape, dtype=torch.float64)
            self.dens_sum[t] = torch.zeros(shape, dtype=torch.float64)
            self.calls[t] = torch.zeros(self.layers, dtype=torch.float64)
        self.err_sum[t][layer] += err.double().cpu()
        self.dens_sum[t][layer] += dens.double().cpu()
        self.calls[t][layer] += 1
        for name, value in (extra or {}).items():
            sums = self.extra_err_sum.setdefault(name, {})
            if t not in sums:
                sums[t] = torch.zeros(self.layers, self.heads, len(self.candidates), dtype=torch.float64)
            sums[t][layer] += value.double().cpu()

    @property
    def timesteps(self) -> list[float]:
        """Measured normalised timesteps, from noise (high) to clean (low)."""
        return sorted(self.err_sum, reverse=True)

    @property
    def all_timesteps(self) -> list[float]:
        """Every timestep the model ran at (measured or not), from noise to clean."""
        return sorted(self.seen_timesteps | set(self.err_sum), reverse=True)

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *self.extra_err_sum]

    def mean(self, ts: Sequence[float], metric: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads, C) mean error (of ``metric``, default the primary one) and density over the calls at ``ts``."""
        sums = self.err_sum if metric in (None, self.metric) else self.extra_err_sum[metric]
        err = sum(sums[t] for t in ts)
        dens = sum(self.dens_sum[t] for t in ts)
        n = sum(self.calls[t] for t in ts).clamp(min=1)[:, None, None]
        return err / n, dens / n

    # ------------------------------------------------------------------ saving partial calibrations
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this calibration later (`from_state_dict`); tensors on the CPU."""
        from dataclasses import asdict

        return {
            "candidates": [{"name": c.name, "params": HeadChoice(c, 0, 0).to_json()["params"]} for c in self.candidates],
            "layers": self.layers,
            "heads": self.heads,
            "geometry": asdict(self.geometry) if self.geometry is not None else None,
            "head_dim": self.head_dim,
            "err_sum": self.err_sum,
            "dens_sum": self.dens_sum,
            "calls": self.calls,
            "metric": self.metric,
            "extra_err_sum": self.extra_err_sum,
            "seen_timesteps": sorted(self.seen_timesteps),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CalibrationStats":
        return cls(
            [PatternSpec(c["name"], **c["params"]) for c in state["candidates"]],
            int(state["layers"]),
            int(state["heads"]),
            Geometry(**state["geometry"]) if state["geometry"] is not None else None,
            int(state["head_dim"]),
            dict(state["err_sum"]),
            dict(state["dens_sum"]),
            dict(state["calls"]),
            state["metric"],
            {k: dict(v) for k, v in state["extra_err_sum"].items()},
            set(state["seen_timesteps"]),
        )


def output_projection(module: torch.nn.Module) -> torch.Tensor | None:
    """(dim, heads * head_dim) weight of an attention module's output projection (diffusers' ``to_out[0]``), or
    None when the module has none (e.g. Flux's single-stream blocks project outside the attention module)."""
    to_out = getattr(module, "to_out", None)
    first = to_out[0] if isinstance(to_out, (torch.nn.ModuleList, torch.nn.Sequential)) and len(to_out) else to_out
    weight = getattr(first, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _state_key(spec: PatternSpec) -> tuple:
    """The warm-start state a dynamic candidate uses: candidates differing only in parameters that select from the
    state without shaping it (a pattern module's ``SELECTION_PARAMS``) share one, so k-means candidates of several
    top_p cluster once per call (then a few warm Lloyd steps each) instead of each from scratch."""
    drop = getattr(spec.module, "SELECTION_PARAMS", ())
    return (spec.name, tuple(sorted((k, repr(v)) for k, v in spec.params.items() if k not in drop)))


class _Observer:
    """Compares candidates with dense attention on sampled query rows at every observed call.

    metrics: the first is the primary (allocation) metric, the others are recorded alongside (`METRICS`);
    out_weights[layer]: the layer's output projection weight for ``out_proj_sq`` (None: identity).
    """

    def __init__(
        self,
        stats: CalibrationStats,
        block_size: int,
        rows: int,
        seed: int,
        candidate_fn,
        metrics: Sequence[str] = ("rel_l2",),
        out_weights: Sequence[torch.Tensor | None] | None = None,
    ):
        for m in metrics:
            if m not in METRICS:
                raise ValueError(f"unknown calibration metric {m!r}; known: {', '.join(METRICS)}")
        self.stats = stats
        self.block_size = block_size
        self.rows = rows
        self.gen = torch.Generator().manual_seed(seed)
        self.candidate_fn = candidate_fn
        self.metrics = tuple(metrics)
        self.out_weights = list(out_weights) if out_weights is not None else None
        self.layer_state: dict[tuple, dict] = {}
        self.static_layouts: dict[tuple, Layout] = {}
        self.on_call: Callable[[], None] | None = None

    def restart(self, seed: int) -> None:
        """Start a new calibration run (a prompt) from a known state: row sampling reseeded, k-means warm starts
        dropped; so a calibration resumed after run i gives what an uninterrupted one gives."""
        self.gen.manual_seed(seed)
        self.layer_state.clear()

    def layout(self, spec: PatternSpec, layer: int, geometry: Geometry, q: torch.Tensor, k: torch.Tensor) -> Layout:
        if spec.static:
            key = (spec.key(), geometry)
            if key not in self.static_layouts:
                self.static_layouts[key] = spec.module.build(geometry, geometry.heads, self.block_size, q.device, **spec.params)
            return self.static_layouts[key]
        state = self.layer_state.setdefault((layer, _state_key(spec)), {})
        return spec.module.build(geometry, geometry.heads, self.block_size, q.device, q=q, k=k, state=state, **spec.params)

    @torch.no_grad()
    def __call__(self, layer: int, geometry: Geometry, t: float, q, k, v, scale) -> None:
        stats = self.stats
        if stats.geometry is None:
            stats.geometry = geometry
            stats.head_dim = geometry.head_dim
            if not stats.candidates:
                stats.candidates.extend(self.candidate_fn(geometry, self.block_size))
        B, S, H, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        n = min(self.rows, S)
        rows = torch.randperm(S, generator=self.gen)[:n].sort().values.to(q.device)
        layouts = [self.layout(spec, layer, geometry, q, k) for spec in stats.candidates]
        C = len(layouts)
        errs = {m: torch.zeros(H, C, dtype=torch.float64) for m in self.metrics}
        dens = torch.stack([lay.density_per_head().mean(0).cpu() for lay in layouts], -1)  # (H, C)
        weight = None
        if "out_proj_sq" in self.metrics and self.out_weights is not None and self.out_weights[layer] is not None:
            w = self.out_weights[layer]
            if w.shape[1] == H * D:
                weight = w.detach().to(q.device, torch.float32).view(w.shape[0], H, D).permute(1, 2, 0)  # (H, D, dim)
        for b in range(B):
            qs = q[b, rows].float().transpose(0, 1)  # (H, n, D)
            kb, vb = k[b].float().transpose(0, 1), v[b].float().transpose(0, 1)  # (H, S, D)
            scores = torch.einsum("hnd,hsd->hns", qs, kb) * scale
            probs = torch.exp(scores - scores.amax(-1, keepdim=True))
            total = probs.sum(-1, keepdim=True)
            dense = torch.einsum("hns,hsd->hnd", probs, vb) / total
            dense_norm = dense.norm(dim=(1, 2)).clamp(min=1e-12)
            if weight is not None:  # the layer's projected dense output: every head's contribution summed
                projected_sq = torch.einsum("hnd,hdo->no", dense, weight).pow(2).sum().clamp(min=1e-24)
            else:
                projected_sq = dense.pow(2).sum().clamp(min=1e-24)
            for c, lay in enumerate(layouts):
                if stats.candidates[c].name == "dense":
                    continue
                l = b if lay.batch > 1 else 0
                mask = lay.rows_key_mask(l, rows)  # (H, n, S)
                p = probs * mask
                kept = p.sum(-1, keepdim=True)
                out = torch.einsum("hns,hsd->hnd", p, vb) / kept.clamp(min=1e-30)
                diff = out - dense
                if "rel_l2" in errs:
                    errs["rel_l2"][:, c] += (diff.norm(dim=(1, 2)) / dense_norm).double().cpu()
                if "out_proj_sq" in errs:
                    moved = torch.einsum("hnd,hdo->hno", diff, weight) if weight is not None else diff
                    errs["out_proj_sq"][:, c] += (moved.pow(2).sum(dim=(1, 2)) / projected_sq).double().cpu()
                if "mass" in errs:
                    errs["mass"][:, c] += (1 - (kept / total).squeeze(-1)).mean(-1).double().cpu()
        primary, *extra = self.metrics
        stats.add(t, layer, errs[primary] / B, dens, {m: errs[m] / B for m in extra})
        if self.on_call is not None:
            self.on_call()


def observe(
    targets: Sequence[tuple[torch.nn.Module, Any]],
    run: Callable[[list["_Observer"]], Any],
    *,
    candidates: Sequence[PatternSpec] | None = None,
    block_size: int = 128,
    query_rows: int = 256,
    seed: int = 0,
    metrics: Sequence[str] = ("rel_l2",),
    measure_step: Callable[[int], bool] | None = None,
    stats: Sequence[CalibrationStats] | None = None,
    on_call: Callable[[], None] | None = None,
    patterns: Sequence[str] | None = None,
) -> list[CalibrationStats]:
    """Patch every (transformer, adapter) of ``targets`` dense, attach one observer each, call ``run(observers)``.

    Transformers of one pipeline share one step clock (as `sparse_dit.patch` gives them); ``measure_step(step)``
    selects the denoising steps whose calls are measured (None: all; unmeasured steps are still recorded in
    ``seen_timesteps``). ``stats``: partial statistics to continue (one per target). ``patterns``: the pattern
    families `default_candidates` offers when ``candidates`` is None (None: all). Returns one
    `CalibrationStats` per target; the models are unpatched afterwards, also when ``run`` raises.
    """
    if not targets:
        raise ValueError("nothing to calibrate: no transformer given")
    if patterns is not None:
        from sparse_dit import patterns as registry

        unknown = sorted(set(patterns) - set(registry.names()))
        if unknown:
            raise ValueError(f"unknown pattern(s) {unknown}; known: {', '.join(registry.names())}")

    def candidate_fn(geometry: Geometry, block: int) -> list[PatternSpec]:
        return default_candidates(geometry, block, patterns)

    observers = []
    for i, (transformer, adapter) in enumerate(targets):
        modules = adapter.self_attention(transformer)
        st = stats[i] if stats is not None else CalibrationStats(
            list(candidates or []), layers=len(modules), heads=int(modules[0].heads), metric=metrics[0]
        )
        if st.metric != metrics[0]:
            raise ValueError(f"the partial calibration measured metric {st.metric!r}, not {metrics[0]!r}")
        obs = _Observer(st, block_size, query_rows, seed, candidate_fn, metrics, [output_projection(m) for m in modules])
        obs.on_call = on_call
        observers.append(obs)
    pipeline_like = [t for t, _ in targets]
    for transformer in pipeline_like:
        sparse_dit.unpatch(transformer)
    clocks = None
    try:
        for (transformer, _), obs in zip(targets, observers):
            sparse_dit.patch(transformer, pattern="dense")
            state = sparse_dit.patch_state(transformer)
            if clocks is None:
                clocks = state.clocks
            state.clocks = clocks  # one clock for the pipeline's transformers (Wan 2.2 hands over mid-generation)
            state.observer = _measured_only(obs, state, measure_step)
        run(observers)
    finally:
        for transformer in pipeline_like:
            sparse_dit.unpatch(transformer)
    return [obs.stats for obs in observers]


def _measured_only(obs: _Observer, state: Any, measure_step: Callable[[int], bool] | None) -> Callable[..., None]:
    if measure_step is None:
        return obs

    def observer(layer: int, geometry: Geometry, t: float, *rest: Any) -> None:
        if measure_step(state.clock.step):
            obs(layer, geometry, t, *rest)
        else:
            obs.stats.seen_timesteps.add(round(float(t), 6))

    return observer


def calibrate(
    pipe_or_transformer: Any,
    run: Callable[[], Any],
    *,
    candidates: Sequence[PatternSpec] | None = None,
    block_size: int = 128,
    query_rows: int = 256,
    seed: int = 0,
    on_call: Callable[[], None] | None = None,
    metrics: Sequence[str] = ("rel_l2",),
    measure_step: Callable[[int], bool] | None = None,
) -> CalibrationStats:
    """Run ``run()`` (which drives the dense model) and measure every candidate on every attention call.

    candidates: fixed candidate list, or None for `default_candidates` sized to the first call's geometry.
    metrics: error metrics (`METRICS`), the first one drives allocation. measure_step: which denoising steps
    are measured (None: all). Returns the per-(timestep, layer, head, candidate) error and density sums.
    For a pipeline with several transformers (Wan 2.2) use `sparse_dit.calibrate.profile_pipeline`.
    """
    targets = sparse_dit.pipelines.resolve_transformers(pipe_or_transformer)
    if len(targets) != 1:
        raise ValueError("calibrate one transformer at a time (pass the transformer, not a two-transformer pipeline)")
    (stats,) = observe(targets, lambda observers: run(), candidates=candidates, block_size=block_size, query_rows=query_rows,
                       seed=seed, metrics=metrics, measure_step=measure_step, on_call=on_call)
    if not stats.err_sum:
        raise RuntimeError("calibration saw no self-attention call: does run() call the model?")
    return stats


# ---------------------------------------------------------------------------------------- allocation
def allocate_density(errors: torch.Tensor, densities: torch.Tensor, target: float, max_table: int = 20_000_000) -> torch.Tensor:
    """Pick one option per item minimising the summed error with mean density <= target.

    errors, densities: (N, C). Returns (N,) long option indices. Small problems are solved exactly by a
    dynamic programme over density quantised upwards (so the result is always feasible); large ones by a
    Lagrangian sweep (the smallest multiplier that meets the target) plus a greedy pass that spends the
    remaining budget on the best error reduction per unit of density. The sweep's gap is at most one
    item's error, negligible against thousands of (bucket, layer, head) items.
    """
    N, C = errors.shape
    errors, densities = errors.double(), densities.double()
    sparsest = densities.argmin(1)
    if float(densities.gather(1, sparsest[:, None]).sum()) > target * N + 1e-9:
        return sparsest  # infeasible: sparsest everywhere
    resolution = min(10_000, int((max_table / max(1.0, target * N * N)) ** 0.5))
    if resolution >= 100:
        return _allocate_exact(errors, densities, target, resolution)
    return _allocate_lagrangian(errors, densities, target)


def _allocate_exact(errors: torch.Tensor, densities: torch.Tensor, target: float, resolution: int) -> torch.Tensor:
    N, C = errors.shape
    units = torch.ceil(densities * resolution - 1e-6).long().clamp(min=0)
    budget = int(math.floor(target * N * resolution + 1e-6))
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = torch.zeros(N, budget + 1, dtype=torch.int16)
    for i in range(N):
        options = torch.full((C, budget + 1), inf, dtype=torch.float64)
        for c in range(C):
            u = int(units[i, c])
            if u <= budget:
                options[c, u:] = best[: budget + 1 - u] + errors[i, c]
        best, picks[i] = options.min(0)
    if not bool(torch.isfinite(best).any()):
        # densities within float noise of the target pass the feasibility check but quantise one unit over the
        # budget; the sweep compares unquantised sums
        return _allocate_lagrangian(errors, densities, target)
    b = int(best.argmin())
    choice = torch.zeros(N, dtype=torch.long)
    for i in range(N - 1, -1, -1):
        c = int(picks[i, b])
        choice[i] = c
        b -= int(units[i, c])
    return choice


def _allocate_lagrangian(errors: torch.Tensor, densities: torch.Tensor, target: float) -> torch.Tensor:
    N, C = errors.shape
    budget = target * N

    def pick(lam: float) -> torch.Tensor:
        return (errors + lam * densities).argmin(1)

    def used(choice: torch.Tensor) -> float:
        return float(densities.gather(1, choice[:, None]).sum())

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e12:
        hi *= 4
    for _ in range(80):
        mid = (lo + hi) / 2
        if used(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    if used(choice) > budget:
        choice = densities.argmin(1)
    spare = budget - used(choice)
    while True:
        gain = errors.gather(1, choice[:, None]) - errors  # error reduction of switching
        extra = densities - densities.gather(1, choice[:, None])
        ok = (gain > 1e-12) & (extra <= spare + 1e-12)
        if not ok.any():
            break
        ratio = torch.where(ok, gain / extra.clamp(min=1e-12), torch.full_like(gain, -1.0))
        i, c = divmod(int(ratio.argmax()), C)
        spare -= float(extra[i, c])
        choice[i] = c
    return choice


def allocate_error(errors: torch.Tensor, costs: torch.Tensor, max_error: float) -> torch.Tensor:
    """Cheapest option per item whose error is <= max_error (dense, error 0, always qualifies)."""
    ok = errors <= max_error
    return torch.where(ok, costs.double(), torch.full_like(costs.double(), float("inf"))).argmin(1)


def build_profile(
    stats: CalibrationStats,
    *,
    target_density: float | Sequence[float] | None = None,
    max_error: float | None = None,
    num_buckets: int = 2,
    dense_fraction: float = 0.2,
    dense_above: float | None = None,
    dense_layers: int = 0,
    block_size: int = 128,
    cost_model: dict[str, Any] | None = None,
    model_class: str = "",
    model_id: str = "",
    calibration: dict[str, Any] | None = None,
    balance_ranks: int = 1,
    bucket_weights: Sequence[float] | None = None,
) -> Profile:
    """Turn calibration statistics into a `Profile` under one budget knob (give exactly one).

    The first ``dense_fraction`` of the timesteps the model ran at stay dense (or every timestep above
    ``dense_above`` when given: a pipeline with several transformers cuts its warm-up once for all of them);
    the rest are cut into ``num_buckets`` contiguous buckets, each planned from the measured timesteps inside
    it (or the nearest measured one); the first ``dense_layers`` layers stay dense everywhere.
    target_density: one mean density for all buckets together, or one per bucket (per-bucket budgets).
    cost_model: per-pattern cost table (`sparse_dit.costmodel`; default: a FLOP estimate for this geometry).
    balance_ranks: for Ulysses context parallelism over this many ranks, even out the cost of each layer's rank
    slices of heads afterwards (`context_parallel.balance_choices`: swaps between heads of different slices, density
    never above the budget, a layer's error at most 10% higher); the header's ``balance`` says before and after.
    bucket_weights: with one overall ``target_density``, one factor per bucket (noise to clean) on the errors the
    allocation trades against density, e.g. ``(2, 1)``: an error in the high-noise bucket counts twice, so the budget
    moves there (errors of early steps carry through every later step); the plan's stored errors stay unweighted.
    """
    from sparse_dit import costmodel

    if (target_density is None) == (max_error is None):
        raise ValueError("give exactly one budget: target_density=... or max_error=...")
    per_bucket = target_density is not None and not isinstance(target_density, (int, float))
    targets = [float(x) for x in target_density] if per_bucket else ([float(target_density)] if target_density is not None else [])
    if any(not 0 < x <= 1 for x in targets):
        raise ValueError(f"target_density must be in (0, 1]; got {target_density}")
    if not stats.err_sum:
        raise ValueError("the calibration measured no attention call")
    if bucket_weights is not None:
        bucket_weights = [float(w) for w in bucket_weights]
        if per_bucket or not targets:
            raise ValueError("bucket_weights apply to one overall target_density (per-bucket budgets already say where it goes)")
        if not all(w > 0 and math.isfinite(w) for w in bucket_weights):
            raise ValueError(f"bucket_weights must be positive numbers, one per bucket; got {bucket_weights}")
    if cost_model is None:
        cost_model = costmodel.flop_cost_model(stats.geometry, block_size) if stats.geometry else DEFAULT_COST_MODEL
    ts = stats.all_timesteps
    if dense_above is None:
        n_dense = min(len(ts) - 1, math.ceil(dense_fraction * len(ts))) if dense_fraction > 0 else 0
        dense_above = 1.0 if n_dense == 0 else (ts[n_dense - 1] + ts[n_dense]) / 2
    rest = [t for t in ts if t <= dense_above] or ts[-1:]
    num_buckets = max(1, min(num_buckets, len(rest)))
    if per_bucket and len(targets) != num_buckets:
        raise ValueError(f"{len(targets)} per-bucket target densities for {num_buckets} buckets (fewer timesteps than buckets?)")
    if bucket_weights is not None and len(bucket_weights) != num_buckets:
        raise ValueError(f"{len(bucket_weights)} bucket_weights for {num_buckets} buckets (fewer timesteps than buckets?)")
    groups = [rest[i * len(rest) // num_buckets : (i + 1) * len(rest) // num_buckets] for i in range(num_buckets)]
    edges = [max(dense_above, groups[0][0])] + [(g[-1] + nxt[0]) / 2 for g, nxt in zip(groups, groups[1:])] + [0.0]
    buckets = [(edges[i + 1], edges[i]) for i in range(num_buckets)]
    measured = stats.timesteps

    def measured_in(group: list[float]) -> list[float]:
        inside = [t for t in measured if group[-1] - 1e-9 <= t <= group[0] + 1e-9]
        if inside:
            return inside
        middle = (group[0] + group[-1]) / 2
        return [min(measured, key=lambda t: abs(t - middle))]

    cands = stats.candidates
    C, L, H = len(cands), stats.layers, stats.heads
    err = torch.zeros(num_buckets, L, H, C, dtype=torch.float64)
    dens = torch.zeros_like(err)
    for i, g in enumerate(groups):
        err[i], dens[i] = stats.mean(measured_in(g))
    dense_idx = next(i for i, c in enumerate(cands) if c.name == "dense")
    dens[..., dense_idx] = 1.0
    err[..., dense_idx] = 0.0
    allowed = torch.ones(num_buckets, L, H, C, dtype=torch.bool)
    allowed[:, :dense_layers] = False
    allowed[:, :dense_layers, :, dense_idx] = True
    big = 1e9
    err_a = torch.where(allowed, err, torch.full_like(err, big))
    dens_a = torch.where(allowed, dens, torch.full_like(dens, big))
    costs = torch.tensor([[candidate_cost(c, float(d), cost_model) for c, d in zip(cands, row)] for row in dens.reshape(-1, C).tolist()],
                         dtype=torch.float64).view(num_buckets, L, H, C)
    costs = torch.where(allowed, costs, torch.full_like(costs, big))
    if per_bucket:
        choice = torch.stack([allocate_density(err_a[b].reshape(-1, C), dens_a[b].reshape(-1, C), targets[b]) for b in range(num_buckets)])
        budget: dict[str, Any] = {"target_density": targets}
    elif targets:
        weighted = err_a
        if bucket_weights is not None:
            w = torch.tensor(bucket_weights, dtype=err_a.dtype).view(-1, 1, 1, 1)
            weighted = torch.where(err_a < big, err_a * w, err_a)
        choice = allocate_density(weighted.reshape(-1, C), dens_a.reshape(-1, C), targets[0])
        budget = {"target_density": targets[0]}
        if bucket_weights is not None:
            budget["bucket_weights"] = bucket_weights
    else:
        choice = allocate_error(err_a.reshape(-1, C), costs.reshape(-1, C), max_error)
        budget = {"max_error": max_error}
    choice = choice.reshape(num_buckets, L, H)
    balance = None
    if balance_ranks > 1:
        from sparse_dit.context_parallel import balance_choices, imbalance

        def step_imbalance(ch: torch.Tensor) -> float:
            return round(float(imbalance(costs.gather(-1, ch[..., None]).squeeze(-1), balance_ranks).mean()), 4)

        before = step_imbalance(choice)
        choice = balance_choices(choice, err_a, dens_a, costs, balance_ranks)
        balance = {"ranks": balance_ranks, "imbalance_before": before, "imbalance_after": step_imbalance(choice)}
    plan = [
        [[HeadChoice(cands[int(choice[b, l, h])], float(err[b, l, h, choice[b, l, h]]), float(dens[b, l, h, choice[b, l, h]])) for h in range(H)] for l in range(L)]
        for b in range(num_buckets)
    ]
    geometry = stats.geometry
    header = {
        "model_class": model_class,
        "model_id": model_id,
        "layers": L,
        "heads": H,
        "head_dim": stats.head_dim,
        "calibration": {
            **(calibration or {}),
            "grid": list(geometry.grid) if geometry else None,
            "text_len": geometry.text_len if geometry else 0,
            "timesteps": [round(t, 4) for t in ts],
            "measured_timesteps": [round(t, 4) for t in measured],
            "metrics_recorded": stats.metrics,
            "candidates": [{k: v for k, v in HeadChoice(c, 0, 0).to_json().items() if k in ("pattern", "params")} for c in cands],
        },
        "budget": budget,
        "metric": METRICS.get(stats.metric, stats.metric),
        "metric_name": stats.metric,
        "dense_above": round(dense_above, 6),
        "dense_layers": dense_layers,
        "block_size": block_size,
        "cost_model": cost_model,
        "library_version": sparse_dit.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if balance is not None:
        header["balance"] = balance
    profile = Profile(header, buckets, plan)
    chosen = costs.gather(-1, choice[..., None]).squeeze(-1)  # (buckets, L, H)
    profile.header["cost"] = costmodel.expected_speedup(profile, cost_model)
    profile.summary = {
        **profile.default_summary(),
        "mean_error": round(float(err.gather(-1, choice[..., None]).mean()), 5),
        "relative_attention_cost": round(float(chosen.mean()), 4),
        "expected_attention_speedup": profile.header["cost"]["sparse_steps"],
        "per_bucket_density": [round(float(dens[b].gather(-1, choice[b][..., None]).mean()), 4) for b in range(num_buckets)],
    }
    return profile


def uniform_choice(stats: CalibrationStats, name: str, target_density: float, groups: Sequence[float] | None = None) -> tuple[PatternSpec, float, float]:
    """The candidate of pattern ``name`` whose mean density is closest to ``target_density``: (spec, density, error)."""
    ts = list(groups or stats.timesteps)
    err, dens = stats.mean(ts)
    best = None
    for c, spec in enumerate(stats.candidates):
        if spec.name != name:
            continue
        d = float(dens[..., c].mean())
        e = float(err[..., c].mean())
        if best is None or abs(d - target_density) < abs(best[1] - target_density):
            best = (spec, d, e)
    if best is None:
        raise ValueError(f"no candidate of pattern {name!r} was calibrated")
    return best
