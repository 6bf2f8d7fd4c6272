"""Profile a real diffusers pipeline: load it, run it densely on a calibration set, write one profile per transformer.

    import sparse_dit
    profiles = sparse_dit.profile_pipeline(pipe, ["a red fox in snow", ...], target_density=0.2,
                                           height=480, width=832, num_frames=81, num_inference_steps=20)
    sparse_dit.patch(pipe, profile=profiles)       # {"transformer": Profile, ...}: Wan 2.2 gets one per expert

Every family the adapters support works the same way: the pipeline is called with the arguments its
``__call__`` accepts (prompt, height, width, num_frames, steps, guidance, image for image-to-video,
``output_type="latent"`` so the VAE never decodes), while `sparse_dit.profiler.observe` measures every
candidate pattern of every head against dense attention. A pipeline with two transformers (Wan 2.2's
high- and low-noise experts) is calibrated in one pass, one statistics set per transformer; the dense
warm-up is cut once on the pipeline's timesteps, so both experts share it.

The calibration set (`CalibrationSet`) is the prompts, each run with every seed, the images of
image-to-video pipelines (cycled over the runs), which denoising steps are measured, how many query rows are
sampled per head and call, and the error metrics recorded (the first drives the allocation).

Resuming: after every run (one prompt and seed) the statistics so far are written to ``partial_path``
(atomically); with ``resume=True`` a calibration finds that file, checks it was made with the same model and
calibration set, and continues after the last finished run. The row sampling is reseeded per run, so a
resumed calibration equals an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparse_dit.patterns import PatternSpec
from sparse_dit.profile import Profile

# Used when no prompts are given: varied subjects, motion and camera work, so heads are measured on more
# than one kind of content (a single-prompt profile does not generalise; issue 15).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "A red fox trotting through fresh snow in a birch forest at sunrise, cinematic.",
    "A busy city street at night in the rain, neon reflections, people with umbrellas, the camera pans left.",
    "Close-up of a hummingbird hovering at a purple flower, slow motion, shallow depth of field.",
    "Aerial shot of ocean waves breaking on a rocky coast, white foam, drone flying forward.",
    "Two people talking at a cafe table, handheld camera, warm afternoon light.",
    "A cartoon robot dancing on a stage with colourful spotlights.",
    "Time-lapse of clouds over a mountain range, sunlight sweeping across the valley.",
    "A kitchen counter where a chef chops vegetables quickly, top-down view.",
)


@dataclass(frozen=True)
class CalibrationRun:
    """One dense generation of the calibration: run ``index`` of the set."""

    index: int
    prompt: str
    seed: int
    image: Any = None


@dataclass(frozen=True)
class CalibrationSet:
    """What the dense model runs on and what is measured.

    prompts: each run with every seed in ``seeds``; images: conditioning images of image-to-video pipelines,
    cycled over the runs; measure_steps: denoising step indices whose attention calls are measured (None:
    all; the others still set the timestep buckets); query_rows: query rows sampled per head and call;
    metrics: error metrics recorded (`sparse_dit.profiler.METRICS`), the first drives the allocation.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    images: tuple[Any, ...] = ()
    measure_steps: tuple[int, ...] | None = None
    query_rows: int = 256
    metrics: tuple[str, ...] = ("rel_l2",)

    def __post_init__(self) -> None:
        from sparse_dit.profiler import METRICS

        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("the calibration set needs at least one non-empty prompt")
        if not self.seeds:
            raise ValueError("the calibration set needs at least one seed")
        if int(self.query_rows) < 1:
            raise ValueError(f"query_rows must be >= 1; got {self.query_rows}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if not self.metrics or unknown:
            raise ValueError(f"unknown calibration metric(s) {unknown or '(none given)'}; known: {', '.join(METRICS)}")
        if self.measure_steps is not None and (not self.measure_steps or min(self.measure_steps) < 0):
            raise ValueError(f"measure_steps must be step indices >= 0; got {self.measure_steps}")

    def runs(self) -> list[CalibrationRun]:
        """Every (prompt, seed) pair in order, with its image (if any)."""
        pairs = [(p, s) for p in self.prompts for s in self.seeds]
        return [
            CalibrationRun(i, p, int(s), self.images[i % len(self.images)] if self.images else None) for i, (p, s) in enumerate(pairs)
        ]

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the set (images by description), to check a partial calibration matches."""
        d = asdict(self)
        d["images"] = [_describe_image(im) for im in self.images]
        return json.loads(json.dumps(d, default=str))


def _describe_image(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    size = getattr(image, "size", None)
    return f"{type(image).__name__}{tuple(size) if size is not None else ''}"


# ------------------------------------------------------------------------------------------- loading
def supported_transformer_classes() -> set[str]:
    from sparse_dit.pipelines import ADAPTERS

    return {c for a in ADAPTERS for c in a.transformer_classes}


def read_pipeline_config(model: str) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (a local folder or a hub id), checked for a supported transformer,
    before any weights are loaded. Raises FileNotFoundError / ValueError with a one-line reason."""
    from diffusers import DiffusionPipeline

    from sparse_dit.pipelines import supported_families

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model} is not a diffusers pipeline folder (no model_index.json); save one with pipe.save_pretrained()")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"no pipeline folder {model}")
    try:
        config = dict(DiffusionPipeline.load_config(str(path) if path.exists() else model))
    except Exception as err:  # hub errors come in many types; the reason is in the message
        raise ValueError(f"cannot read the pipeline config of {model!r}: {str(err).splitlines()[0]}") from None
    components = {k: v[1] for k, v in config.items() if isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], str)}
    if not set(components.values()) & supported_transformer_classes():
        raise ValueError(
            f"{model}: {config.get('_class_name')} has no transformer sparse-dit can profile (components: "
            f"{', '.join(sorted(set(components.values()))) or 'none'}); supported: {supported_families()}"
        )
    return config


def pipeline_needs_image(pipeline_class: Any) -> bool:
    """Whether the pipeline's ``__call__`` requires an ``image`` (image-to-video)."""
    param = inspect.signature(pipeline_class.__call__).parameters.get("image")
    return param is not None and param.default is inspect.Parameter.empty


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for diffusers >= 0.42 (which renamed it), ``torch_dtype=`` before."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def load_pipeline(model: str, device: "str | torch.device" = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained(model)`` (a local folder or a hub id) on ``device``, in ``dtype``
    (default: bfloat16 on CUDA, float32 elsewhere), after `read_pipeline_config` checked it is supported."""
    from diffusers import DiffusionPipeline

    read_pipeline_config(model)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(model, **_dtype_kwarg(dtype))
    return pipe.to(device)


def load_images(paths: Sequence[str]) -> list[Any]:
    """RGB PIL images from files (for image-to-video calibration); a missing file is a one-line error."""
    from PIL import Image

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no image file {missing[0]}")
    return [Image.open(p).convert("RGB") for p in paths]


# ------------------------------------------------------------------------------------- calibrating
@dataclass
class _Partial:
    """What `_save_partial` writes: the fingerprint, runs done, and the statistics per transformer."""

    fingerprint: dict[str, Any]
    done: int = 0
    stats: dict[str, dict] = field(default_factory=dict)


def _save_partial(path: Path, partial: _Partial) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(asdict(partial), tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous partial intact


def _load_partial(path: Path, fingerprint: dict[str, Any]) -> _Partial | None:
    if not path.is_file():
        return None
    data = torch.load(path, weights_only=True)  # plain containers and tensors: no pickled code runs
    if data.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path} holds a partial calibration made with other settings (model, calibration set or candidates); "
            "delete it or run without resume"
        )
    return _Partial(**data)


def run_calibration(
    targets: Sequence[tuple[str, torch.nn.Module, Any]],
    calibration: CalibrationSet,
    run_one: Callable[[CalibrationRun], Any],
    *,
    candidates: Sequence[PatternSpec] | None = None,
    patterns: Sequence[str] | None = None,
    block_size: int = 128,
    seed: int = 0,
    partial_path: "str | os.PathLike | None" = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Calibrate ``targets`` ((name, transformer, adapter), e.g. ("transformer", pipe.transformer, adapter))
    by calling ``run_one(run)`` for every run of ``calibration``; returns ``{name: CalibrationStats}``.

    partial_path: where the statistics are saved after every run; resume: continue from that file.
    on_step: called once per denoising step (every transformer call at a new timestep).
    """
    from sparse_dit.profiler import CalibrationStats, observe

    runs = calibration.runs()
    fingerprint = {"calibration": calibration.fingerprint(), "block_size": block_size, "seed": seed, "patterns": patterns,
                   "candidates": [repr(c) for c in candidates] if candidates else None, **(fingerprint or {})}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    path = Path(partial_path) if partial_path is not None else None
    partial = _load_partial(path, fingerprint) if (resume and path is not None) else None
    if partial is None:
        partial = _Partial(fingerprint)
    previous = [CalibrationStats.from_state_dict(partial.stats[name]) for name, _, _ in targets] if partial.stats else None
    measure = None if calibration.measure_steps is None else set(calibration.measure_steps).__contains__

    def drive(observers: list) -> None:
        import sparse_dit

        handles = []
        if on_step is not None:  # one tick per new (generation, step) of the transformers' shared clock
            seen: list[tuple[int, int]] = []

            def after(module: torch.nn.Module, *_: Any) -> None:
                clock = sparse_dit.patch_state(module).clock
                key = (clock.generation, clock.step)
                if not seen or seen[-1] != key:
                    seen[:] = [key]
                    on_step()

            handles = [t.register_forward_hook(after) for _, t, _ in targets]
        try:
            for run in runs[partial.done:]:
                for i, obs in enumerate(observers):
                    obs.restart(seed * 1_000_003 + run.index * 101 + i)
                with torch.no_grad():
                    run_one(run)
                partial.done = run.index + 1
                if path is not None:
                    partial.stats = {name: obs.stats.state_dict() for (name, _, _), obs in zip(targets, observers)}
                    _save_partial(path, partial)
        finally:
            for h in handles:
                h.remove()

    stats = observe(
        [(t, a) for _, t, a in targets],
        drive,
        candidates=candidates,
        patterns=patterns,
        block_size=block_size,
        query_rows=calibration.query_rows,
        seed=seed,
        metrics=calibration.metrics,
        measure_step=measure,
        stats=previous,
    )
    if not any(s.err_sum for s in stats):
        raise RuntimeError("calibration measured no self-attention call (are measure_steps within the denoising steps?)")
    return {name: s for (name, _, _), s in zip(targets, stats)}


def shared_dense_above(stats: Sequence[Any], dense_fraction: float) -> float:
    """The warm-up cut on every timestep any transformer of the pipeline ran at: the first ``dense_fraction``
    of them run dense (1.0: none)."""
    ts = sorted({t for s in stats for t in s.all_timesteps}, reverse=True)
    n_dense = min(len(ts) - 1, math.ceil(dense_fraction * len(ts))) if dense_fraction > 0 else 0
    return 1.0 if n_dense <= 0 else (ts[n_dense - 1] + ts[n_dense]) / 2


def build_profiles(
    stats: dict[str, Any],
    transformers: dict[str, torch.nn.Module],
    *,
    target_density: float | Sequence[float] | None = None,
    max_error: float | None = None,
    num_buckets: int = 2,
    dense_fraction: float = 0.2,
    dense_layers: int = 0,
    block_size: int = 128,
    cost_model: dict[str, Any] | None = None,
    model_id: str = "",
    calibration: dict[str, Any] | None = None,
) -> dict[str, Profile]:
    """One `Profile` per transformer from its statistics, with the dense warm-up shared across them."""
    from sparse_dit.profiler import build_profile

    measured = {name: s for name, s in stats.items() if s.err_sum}
    dense_above = shared_dense_above(list(measured.values()), dense_fraction)
    out = {}
    for name, s in measured.items():
        info = dict(calibration or {})
        if len(stats) > 1:
            info["pipeline_attribute"] = name
        out[name] = build_profile(
            s, target_density=target_density, max_error=max_error, num_buckets=num_buckets, dense_above=dense_above,
            dense_layers=dense_layers, block_size=block_size, cost_model=cost_model,
            model_class=type(transformers[name]).__name__, model_id=model_id, calibration=info,
        )
    return out


def pipeline_call_kwargs(pipe: Any, run: CalibrationRun, settings: dict[str, Any]) -> dict[str, Any]:
    """The pipeline call of one calibration run: ``settings`` (height, width, num_frames, num_inference_steps,
    guidance_scale, max_sequence_length, extra arguments) plus prompt, seed and image, restricted to the
    arguments the pipeline's ``__call__`` accepts; latents out, no VAE decoding."""
    accepted = inspect.signature(type(pipe).__call__).parameters
    kwargs = {**settings, "prompt": run.prompt, "output_type": "latent",
              "generator": torch.Generator("cpu").manual_seed(run.seed), "image": run.image}
    return {k: v for k, v in kwargs.items() if v is not None and k in accepted}


def profile_pipeline(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    target_density: float | Sequence[float] | None = None,
    max_error: float | None = None,
    seeds: Sequence[int] = (0,),
    images: Sequence[Any] = (),
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    measure_steps: Sequence[int] | None = None,
    query_rows: int = 256,
    metrics: Sequence[str] = ("rel_l2",),
    candidates: Sequence[PatternSpec] | None = None,
    patterns: Sequence[str] | None = None,
    block_size: int = 128,
    num_buckets: int = 2,
    dense_fraction: float = 0.2,
    dense_layers: int = 0,
    cost_model: dict[str, Any] | None = None,
    measure_cost: bool = False,
    seed: int = 0,
    partial_path: "str | os.PathLike | None" = None,
    resume: bool = False,
    on_step: Callable[[], None] | None = None,
    model_id: str | None = None,
) -> dict[str, Profile]:
    """Calibrate a diffusers pipeline of any supported family and return ``{pipeline attribute: Profile}``
    (``{"transformer": ...}``, plus ``"transformer_2"`` for Wan 2.2), ready for ``sparse_dit.patch(pipe, profile=...)``.

    prompts: calibration prompts (default `DEFAULT_PROMPTS`), each run with every seed of ``seeds``; images:
    conditioning images for image-to-video pipelines (required there), cycled over the runs. height, width,
    num_frames, num_inference_steps, guidance_scale, max_sequence_length: the generation settings (None: the
    pipeline's own defaults); call_kwargs: further pipeline arguments. measure_steps, query_rows, metrics:
    see `CalibrationSet`. candidates: the candidate patterns (default: `sparse_dit.profiler.default_candidates`
    sized to the calibration grid, restricted to the families in ``patterns`` when given). Budget: exactly one of target_density (one value, or one per bucket) and max_error.
    measure_cost: time the cost table on this CUDA GPU (`sparse_dit.costmodel.measure_cost_model`) instead of
    the FLOP estimate. partial_path/resume: see the module docstring; the partial file is removed on success.
    on_step: called once per denoising step (for a progress bar). Raises ValueError before any generation on
    bad input.
    """
    import sparse_dit

    if (target_density is None) == (max_error is None):
        raise ValueError("give exactly one budget: target_density=... or max_error=...")
    densities = [target_density] if isinstance(target_density, (int, float)) else list(target_density or [])
    if any(not 0 < float(d) <= 1 for d in densities):
        raise ValueError(f"target_density must be in (0, 1]; got {target_density}")
    if len(densities) > 1 and len(densities) != num_buckets:
        raise ValueError(f"{len(densities)} per-bucket target densities for {num_buckets} buckets")
    if int(num_inference_steps) < 1:
        raise ValueError("num_inference_steps must be >= 1")
    pipeline_class = type(pipe)
    if pipeline_needs_image(pipeline_class) and not images:
        raise ValueError(f"{pipeline_class.__name__} is image-to-video: give calibration images (images=[...] or --images)")
    calibration = CalibrationSet(tuple(prompts or DEFAULT_PROMPTS), tuple(int(s) for s in seeds), tuple(images),
                                 tuple(measure_steps) if measure_steps is not None else None, int(query_rows), tuple(metrics))
    resolved = sparse_dit.pipelines.resolve_transformers(pipe)
    names = {id(unwrap): name for name in ("transformer", "transformer_2")
             if (unwrap := sparse_dit.pipelines.unwrap_compiled(getattr(pipe, name, None))) is not None}
    targets = [(names.get(id(t), "transformer"), t, a) for t, a in resolved]
    settings = {"height": height, "width": width, "num_frames": num_frames, "num_inference_steps": int(num_inference_steps),
                "guidance_scale": guidance_scale, "max_sequence_length": max_sequence_length, **(call_kwargs or {})}
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # the caller's bar counts steps over the whole calibration
    model_id = model_id or getattr(getattr(pipe, "config", None), "_name_or_path", "") or pipeline_class.__name__
    stats = run_calibration(
        targets, calibration, lambda run: pipe(**pipeline_call_kwargs(pipe, run, settings)),
        candidates=candidates, patterns=patterns, block_size=block_size, seed=seed, partial_path=partial_path, resume=resume,
        fingerprint={"model": model_id, "pipeline": pipeline_class.__name__, "settings": settings}, on_step=on_step,
    )
    if measure_cost:
        cost_model = measured_cost_model_or_estimate(next(s for s in stats.values() if s.geometry is not None), block_size,
                                                     _device_of(pipe))
    profiles = build_profiles(
        stats, {name: t for name, t, _ in targets}, target_density=target_density, max_error=max_error,
        num_buckets=num_buckets, dense_fraction=dense_fraction, dense_layers=dense_layers, block_size=block_size,
        cost_model=cost_model, model_id=model_id,
        calibration={"pipeline": pipeline_class.__name__, "prompts": list(calibration.prompts), "seeds": list(calibration.seeds),
                     "images": [_describe_image(im) for im in calibration.images], "settings": _jsonable(settings),
                     "measure_steps": list(calibration.measure_steps) if calibration.measure_steps is not None else None,
                     "query_rows": calibration.query_rows, "seed": seed, "device": str(_device_of(pipe))},
    )
    if partial_path is not None:
        Path(partial_path).unlink(missing_ok=True)
    return profiles


def measured_cost_model_or_estimate(stats: Any, block_size: int, device: torch.device) -> dict[str, Any] | None:
    """The cost table timed on ``device`` at the calibration geometry; if timing fails, one warning and None
    (`build_profile` then uses the FLOP estimate): a finished calibration is never lost to the cost measurement."""
    import warnings

    from sparse_dit.costmodel import measure_cost_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return measure_cost_model(stats.geometry, stats.candidates, block_size, device=device, dtype=dtype)
    except Exception as err:  # a kernel or device problem: keep the calibration, price it by FLOPs
        warnings.warn(f"sparse-dit: measuring the cost table on {device} failed ({type(err).__name__}: {err}); "
                      "the profile states a FLOP estimate instead", stacklevel=2)
        return None


def _device_of(pipe: Any) -> torch.device:
    device = getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else repr(v) for k, v in settings.items()}


# ------------------------------------------------------------------------ does calibration predict quality?
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties get their average rank); NaN when either
    sequence is constant or shorter than 2."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")

    def ranks(values: Sequence[float]) -> torch.Tensor:
        v = torch.tensor([float(a) for a in values], dtype=torch.float64)
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):  # average the ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def candidate_rank_study(
    candidates: Sequence[PatternSpec],
    *,
    model: Any = None,
    calibration: CalibrationSet,
    heldout_prompts: Sequence[str] | None = None,
    heldout_seeds: Sequence[int] = (0, 1),
    steps: int = 10,
    guidance_scale: float = 4.0,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    block_size: int = 64,
    backend: str = "auto",
    device: "str | torch.device | None" = None,
    psnr_cap: float = 100.0,
) -> dict[str, Any]:
    """How well calibration error ranks candidate patterns as held-out PSNR does, on the reference model.

    Every candidate is measured by the calibration of ``calibration`` (all its ``metrics`` in one pass, at the
    given size), then applied uniformly (every layer and head) to generate the held-out clips
    (`sparse_dit.fidelity.evaluate`; default prompts: the held-out reference clips of ``heldout_seeds``). For
    each metric the result holds the Spearman correlation between ``-error`` and mean PSNR over the candidates:
    1 means calibration ranks the candidates exactly as final quality does. PSNR is capped at ``psnr_cap``
    (an exact candidate has infinite PSNR). model: a `sparse_dit.reference.ReferenceModel` (default: loaded on
    ``device``). Returns ``{"candidates": [...], "spearman": {metric: rho}, "settings": {...}}``.
    """
    from sparse_dit.fidelity import evaluate
    from sparse_dit.pipelines import find_adapter

    if model is None:
        from sparse_dit.reference import load_reference_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_reference_model(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    sparse = [c for c in candidates if c.name != "dense"]
    if len(sparse) < 3:
        raise ValueError("a rank correlation needs at least 3 non-dense candidates")
    cands = [PatternSpec("dense"), *sparse]
    settings = dict(steps=steps, guidance_scale=guidance_scale, frames=frames, height=height, width=width)
    stats = run_calibration(
        [("transformer", model.transformer, find_adapter(model.transformer))], calibration,
        lambda run: model.generate(run.prompt, seed=run.seed, **settings), candidates=cands, block_size=block_size,
    )["transformer"]
    rows = []
    for c, spec in enumerate(cands):
        if spec.name == "dense":
            continue
        errors = {m: float(stats.mean(stats.timesteps, m)[0][..., c].mean()) for m in stats.metrics}
        density = float(stats.mean(stats.timesteps)[1][..., c].mean())
        report = evaluate(spec, model=model, prompts=heldout_prompts, seeds=list(heldout_seeds), block_size=block_size,
                          backend=backend, **settings)
        psnrs = [min(psnr_cap, clip["psnr"]) for clip in report["clips"]]
        rows.append({"pattern": repr(spec), "density": round(density, 4), "errors": errors,
                     "psnr": sum(psnrs) / len(psnrs)})
    rho = {m: spearman([-r["errors"][m] for r in rows], [r["psnr"] for r in rows]) for m in stats.metrics}
    return {"candidates": rows, "spearman": rho,
            "settings": {**settings, "block_size": block_size, "calibration": calibration.fingerprint(),
                         "heldout_prompts": list(heldout_prompts) if heldout_prompts else None, "heldout_seeds": list(heldout_seeds)}}
