"""End-to-end denoising-step speed of patched diffusers transformers on real model shapes (GPU).

    python benchmarks/e2e.py --models wan1.3b-480p --out $OUT
    python benchmarks/e2e.py --models wan14b-720p --patterns tile,mixed --densities 0.2 --reps 1
    python benchmarks/e2e.py --models wan1.3b-480p --patterns radial,tile --densities 0.1 --backends triton,fa4

Transformers are built from the published configs with random bf16 weights: speed does not depend on
the weights. What does depend on them is the density of the *dynamic* patterns (k-means top-p picks
clusters by attention mass, which random weights do not have), so in this benchmark their density is
pinned by parameters: prune by ``keep_ratio`` = density, kmeans by ``min_fraction`` = density with a
small ``top_p``; static patterns (tile, radial) take the window/decay whose density is closest to the
target at this grid. A profile chooses these per head on a trained model.

One step = both CFG branches, called separately with batch 1 as diffusers' Wan pipeline does. Dense
runs diffusers' native backend under cuDNN SDPA; with flash-attn-4 importable, dense is also timed with every
SDPA call that FA4 can run sent to FA4 dense ("fastest dense" = the faster of the two), and every speed-up is
reported against both. ``--backends triton,fa4`` runs each case with the sparse calls on the Triton kernel and on
the FA4 engine where it can express the layout (Triton elsewhere; the log says how many calls each ran);
"auto" lets the patch choose per call shape by measured speed. The 50-step figure uses measured step times with
the first 20% of steps dense. "Overhead" is our machinery outside the attention kernel (hooks, layout
building, k-means, permutations): sparse step - (dense step - dense attention) - sparse kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402
import sparse_dit.patching as patching  # noqa: E402
from sparse_dit import PatternSpec  # noqa: E402
from sparse_dit.geometry import Geometry  # noqa: E402

WAN_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# hunyuanvideo-community/HunyuanVideo transformer/config.json (the class defaults are that config)
HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
    num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
    text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)
CONFIGS = {
    # name: (family, config, latent (C, F, H, W), text tokens, transformer calls per step)
    # Wan: 81 frames -> 21 latent frames, VAE /8, two CFG branches called separately (diffusers' WanPipeline);
    # HunyuanVideo: 129 frames -> 33 latent frames, guidance-distilled (one call per step), prompt of 256 tokens
    "wan1.3b-480p": ("wan", WAN_13B, (16, 21, 60, 104), 512, 2),
    "wan14b-720p": ("wan", WAN_14B, (16, 21, 90, 160), 512, 2),
    "wan1.3b-720p": ("wan", WAN_13B, (16, 21, 90, 160), 512, 2),
    "hunyuan-720p": ("hunyuan", HUNYUAN, (16, 33, 90, 160), 256, 1),
    # CPU smoke tests of this script
    "tiny": ("wan", dict(WAN_13B, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=64, freq_dim=32), (16, 3, 12, 20), 16, 2),
    "tiny-hunyuan": (
        "hunyuan",
        dict(HUNYUAN, num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1, num_refiner_layers=1,
             text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)),
        (16, 3, 12, 20), 16, 1,
    ),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def log(*a) -> None:
    print(*a, flush=True)


def build(name: str):
    """(model, list of the keyword arguments of each transformer call of one step)."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    family, config, latent, text_len, calls = CONFIGS[name]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            cls = WanTransformer3DModel if family == "wan" else HunyuanVideoTransformer3DModel
            model = cls(**config).eval()
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=DEVICE).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g)

    x = randn(1, *latent)
    if family == "wan":
        inputs = [dict(hidden_states=x, encoder_hidden_states=randn(1, text_len, config["text_dim"])) for _ in range(calls)]
    else:
        inputs = [
            dict(
                hidden_states=x,
                encoder_hidden_states=randn(1, text_len, config["text_embed_dim"]),
                encoder_attention_mask=torch.ones(1, text_len, dtype=torch.bool, device=DEVICE),
                pooled_projections=randn(1, config["pooled_projection_dim"]),
                guidance=torch.full((1,), 6000.0, device=DEVICE, dtype=dtype),
            )
        ]
    return model, inputs


def grid_of(name: str) -> tuple[int, int, int]:
    _, config, (_, F, H, W), _, _ = CONFIGS[name]
    pt, p = (config["patch_size"][0], config["patch_size"][1]) if isinstance(config["patch_size"], tuple) else (config["patch_size_t"], config["patch_size"])
    return (F // pt, H // p, W // p)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def step_fn(model, inputs):
    """One denoising step: every transformer call of a step (Wan: both CFG branches as separate batch-1
    calls). Each call of the returned function is the next step of a sampling run (the timestep goes down
    by one), so dynamic patterns warm-start from the previous step as they do in a pipeline."""
    steps = iter(range(999, 0, -1))

    def step() -> None:
        timestep = torch.tensor([next(steps)], device=DEVICE)
        with torch.no_grad():
            for kwargs in inputs:
                model(timestep=timestep, return_dict=False, **kwargs)

    return step


class CallTimer:
    """Sums the time of the calls made through ``call``: GPU time between CUDA events, wall time on a CPU."""

    def __init__(self):
        self.events: list = []
        self.cpu_seconds = 0.0

    def call(self, fn, *args, **kwargs):
        if DEVICE != "cuda":
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.cpu_seconds += time.perf_counter() - start
            return out
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn(*args, **kwargs)
        e.record()
        self.events.append((s, e))
        return out

    def total(self) -> float:
        sync()
        return self.cpu_seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3


class SdpaTimer(TorchFunctionMode):
    """Sums the GPU time of every scaled_dot_product_attention call made while active (0 on a CPU)."""

    def __init__(self):
        super().__init__()
        self.timer = CallTimer()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or DEVICE != "cuda":
            return func(*args, **kwargs)
        return self.timer.call(func, *args, **kwargs)

    def total(self) -> float:
        return self.timer.total()


def closest(specs: list[PatternSpec], geometry: Geometry, target: float, block: int) -> tuple[PatternSpec, float]:
    best = None
    for spec in specs:
        try:
            d = spec.module.build(geometry, 1, block, "cpu", **spec.params).density
        except ValueError:
            continue
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (spec, d)
    return best


def pattern_at(name: str, target: float, geometry: Geometry, block: int) -> tuple[PatternSpec, float]:
    """A pattern of family ``name`` whose density is (close to) ``target`` at ``geometry``."""
    if name in ("tile", "tilepacked"):  # tilepacked: whole key blocks, no query padding (FA4 can run it)
        windows = [(t, h, w) for t in (1, 3, 5, 7, 9, 11) for h in (1, 2, 3, 4) for w in (1, 3, 5, 7)]
        extra = {"packed": True} if name == "tilepacked" else {}
        return closest([PatternSpec("tile", window=w, **extra) for w in windows], geometry, target, block)
    if name == "radial":
        return closest([PatternSpec("radial", decay=d, sinks=0) for d in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)], geometry, target, block)
    if name == "prune":
        return PatternSpec("prune", keep_ratio=target), target
    if name == "kmeans":
        return PatternSpec("kmeans", top_p=0.05, min_fraction=target), target
    if name in ("window", "random"):  # block masks of whole 128-blocks: layouts the FA4 engine can express
        nb = -(-geometry.seq_len // block)
        keep = max(1, round(target * nb))
        i = torch.arange(nb)
        if name == "window":  # a band around the diagonal, shifted inward at the edges (kernel.py's window mask)
            lo = (i - (keep - 1) // 2).clamp(0, nb - keep)
            mask = (i[None, :] >= lo[:, None]) & (i[None, :] < lo[:, None] + keep)
        else:  # random key blocks per query block, the diagonal always kept
            scores = torch.rand(nb, nb, generator=torch.Generator().manual_seed(0))
            scores[i, i] = 2.0
            mask = torch.zeros(nb, nb, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
        return PatternSpec("mask", block_mask=mask, block_size=block), float(mask.float().mean())
    raise ValueError(name)


def rescale_kmeans(plan: tuple[PatternSpec, ...], scale: float) -> tuple[PatternSpec, ...]:
    """The plan with every k-means head's min_fraction multiplied by ``scale``."""
    if scale == 1.0:
        return plan
    return tuple(
        PatternSpec("kmeans", **dict(s.params, min_fraction=min(1.0, s.params["min_fraction"] * scale))) if s.name == "kmeans" else s
        for s in plan
    )


def mixed_plan(geometry: Geometry, target: float, block: int, heads: int) -> tuple[tuple[PatternSpec, ...], float]:
    """Heads cycle through tile, radial, kmeans and prune, each at the target density."""
    specs = [pattern_at(n, target, geometry, block) for n in ("tile", "radial", "kmeans", "prune")]
    plan = tuple(specs[h % len(specs)][0] for h in range(heads))
    return plan, sum(specs[h % len(specs)][1] for h in range(heads)) / heads


def short(spec: PatternSpec) -> str:
    from sparse_dit.commands.inspect import short_label

    return short_label(spec)


def profile_mix_plan(path: str, geometry: Geometry, block: int, heads: int) -> tuple[tuple[PatternSpec, ...], float]:
    """The pattern mix of a calibrated profile carried to this model's heads: each family gets the share of
    heads it has in the profile (largest remainder), at the mean density the profile gave that family."""
    from sparse_dit.profile import Profile

    prof = Profile.load(path)
    choices = [c for b in prof.plan for layer in b for c in layer]
    families: dict[str, list[float]] = {}
    for c in choices:
        families.setdefault(c.spec.name, []).append(float(c.density))
    quota = {f: heads * len(d) / len(choices) for f, d in families.items()}
    count = {f: int(q) for f, q in quota.items()}
    for f in sorted(quota, key=lambda f: quota[f] - count[f], reverse=True)[: heads - sum(count.values())]:
        count[f] += 1
    plan: list[PatternSpec] = []
    density = 0.0
    for f, n in count.items():
        if n == 0:
            continue
        if f == "dense":
            spec, d = PatternSpec("dense"), 1.0
        else:
            spec, d = pattern_at(f, sum(families[f]) / len(families[f]), geometry, block)
        plan += [spec] * n
        density += d * n
    return tuple(plan), density / heads


class Fa4Dense(TorchFunctionMode):
    """While active, SDPA calls that FA4 dense can run (`sparse_dit.kernels.dense_engine`) run on it: the unpatched
    model on the fastest dense attention a user can install. One graph break per call under torch.compile."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return _fa4_or_sdpa(*args, **kwargs)


def _fa4_or_sdpa_eager(*args, **kwargs):
    from sparse_dit.kernels import dense_attention

    return dense_attention(*args, **kwargs, sdpa=patching._SDPA)


_fa4_or_sdpa = torch.compiler.disable(_fa4_or_sdpa_eager)


def fa4_available() -> bool:
    from sparse_dit.kernels.fa4 import fa4_available as available

    return DEVICE == "cuda" and available()


class KernelTimer:
    """Wraps the attention backend that `patch` calls (this benchmark only) to sum its time."""

    def __init__(self):
        self.timer = CallTimer()
        self.original = patching._run_backend

    def __enter__(self):
        def timed_backend(name, *a, **kw):
            fn = self.original(name, *a, **kw)
            return lambda *args, **kwargs: self.timer.call(fn, *args, **kwargs)

        patching._run_backend = timed_backend
        return self

    def __exit__(self, *exc):
        patching._run_backend = self.original

    def total(self) -> float:
        return self.timer.total()


def run_model(name: str, args) -> dict:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparse_dit.profile import Profile

    family, _, _, text_len, calls = CONFIGS[name]
    model, inputs = build(name)
    F_, H_, W_ = grid_of(name)
    heads = model.config.num_attention_heads
    layers = len(sparse_dit.patching.resolve_transformers(model)[0][1].self_attention(model))
    head_dim = model.config.attention_head_dim
    text = (text_len, "last") if family == "hunyuan" else (0, "none")
    geometry = Geometry(1, heads, head_dim, F_, H_, W_, text_len=text[0], text_position=text[1])
    S = geometry.seq_len
    out: dict = {"model": name, "tokens": S, "layers": layers, "heads": heads, "calls_per_step": calls, "compiled": args.compile, "runs": []}
    step = step_fn(model, inputs)
    # cuDNN first; HunyuanVideo's prompt-padding mask may send a call to another backend if cuDNN refuses it
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    dense_ctx = (lambda: sdpa_kernel(backends, set_priority=True)) if DEVICE == "cuda" else nullcontext
    with dense_ctx():
        step()  # warm-up
        with SdpaTimer() as sdpa_timer:  # attention's GPU time inside the real model, eager
            step()
        t_attn = sdpa_timer.total()
        dense_eager = statistics.median(timed(step, args.reps))
        if args.compile:
            # regional compile, as diffusers recommends for DiTs: every repeated block compiled once
            model.compile_repeated_blocks(fullgraph=False)
            step()  # compile
        peak_dense = peak_memory(lambda: timed(step, 1))
        dense = timed(step, args.reps)
        t_fa4 = float("nan")
        if fa4_available():
            try:
                with Fa4Dense():
                    step()  # compile FA4's kernels
                    t_fa4 = statistics.median(timed(step, args.reps))
            except Exception as err:
                log(f"  FA4 dense FAILED {type(err).__name__}: {str(err)[:300]}")
        else:
            log("  FA4 dense skipped: flash_attn.cute is not importable (or no GPU)")
    t_dense = statistics.median(dense)
    t_fastest = min(t_dense, t_fa4) if t_fa4 == t_fa4 else t_dense
    fastest_name = "FA4" if t_fastest < t_dense else "cuDNN"
    out.update(
        dense_step_s=t_dense, dense_eager_step_s=dense_eager, dense_attention_s=t_attn, attention_share=t_attn / t_dense,
        peak_dense_gib=peak_dense / 2**30, dense_fa4_step_s=t_fa4, fastest_dense_step_s=t_fastest, fastest_dense=fastest_name,
    )
    log(
        f"{name}{' (compiled)' if args.compile else ''}: dense step {t_dense:.3f} s (eager {dense_eager:.3f} s), "
        f"attention {t_attn:.3f} s ({100 * t_attn / t_dense:.0f}%), peak {peak_dense / 2**30:.1f} GiB; "
        f"FA4 dense step {t_fa4:.3f} s; fastest dense: {fastest_name}"
    )
    steps, dense_steps = 50, 10
    cases = []
    for target in args.densities:
        for pattern in args.patterns:
            if pattern == "mixed":
                plan, density = mixed_plan(geometry, target, args.block, heads)
            elif pattern == "profilemix":
                if not args.mix_profile:
                    raise SystemExit("--patterns profilemix needs --mix-profile PATH[,PATH...]")
                for path in args.mix_profile.split(","):
                    plan, density = profile_mix_plan(path, geometry, args.block, heads)
                    log(f"  profile mix from {path}: " + ", ".join(short(s_) for s_ in plan) + f" (density {density:.3f})")
                    cases.append((f"mix:{Path(path).stem}", plan, density, 1, target))
                continue
            else:
                spec, density = pattern_at(pattern, target, geometry, args.block)
                plan = (spec,) * heads
            dynamic = any(not spec.static for spec in plan)
            for replan in args.replan if dynamic else [1]:
                label = f"{pattern}@{target:g}" + (f"/r{replan}" if dynamic and replan > 1 else "")
                cases.append((label, plan, density, replan, target))
    cases = [
        (label + ("" if backend == "auto" else f"[{backend}]"), plan, density, replan, target, backend)
        for label, plan, density, replan, target in cases
        for backend in args.backends
    ]
    kmeans_scale: dict[float, float] = {}  # target -> min_fraction correction measured on the uniform k-means case
    for label, plan, density, replan, target, backend in cases:
        plan = rescale_kmeans(plan, kmeans_scale.get(target, 1.0))
        patch_kw = dict(replan_every=replan, backend=backend)
        sparse_dit.patch(model, profile=Profile.constant(plan, layers, block_size=args.block), **patch_kw)
        state = sparse_dit.patch_state(model)
        try:
            step()  # warm-up: compile kernels (and blocks), build static layouts
            if label.startswith("kmeans") and target not in kmeans_scale:
                # k-means' density follows the data (chunk-aligned selections add keys, top-p adds clusters), and not
                # in proportion to min_fraction: one proportional correction overshot (0.122 for 0.1 on the H200), so
                # correct until the measured density is within 5% of the target (at most 4 warm-up steps more)
                base, scale = plan, 1.0
                for _ in range(4):
                    measured = state.stats["density_sum"] / max(1, state.stats["sparse_calls"])
                    if abs(measured - target) <= 0.05 * target:
                        break
                    scale *= target / measured
                    plan = rescale_kmeans(base, scale)
                    sparse_dit.patch(model, profile=Profile.constant(plan, layers, block_size=args.block), **patch_kw)
                    state = sparse_dit.patch_state(model)
                    step()
                kmeans_scale[target] = scale
            peak = peak_memory(lambda: timed(step, 1))
            # time whole replan periods so reuse steps and planning steps are both counted
            reps = args.reps * replan
            # SDPA calls left to torch (cross-attention, and in HunyuanVideo the prompt refiner) count as
            # attention, as in the dense step; not under compile, where a mode would be traced into the graphs
            passed_through = SdpaTimer() if not args.compile else nullcontext()
            with KernelTimer() as kt, passed_through:
                times = timed(step, reps)
            kernel = (kt.total() + (passed_through.total() if not args.compile else 0.0)) / reps
        except Exception as err:  # keep going: one failing case must not lose the others
            log(f"  {label}: FAILED {type(err).__name__}: {err}")
            sparse_dit.unpatch(model)
            continue
        measured = state.stats["density_sum"] / max(1, state.stats["sparse_calls"])
        engine_calls = dict(state.engines.calls)
        # layouts of dynamic heads skip the engine choice under "auto" and run on Triton directly
        engine_calls["triton"] += state.stats["sparse_calls"] - sum(state.engines.calls.values())
        sparse_dit.unpatch(model)
        t_sparse = statistics.mean(times)
        overhead = t_sparse - (t_dense - t_attn) - kernel
        total_dense = steps * t_dense
        total_sparse = dense_steps * t_dense + (steps - dense_steps) * t_sparse
        row = dict(
            case=label, density=measured, replan_every=replan, step_s=t_sparse, step_speedup=t_dense / t_sparse,
            kernel_s=kernel, overhead_s=overhead, overhead_share=overhead / t_sparse, e2e_50_speedup=total_dense / total_sparse,
            peak_gib=peak / 2**30, peak_vs_dense=peak / max(1, peak_dense), backend=backend, engine_calls=engine_calls,
            step_speedup_vs_fastest=t_fastest / t_sparse,
            e2e_50_speedup_vs_fastest=steps * t_fastest / (dense_steps * t_fastest + (steps - dense_steps) * t_sparse),
        )
        out["runs"].append(row)
        log(
            f"  {label:16s} density {measured:.3f}  step {t_sparse:.3f} s ({t_dense / t_sparse:.2f}x)  attention {kernel:.3f} s  "
            f"overhead {overhead * 1e3:.0f} ms ({100 * overhead / t_sparse:.1f}%)  50-step {total_dense / total_sparse:.2f}x  "
            f"peak {peak / max(1, peak_dense):.3f}x | vs fastest dense ({fastest_name}): step {row['step_speedup_vs_fastest']:.2f}x, "
            f"50-step {row['e2e_50_speedup_vs_fastest']:.2f}x | sparse calls {engine_calls}"
        )
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def peak_memory(fn) -> int:
    """Peak device memory allocated while ``fn`` runs (0 on CPU)."""
    if DEVICE != "cuda":
        fn()
        return 0
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan1.3b-480p", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--patterns", default="tile,radial,kmeans,prune,mixed",
                   help="tile, tilepacked (tile in whole key blocks), radial, kmeans, prune, mixed, profilemix, and window / random (block masks of whole "
                   "blocks, which the FA4 engine can express; tile and radial layouts have segments it cannot)")
    p.add_argument("--densities", default="0.1,0.2,0.3")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="timed steps per case (times replan_every for dynamic ones)")
    p.add_argument("--replan", default="1", help="comma-separated replan_every values for cases with dynamic heads")
    p.add_argument("--backends", default="auto", help="comma-separated patch backends per case: auto, triton, gluon, fa4")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks, dense and patched")
    p.add_argument("--mix-profile", help="for --patterns profilemix: carry this profile's pattern mix and densities "
                   "to the model's heads (the target density is then ignored)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    args.patterns = args.patterns.split(",")
    args.densities = [float(d) for d in args.densities.split(",")]
    args.replan = [int(r) for r in args.replan.split(",")]
    args.backends = args.backends.split(",")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    log(f"device {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for name in args.models.split(","):
        results.append(run_model(name, args))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "e2e.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
