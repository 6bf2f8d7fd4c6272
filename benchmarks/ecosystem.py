"""sparse-dit stacked with diffusers' step caches: 50-step speed on Wan2.1-1.3B 480p shapes and quality on the
reference model (GPU).

    python3 benchmarks/ecosystem.py --out $OUT --parts speed            # about 5-7 min on an H200 (compiles included)
    python3 benchmarks/ecosystem.py --out $OUT --parts quality,offload  # about 2-3 min
    python3 benchmarks/ecosystem.py --out $OUT                          # all three parts (may pass 10 min); --quick: fewer

Cases: dense; sparse (``--sparse`` for the speed part, ``--quality-sparse`` for the quality part: ``tile`` at 10%
density, ``mix`` = the reference model's 20%-density profile, carried to Wan's heads as benchmarks/e2e.py does for
speed); FirstBlockCache, TaylorSeer and MagCache each alone; sparse + each cache. ``offload``: offloading modes with
a patched pipeline on the GPU. Sparse runs keep the first ``--warmup`` steps dense (sparse-dit's ``dense_steps``).

**Skip rates are pinned, identically in both parts.** With random weights (speed part) the adaptive caches'
decisions mean nothing, and a speed-up measured at an arbitrary skip rate is not comparable. Every cache computes
all of the first ``--warmup`` steps, then:
- FirstBlockCache: every ``--fbc-every``-th step (its leader hook's ``threshold`` is set before each step:
  -1 computes, 1e9 reuses; diffusers' own hook makes the decision and does the work);
- TaylorSeer: ``cache_interval=--taylor-interval``, ``disable_cache_before_step=--warmup``, lite mode (blocks skipped,
  ``proj_out`` predicted: the model-agnostic setting; its default identifiers do not match Wan's ``blocks.N.attn1``);
- MagCache: ``mag_ratios`` all 1.0 (no accumulated error), so it reuses exactly ``max_skip_steps=--mag-k`` steps after
  each computed one once past ``retention_ratio=warmup/steps``.
The JSON records how many steps each case computed. On a trained model the adaptive thresholds would pick their own
steps; these schedules are the ones the quality part measures.

Speed: Wan2.1-1.3B from its published config with random bf16 weights (`e2e.build`), regional torch.compile
(``compile_repeated_blocks``), both CFG branches per step as separate calls in ``cache_context("cond"/"uncond")`` as
diffusers' WanPipeline runs them. Every step of the 50 is timed; the first step of each kind (computed/reused x
dense/sparse, the kind read off the pinned schedule) compiles or builds layouts, so it is replaced by the median of
its kind (counted in ``warm_steps``; ``new_graphs`` and ``wall_s`` say what compiling cost). For patched cases
``schedule_confirmed`` checks the schedule against sparse-dit's own count of skipped layers.
Dense and sparse-alone runs have constant step kinds: they time ``--reps`` steps of each kind and compose 50.
Peak memory is the allocator's peak over the run.

Quality: the shipped reference model at the Wan-480p token grid (21 x 120 x 208 px, 32,760 tokens), 50 steps,
CFG 4, held-out clips (prompts ``sample_scene(20_000 + i)``, seeds ``100 + i``, as benchmarks/fidelity_scale.py):
PSNR/SSIM of each case against the dense clip.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import e2e  # noqa: E402  (builders, grid and timing helpers of the end-to-end benchmark)

import sparse_dit  # noqa: E402
from sparse_dit.geometry import Geometry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIX_PROFILE = ROOT / "benchmarks/results/raw/fidelity_scale_profiles/profile_w0.2_d0.2.json"
CACHES = ("fbc", "taylorseer", "magcache")


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------- caches
class PinnedFirstBlockCache:
    """Forward pre-hook on the transformer: before each denoising step's first call, set diffusers' FirstBlockCache
    leader threshold so that the step is computed (-1) or reused (1e9) per the schedule. Steps are counted from
    the timestep, as a pipeline's calls (CFG branches share one)."""

    def __init__(self, leader: Any, warmup: int, every: int) -> None:
        self.leader, self.warmup, self.every = leader, warmup, every
        self.step, self.last_t = -1, None

    def computes(self, step: int) -> bool:
        return step < self.warmup or (step - self.warmup) % self.every == 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t
        self.leader.threshold = -1.0 if self.computes(self.step) else 1e9


def enable_cache(model: torch.nn.Module, name: str, args: argparse.Namespace) -> Callable[[], None]:
    """Enable one diffusers cache with its pinned schedule on ``model``; returns the function that removes it."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    handles = []
    if name == "fbc":
        model.enable_cache(FirstBlockCacheConfig(threshold=-1.0))
        leader = model.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        handles.append(model.register_forward_pre_hook(PinnedFirstBlockCache(leader, args.warmup, args.fbc_every), with_kwargs=True))
    elif name == "taylorseer":
        # its per-context step counter is 0 at the first call: it computes steps < disable_cache_before_step, then
        # every cache_interval-th step from disable_cache_before_step + 1 on
        model.enable_cache(TaylorSeerCacheConfig(cache_interval=args.taylor_interval, disable_cache_before_step=args.warmup,
                                                 use_lite_mode=True, taylor_factors_dtype=torch.float32))
    elif name == "magcache":
        model.enable_cache(MagCacheConfig(threshold=0.06, max_skip_steps=args.mag_k, retention_ratio=args.warmup / args.steps,
                                          num_inference_steps=args.steps, mag_ratios=[1.0] * args.steps))
    else:
        raise ValueError(f"unknown cache {name!r}; choose from {CACHES}")

    def remove() -> None:
        for h in handles:
            h.remove()
        model.disable_cache()

    return remove


@contextmanager
def case(model: torch.nn.Module, cache: str | None, sparse: dict | None, args: argparse.Namespace) -> Iterator[None]:
    """Patch and/or cache ``model`` for one case (cache first, then patch: the order does not matter, tests show)."""
    remove = enable_cache(model, cache, args) if cache else None
    if sparse is not None:
        sparse_dit.patch(model, dense_steps=args.warmup, **sparse)
    try:
        yield
    finally:
        sparse_dit.unpatch(model)
        if remove is not None:
            remove()


def computes(cache: str | None, step: int, args: argparse.Namespace) -> bool:
    """Whether the pinned schedule computes denoising step ``step`` (0-based) for ``cache`` (the rules diffusers'
    hooks follow with the configs above; the eager quality part counts computed steps independently and the CPU
    test checks they agree)."""
    w = args.warmup
    if cache is None or step < w:
        return True
    if cache == "fbc":
        return (step - w) % args.fbc_every == 0
    if cache == "magcache":  # reuses max_skip_steps steps, then computes one
        return (step - w + 1) % (args.mag_k + 1) == 0
    if cache == "taylorseer":  # computes at disable_cache_before_step + 1 + k * cache_interval
        return (step - w - 1) % args.taylor_interval == 0
    raise ValueError(cache)


def label(cache: str | None, sparse_name: str | None) -> str:
    return "+".join([p for p in (sparse_name, cache) if p]) or "dense"


class ComputedProbe:
    """Counts the calls of a module that only runs when a step is computed (the last block's FFN). Eager runs only:
    under regional compile dynamo shares one graph between blocks and does not guard on hook dicts, so a hook on
    one block's submodule is not reliably called."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_: Any) -> None:
        self.calls += 1


# ----------------------------------------------------------------------------------------------- speed
def sparse_configs(names: list[str], geometry: Geometry, heads: int, layers: int, block: int) -> dict[str, tuple[dict, float]]:
    from sparse_dit.profile import Profile

    out = {}
    for name in names:
        if name == "tile":
            spec, density = e2e.pattern_at("tile", 0.1, geometry, block)
            out["tile"] = ({"pattern": spec, "block_size": block}, density)
        elif name == "mix":
            plan, density = e2e.profile_mix_plan(str(MIX_PROFILE), geometry, block, heads)
            out["mix"] = ({"profile": Profile.constant(plan, layers, block_size=block)}, density)
        else:
            raise ValueError(f"unknown sparse config {name!r}: tile or mix")
    return out


def run_steps(model: torch.nn.Module, inputs: list[dict], timesteps: torch.Tensor) -> list[float]:
    """Time each step of one sampling run (both CFG branches, each in its cache context)."""
    times = []
    if hasattr(model, "_reset_stateful_cache"):
        model._reset_stateful_cache()
    for t in timesteps:
        e2e.sync()
        start = time.perf_counter()
        with torch.no_grad():
            for branch, kwargs in zip(("cond", "uncond"), inputs):
                with model.cache_context(branch):
                    model(timestep=t.reshape(1).to(e2e.DEVICE), return_dict=False, **kwargs)
        e2e.sync()
        times.append(time.perf_counter() - start)
    return times


def fifty_step_seconds(times: list[float], computed: list[bool], warmup: int, patched: bool) -> tuple[float, int]:
    """Total of a timed run with the first step of each kind (computed or reused, dense or sparse) replaced by the
    median of its kind: that step compiles and builds layouts. Returns (total, steps replaced)."""
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for i, c in enumerate(computed):
        kinds.setdefault((c, patched and i >= warmup), []).append(i)
    times = list(times)
    warm = 0
    for idx in kinds.values():
        if len(idx) > 1:
            times[idx[0]] = statistics.median(times[i] for i in idx[1:])
            warm += 1
    return sum(times), warm


def _graphs() -> int:
    """Graphs dynamo compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def speed_part(args: argparse.Namespace, results: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Cases add and remove hooks, and diffusers' cache hooks are per-block objects that dynamo guards on: each
    # (case, block) compiles once (about one graph per block per cache; measured on the CPU). A low limit would
    # silently run the later blocks eagerly and understate the cached cases.
    torch._dynamo.config.recompile_limit = 4096
    torch._dynamo.config.accumulated_recompile_limit = 65536
    model, inputs = e2e.build(args.model)
    F_, H_, W_ = e2e.grid_of(args.model)
    heads, layers = model.config.num_attention_heads, model.config.num_layers
    geometry = Geometry(1, heads, model.config.attention_head_dim, F_, H_, W_)
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(args.steps)
    timesteps = sched.timesteps
    sparse = sparse_configs(args.sparse, geometry, heads, layers, args.block)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=False)
    rows: list[dict] = []
    results["speed"] = {"model": args.model, "tokens": geometry.seq_len, "steps": args.steps, "warmup": args.warmup,
                        "compiled": args.compile, "sparse": {k: round(v[1], 4) for k, v in sparse.items()}, "rows": rows}

    def reps_time(cache_ctx: Any, n: int) -> float:
        with cache_ctx:
            run_steps(model, inputs, timesteps[:2])  # compile, layouts
            return statistics.median(run_steps(model, inputs, timesteps[:n]))

    # dense and sparse alone: constant step kinds
    torch.cuda.reset_peak_memory_stats() if e2e.DEVICE == "cuda" else None
    t_dense = reps_time(case(model, None, None, args), args.reps)
    peak_dense = torch.cuda.max_memory_allocated() if e2e.DEVICE == "cuda" else 0
    dense_total = args.steps * t_dense
    fastest_total = dense_total

    def add(row: dict) -> None:  # every row is saved as it comes: a run cut short keeps what it finished
        if "total_s" in row:
            row["speedup_vs_fastest_dense"] = fastest_total / row["total_s"]
        rows.append(row)
        getattr(args, "flush", lambda: None)()

    log(f"dense: step {t_dense:.3f} s, {args.steps} steps {dense_total:.1f} s, peak {peak_dense / 2**30:.2f} GiB")
    fa4_row = None
    if e2e.fa4_available():  # the fastest dense a user can install: every speed-up is also reported against it
        try:
            torch.cuda.reset_peak_memory_stats()
            with e2e.Fa4Dense():
                t_fa4 = reps_time(case(model, None, None, args), args.reps)
            fastest_total = min(dense_total, args.steps * t_fa4)
            fa4_row = dict(case="dense (FA4)", total_s=args.steps * t_fa4, speedup=t_dense / t_fa4, computed=args.steps, step_s=t_fa4,
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            log(f"dense (FA4): step {t_fa4:.3f} s ({t_dense / t_fa4:.2f}x cuDNN dense)")
        except Exception as err:
            log(f"dense (FA4): FAILED {type(err).__name__}: {str(err)[:300]}")
    else:
        log("dense (FA4): skipped, flash_attn.cute is not importable")
    # rows from here on: the fastest dense is known, so each row's speed-up against it is final when it is saved
    add(dict(case="dense", total_s=dense_total, speedup=1.0, computed=args.steps, step_s=t_dense, peak_gib=peak_dense / 2**30))
    if fa4_row:
        add(fa4_row)
    for name, (kw, density) in sparse.items():
        torch.cuda.reset_peak_memory_stats() if e2e.DEVICE == "cuda" else None
        cfg = dict(args.__dict__, warmup=0)  # time sparse steps only, compose with the dense warm-up
        try:
            t_sparse = reps_time(case(model, None, kw, argparse.Namespace(**cfg)), args.reps)
        except Exception as err:  # keep going: one failing case must not lose the others
            log(f"{name}: FAILED {type(err).__name__}: {err}")
            add(dict(case=name, error=f"{type(err).__name__}: {err}"))
            continue
        peak = torch.cuda.max_memory_allocated() if e2e.DEVICE == "cuda" else 0
        total = args.warmup * t_dense + (args.steps - args.warmup) * t_sparse
        add(dict(case=name, density=density, total_s=total, speedup=dense_total / total, computed=args.steps,
                 step_s=t_sparse, peak_gib=peak / 2**30))
        log(f"{name}: density {density:.3f}, step {t_sparse:.3f} s, {args.steps} steps {total:.1f} s ({dense_total / total:.2f}x), "
            f"peak {peak / 2**30:.2f} GiB")
    # caches, alone and with each sparse config: every step of the run timed
    for cache in args.caches:
        for name in [None, *sparse]:
            kw = sparse[name][0] if name else None
            torch.cuda.reset_peak_memory_stats() if e2e.DEVICE == "cuda" else None
            graphs, wall = _graphs(), time.perf_counter()
            try:
                with case(model, cache, kw, args):
                    timed = run_steps(model, inputs, timesteps)
                    stats = sparse_dit.patch_state(model).stats if name else None
            except Exception as err:  # keep going: one failing case must not lose the others
                log(f"{label(cache, name)}: FAILED {type(err).__name__}: {err}")
                add(dict(case=label(cache, name), error=f"{type(err).__name__}: {err}"))
                continue
            peak = torch.cuda.max_memory_allocated() if e2e.DEVICE == "cuda" else 0
            kinds = [computes(cache, i, args) for i in range(len(timed))]
            total, warm = fifty_step_seconds(timed, kinds, args.warmup, name is not None)
            computed = sum(kinds)
            row = dict(case=label(cache, name), total_s=total, speedup=dense_total / total, computed=computed, warm_steps=warm,
                       peak_gib=peak / 2**30, step_s_list=[round(s, 4) for s in timed], new_graphs=_graphs() - graphs,
                       wall_s=round(time.perf_counter() - wall, 1))
            if stats:  # sparse-dit's own count checks the schedule: the layers of every reused step were skipped
                row.update(sparse_calls=stats["sparse_calls"], dense_calls=stats["dense_calls"], skipped_calls=stats["skipped_calls"])
                per_step = (layers - 1 if cache == "fbc" else layers) * len(inputs)  # FirstBlockCache runs the first block
                row["schedule_confirmed"] = stats["skipped_calls"] == (args.steps - computed) * per_step
            add(row)
            log(f"{row['case']}: computed {computed}/{args.steps} steps, {total:.1f} s ({dense_total / total:.2f}x), "
                f"peak {peak / 2**30:.2f} GiB")
    results["speed"]["fastest_dense_total_s"] = fastest_total
    alone = {r["case"]: r.get("peak_gib", 0) for r in rows}
    for r in rows:
        parts = r["case"].split("+")
        if len(parts) == 2 and alone.get(parts[1]):
            r["peak_vs_cache_alone"] = r["peak_gib"] / alone[parts[1]]


# --------------------------------------------------------------------------------------------- quality
def quality_part(args: argparse.Namespace, results: dict) -> None:
    from sparse_dit.metrics import psnr, ssim
    from sparse_dit.profile import Profile
    from sparse_dit.reference import load_reference_model, sample_scene

    dev = torch.device(e2e.DEVICE)
    ref = load_reference_model(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    model = ref.transformer
    size = dict(frames=args.frames, height=args.height, width=args.width, guidance_scale=4.0, steps=args.steps)
    sparse: dict[str, dict] = {}
    for name in args.quality_sparse:
        if name == "tile":
            F_, H_, W_ = args.frames, args.height // 4, args.width // 4
            geometry = Geometry(1, model.config.num_attention_heads, model.config.attention_head_dim, F_, H_, W_)
            spec, _ = e2e.pattern_at("tile", 0.1, geometry, args.block)
            sparse["tile"] = {"pattern": spec, "block_size": args.block}
        elif name == "mix":  # the reference model's own profile (the one the mix is taken from)
            sparse["mix"] = {"profile": Profile.load(MIX_PROFILE)}
    clips = [(sample_scene(20_000 + i).prompt, 100 + i) for i in range(args.clips)]
    probe = ComputedProbe(model.blocks[-1].ffn)

    def generate(prompt: str, seed: int) -> Any:
        if hasattr(model, "_reset_stateful_cache"):
            model._reset_stateful_cache()
        with model.cache_context("cond"):  # one call per step (CFG batched): one cache context
            return ref.generate(prompt, seed=seed, **size)

    dense = [generate(p, s) for p, s in clips]
    rows: list[dict] = []
    results["quality"] = {"grid_px": [args.frames, args.height, args.width], "steps": args.steps, "warmup": args.warmup,
                          "clips": [{"prompt": p, "seed": s} for p, s in clips], "rows": rows}
    for cache in [None, *args.caches]:
        for name in [None, *sparse]:
            if cache is None and name is None:
                continue
            per = []
            with case(model, cache, sparse.get(name), args):
                for (p, s), d in zip(clips, dense):
                    before = probe.calls
                    clip = generate(p, s)
                    per.append((psnr(d, clip), ssim(d, clip), probe.calls - before))
            finite = [x[0] for x in per if math.isfinite(x[0])]
            row = dict(case=label(cache, name), psnr_mean=sum(finite) / len(finite) if finite else math.inf,
                       psnr_min=min(x[0] for x in per), ssim_mean=sum(x[1] for x in per) / len(per), computed=per[0][2],
                       schedule_computed=sum(computes(cache, i, args) for i in range(args.steps)),
                       psnr_per_clip=[round(x[0], 2) for x in per])
            rows.append(row)
            getattr(args, "flush", lambda: None)()
            log(f"quality {row['case']}: PSNR {row['psnr_mean']:.2f} dB (min {row['psnr_min']:.2f}), SSIM {row['ssim_mean']:.4f}, "
                f"computed {row['computed']}/{args.steps} steps")
    probe.handle.remove()


# --------------------------------------------------------------------------------------------- offload
def offload_part(args: argparse.Namespace, results: dict) -> None:
    """Offloading with a patched pipeline on the GPU (the CPU tests cover what runs there): a WanPipeline around the
    reference transformer (fp16, a small random VAE, prompt embeddings, latent output), 4 steps. Each offload mode
    is applied to a fresh pipeline, patched with tile, in both orders; recorded: whether its output equals the
    patched pipeline without offloading (fp8 layerwise casting changes the weights, so there only the size of the
    difference), the sparse calls, and the devices of the cached layouts (must be the GPU)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from diffusers.hooks import apply_group_offloading

    from sparse_dit.reference import load_reference_model

    dev = torch.device(e2e.DEVICE)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32

    def make_pipe() -> Any:
        ref = load_reference_model("cpu", dtype)
        torch.manual_seed(0)
        vae = AutoencoderKLWan(base_dim=8, z_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
        return WanPipeline(tokenizer=None, text_encoder=None, vae=vae.to(dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0),
                           transformer=ref.transformer)

    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 24, 128, generator=g, dtype=dtype) for _ in range(2)]
    kw = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=256, width=416, num_frames=9,
              num_inference_steps=4, guidance_scale=4.0, output_type="latent")
    tile = {"pattern": {"name": "tile", "window": [1, 1, 1], "tile": [1, 4, 4]}, "block_size": 16}

    def generate(pipe: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe(**kw, generator=torch.Generator().manual_seed(1)).frames.float().cpu()

    base = make_pipe().to(dev)
    sparse_dit.patch(base, **tile)
    expected = generate(base)
    del base
    modes: dict[str, Callable[[Any], None]] = {
        "model_cpu_offload": lambda p: p.enable_model_cpu_offload(device=dev),
        "sequential_cpu_offload": lambda p: p.enable_sequential_cpu_offload(device=dev),
        "group_offload_block": lambda p: (p.to(dev), apply_group_offloading(p.transformer, onload_device=dev, offload_device=torch.device("cpu"),
                                                                            offload_type="block_level", num_blocks_per_group=1)),
        "group_offload_block_stream": lambda p: (p.to(dev), apply_group_offloading(
            p.transformer, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1,
            use_stream=dev.type == "cuda")),
        "group_offload_leaf_stream": lambda p: (p.to(dev), apply_group_offloading(
            p.transformer, onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level", use_stream=dev.type == "cuda")),
        "layerwise_casting_fp8": lambda p: (p.to(dev), p.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)),
    }
    rows: list[dict] = []
    results["offload"] = {"rows": rows}
    for name, apply in modes.items():
        pipe = make_pipe()
        row: dict = {"mode": name}
        try:
            for order in ("patch-then-offload", "offload-then-patch"):
                p = pipe if order == "patch-then-offload" else make_pipe()
                if order == "patch-then-offload":
                    sparse_dit.patch(p, **tile)
                apply(p)
                if order == "offload-then-patch":
                    sparse_dit.patch(p, **tile)
                out = generate(p)
                state = sparse_dit.patch_state(p.transformer)
                devices = {str(layout.device) for layout in state.layout_cache.values() if hasattr(layout, "device")}
                row[order] = dict(max_abs_diff=float((out - expected).abs().max()), equal=bool(torch.equal(out, expected)),
                                  sparse_calls=state.stats["sparse_calls"], layout_devices=sorted(devices))
        except Exception as err:  # keep going: one failing mode must not lose the others
            row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        rows.append(row)
        log(f"offload {name}: {row}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- report
def to_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# sparse-dit + step caches", "", f"Device {meta['device']}, torch {meta['torch']}, {meta['date']}. "
             f"Command: `{meta['command']}`.", ""]
    if "speed" in results:
        s = results["speed"]
        lines += [f"## Speed: {s['model']} ({s['tokens']} tokens), {s['steps']} steps, {'compiled' if s['compiled'] else 'eager'}, "
                  f"first {s['warmup']} steps dense/computed", "", "| case | computed steps | total s | speed-up vs dense | vs fastest dense | peak GiB | peak vs cache alone |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            if "error" in r:
                lines.append(f"| {r['case']} | failed: {r['error']} | | | | | |")
                continue
            vs = f"{r['peak_vs_cache_alone']:.3f}" if "peak_vs_cache_alone" in r else ""
            fastest = f"{r['speedup_vs_fastest_dense']:.2f}x" if "speedup_vs_fastest_dense" in r else ""
            lines.append(f"| {r['case']} | {r['computed']} | {r['total_s']:.1f} | {r['speedup']:.2f}x | {fastest} | {r['peak_gib']:.2f} | {vs} |")
        lines.append("")
    if "quality" in results:
        q = results["quality"]
        lines += [f"## Quality: reference model, {q['grid_px']} px, {q['steps']} steps, {len(q['clips'])} held-out clips, vs dense", "",
                  "| case | computed steps | PSNR mean | PSNR min | SSIM |", "|---|---:|---:|---:|---:|"]
        for r in q["rows"]:
            lines.append(f"| {r['case']} | {r['computed']} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} | {r['ssim_mean']:.4f} |")
        lines.append("")
    if "offload" in results:
        lines += ["## Offloading with a patched pipeline (reference transformer, 4 steps; vs the patched pipeline without offloading)", "",
                  "| mode | order | equal | max abs diff | sparse calls | layout devices |", "|---|---|---|---:|---:|---|"]
        for r in results["offload"]["rows"]:
            if "error" in r:
                lines.append(f"| {r['mode']} | failed: {r['error']} | | | | |")
            for order in ("patch-then-offload", "offload-then-patch"):
                if order in r:
                    o = r[order]
                    lines.append(f"| {r['mode']} | {order} | {o['equal']} | {o['max_abs_diff']:.2e} | {o['sparse_calls']} | {', '.join(o['layout_devices'])} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for ecosystem.json/.md (ecosystem_<parts>.json/.md for a selection)")
    p.add_argument("--parts", default="speed,quality,offload", help="comma-separated: speed, quality, offload")
    p.add_argument("--quick", action="store_true", help="tile only, FirstBlockCache and MagCache, 2 clips")
    p.add_argument("--model", default="wan1.3b-480p", help=f"speed part model shapes (benchmarks/e2e.py): {', '.join(e2e.CONFIGS)}")
    p.add_argument("--sparse", default="tile", help="speed part's sparse configs: tile (10%% density), mix (a reference "
                   "profile's pattern mix carried to Wan's heads)")
    p.add_argument("--quality-sparse", default="tile,mix", help="quality part's: tile (10%%), mix (that reference profile itself)")
    p.add_argument("--caches", default=",".join(CACHES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="steps every case computes densely first")
    p.add_argument("--fbc-every", type=int, default=2, help="FirstBlockCache computes every N-th step after the warm-up")
    p.add_argument("--taylor-interval", type=int, default=3, help="TaylorSeer cache_interval")
    p.add_argument("--mag-k", type=int, default=2, help="MagCache max_skip_steps")
    p.add_argument("--reps", type=int, default=4, help="timed steps of the dense and sparse-alone runs")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--width", type=int, default=208)
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    args.sparse = [s for s in args.sparse.split(",") if s]
    args.quality_sparse = [s for s in args.quality_sparse.split(",") if s]
    args.caches = [c for c in args.caches.split(",") if c]
    if args.quick:
        args.sparse, args.quality_sparse, args.caches, args.clips = ["tile"], ["tile"], ["fbc", "magcache"], min(args.clips, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"meta": {
        "command": "python3 " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if e2e.DEVICE == "cuda" else "cpu", "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "schedule": {"warmup": args.warmup, "fbc_every": args.fbc_every, "taylor_interval": args.taylor_interval, "mag_k": args.mag_k},
    }}

    # one run per part selection: ecosystem.md for all parts, ecosystem_speed.md etc. for a selection
    stem = "ecosystem" if set(args.parts) == {"speed", "quality", "offload"} else "ecosystem_" + "_".join(args.parts)

    def write() -> None:
        results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / f"{stem}.md").write_text(to_markdown(results) + "\n")

    args.flush = write  # parts rewrite the results after every case: a run cut short keeps what it finished
    for part in args.parts:
        {"speed": speed_part, "quality": quality_part, "offload": offload_part}[part](args, results)
        write()
    log(f"wrote {out / (stem + '.md')} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
