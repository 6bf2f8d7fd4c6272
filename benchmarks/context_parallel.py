"""One denoising step of Wan on one GPU and under diffusers' Ulysses context parallelism, dense and sparse.

    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --models wan1.3b-480p --out $OUT
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --models wan14b-720p --densities 0.1,0.2 --reps 1 --out $OUT

Every rank builds the same transformer (benchmarks/e2e.py's `build`/`CONFIGS`: published Wan2.1 configs, random
bf16 weights, both CFG branches as separate batch-1 calls per step). First every rank runs the one-GPU cases on its
own GPU (no communication: the ranks are independent replicas, rank 0's numbers are reported, the others' are kept
as a check), then ``enable_parallelism(ContextParallelConfig(ulysses_degree=world))`` and the same cases with the
sequence split over the ranks. Cases: dense, and sparse-dit's tile pattern at each ``--densities`` target (the
window whose density at this grid is closest, as e2e.py picks it). With ``--balance-demo`` (default) two more cases
at the first target show what head balance across ranks is worth: the same per-head choices (half the heads tile at
about half the target, half at about 1.5x), once grouped (the first rank slice gets all the sparse ones: the plan a
profile can produce when neighbouring heads behave alike) and once interleaved (every slice gets half of each);
``predicted_imbalance`` is the max/mean rank-slice density of the plan (`context_parallel.imbalance`).

Per case and rank: step time (median of ``--reps`` after one warm-up step), attention time of one step on that rank
(GPU time between CUDA events around each attention op: diffusers' SDPA call when dense, sparse-dit's attention
when patched; under context parallelism that is the op after the all-to-all, for the rank's heads), and peak memory.
"Spread" is the slowest rank's attention time over the fastest one's: ranks wait for each other at the all-to-all
after attention, so that is time lost. Writes context_parallel.json and context_parallel.md under --out.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (makes sparse_dit importable on a bare machine, see _setup.py)

import sparse_dit  # noqa: E402
from sparse_dit.geometry import Geometry  # noqa: E402

WAN_MODELS = [name for name, (family, *_rest) in e2e.CONFIGS.items() if family == "wan"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan1.3b-480p,wan14b-720p", help=f"comma-separated, of: {', '.join(WAN_MODELS)}")
    p.add_argument("--densities", default="0.1,0.2", help="tile pattern target densities (comma-separated)")
    p.add_argument("--block", type=int, default=128, help="query block of the layouts")
    p.add_argument("--reps", type=int, default=2, help="timed steps per case, after one warm-up step")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "fa4", "reference"], help="sparse-dit backend")
    p.add_argument("--skip-single", action="store_true", help="skip the one-GPU cases (e.g. when they are already measured)")
    p.add_argument("--balance-demo", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the grouped vs interleaved head plans at the first density (see above)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    bad = [m for m in args.models if m not in WAN_MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {WAN_MODELS}")
    try:
        args.densities = [float(d) for d in args.densities.split(",")]
    except ValueError:
        p.error(f"--densities must be comma-separated numbers; got {args.densities!r}")
    if not all(0 < d <= 1 for d in args.densities) or args.reps < 1:
        p.error("densities must be in (0, 1] and --reps >= 1")
    return args


def log(*a) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, flush=True)


class AttentionTimer:
    """Sums this rank's attention time during one step: SDPA calls when ``model`` is not patched, sparse-dit's
    attention (dense or sparse) when it is. The patched state's ``_execute`` is wrapped on that instance only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = sparse_dit.patch_state(model)
        self.timer = e2e.CallTimer()
        self.sdpa: e2e.SdpaTimer | None = None

    def __enter__(self) -> "AttentionTimer":
        if self.state is None:
            self.sdpa = e2e.SdpaTimer().__enter__()
        else:
            run = self.state._execute
            self.state._execute = lambda *a, **k: self.timer.call(run, *a, **k)
        return self

    def __exit__(self, *exc) -> None:
        if self.sdpa is not None:
            self.sdpa.__exit__(*exc)
        else:
            del self.state.__dict__["_execute"]

    def total(self) -> float:
        return self.sdpa.total() if self.sdpa is not None else self.timer.total()


def run_case(model, inputs, label: str, spec, args) -> dict:
    """One case on this rank: patch (``spec``: None for dense, a PatternSpec for every head, or a tuple with one per
    head), warm up, time; returns this rank's measurements."""
    if isinstance(spec, tuple):
        from sparse_dit.profile import Profile

        layers = len(sparse_dit.patching.resolve_transformers(model)[0][1].self_attention(model))
        sparse_dit.patch(model, profile=Profile.constant(spec, layers, block_size=args.block), block_size=args.block, backend=args.backend)
    elif spec is not None:
        sparse_dit.patch(model, pattern=spec, block_size=args.block, backend=args.backend)
    step = e2e.step_fn(model, inputs)
    step()  # warm-up (layouts built and cached, kernels compiled)
    with AttentionTimer(model) as attention:
        step()
    attn = attention.total()
    if e2e.DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = e2e.timed(step, args.reps)
    peak = torch.cuda.max_memory_allocated() if e2e.DEVICE == "cuda" else 0
    stats = sparse_dit.patch_state(model).stats if spec is not None else {}
    if spec is not None:
        sparse_dit.unpatch(model)
    return {
        "case": label, "step_s": statistics.median(times), "attention_s": attn, "peak_gib": peak / 2**30,
        "sparse_calls": stats.get("sparse_calls", 0), "dense_calls": stats.get("dense_calls", 0),
        "mean_density": stats.get("mean_density", 1.0), "head_range": stats.get("head_range"),
    }


def gather(row: dict) -> list[dict]:
    """Every rank's ``row`` (a collective when torch.distributed runs)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [row]
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def run_model(name: str, args, world: int) -> dict:
    from diffusers import ContextParallelConfig

    model, inputs = e2e.build(name)
    F_, H_, W_ = e2e.grid_of(name)
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    geometry = Geometry(1, heads, head_dim, F_, H_, W_)
    cases = [("dense", None, 1.0)]
    for target in args.densities:
        spec, density = e2e.pattern_at("tile", target, geometry, args.block)
        cases.append((f"tile@{target:g}", spec, density))
    predicted: dict[str, float] = {}
    if args.balance_demo and world > 1:
        from sparse_dit.context_parallel import imbalance

        target = args.densities[0]
        (lo, d_lo), (hi, d_hi) = (e2e.pattern_at("tile", f * target, geometry, args.block) for f in (0.5, 1.5))
        half = heads // 2
        grouped = (lo,) * half + (hi,) * (heads - half)
        interleaved = tuple(lo if h % 2 == 0 else hi for h in range(heads))
        for label, plan in ((f"grouped@{target:g}", grouped), (f"interleaved@{target:g}", interleaved)):
            dens = torch.tensor([d_lo if s is lo else d_hi for s in plan])
            cases.append((label, plan, float(dens.mean())))
            predicted[label] = float(imbalance(dens, world))
    out: dict = {"model": name, "tokens": geometry.seq_len, "heads": heads, "world": world, "runs": []}
    modes = ([] if args.skip_single else ["1 GPU"]) + ([f"CP={world}"] if world > 1 else [])
    for mode in modes:
        if mode.startswith("CP"):
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        for label, spec, density in cases:
            per_rank = gather(run_case(model, inputs, label, spec, args))
            attn = [r["attention_s"] for r in per_rank]
            row = {
                "mode": mode, "case": label, "density": density,
                "step_s": per_rank[0]["step_s"], "step_s_per_rank": [r["step_s"] for r in per_rank],
                "attention_s_per_rank": attn, "attention_spread": max(attn) / min(attn) if min(attn) > 0 else float("nan"),
                "peak_gib_per_rank": [r["peak_gib"] for r in per_rank],
                "sparse_calls_per_rank": [r["sparse_calls"] for r in per_rank],
                "head_range_per_rank": [r["head_range"] for r in per_rank],
                "predicted_imbalance": predicted.get(label, 1.0) if mode != "1 GPU" else None,
            }
            out["runs"].append(row)
            log(f"{name} {mode} {label}: step {row['step_s']:.3f} s, attention per rank "
                + ", ".join(f"{a:.3f}" for a in attn) + f" s, peak " + ", ".join(f"{p:.1f}" for p in row["peak_gib_per_rank"]) + " GiB")
    single = {r["case"]: r["step_s"] for r in out["runs"] if r["mode"] == "1 GPU"}
    cp = {r["case"]: r["step_s"] for r in out["runs"] if r["mode"] != "1 GPU"}
    for r in out["runs"]:
        r["speedup_vs_dense_1gpu"] = single["dense"] / r["step_s"] if "dense" in single else None
        r["speedup_vs_dense_cp"] = cp["dense"] / r["step_s"] if "dense" in cp else None
    del model
    if e2e.DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(results: list[dict], device: str, command: str) -> str:
    def x(v) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"# Context parallelism (Ulysses) x sparse heads\n", f"Device: {device}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"torch {torch.__version__}.\n", f"    {command}\n"]
    for res in results:
        lines += [f"## {res['model']} ({res['tokens']} tokens, {res['heads']} heads, {res['world']} ranks)\n",
                  "| mode | case | density | step s | vs dense 1 GPU | vs dense CP | attention s per rank | spread | predicted | peak GiB per rank |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            lines.append(
                f"| {r['mode']} | {r['case']} | {r['density']:.3f} | {r['step_s']:.3f} | {x(r['speedup_vs_dense_1gpu'])} | "
                f"{x(r['speedup_vs_dense_cp'])} | {', '.join(f'{a:.3f}' for a in r['attention_s_per_rank'])} | "
                f"{r['attention_spread']:.3f} | {num(r['predicted_imbalance'])} | {', '.join(f'{p:.1f}' for p in r['peak_gib_per_rank'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        if e2e.DEVICE == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        else:  # a CPU smoke run: diffusers 0.42.1 picks the device as rank % accelerator count (0 here)
            torch.accelerator.device_count = lambda: 1
        dist.init_process_group("nccl" if e2e.DEVICE == "cuda" else "gloo")
    import diffusers.hooks.context_parallel as cp_hooks

    if not hasattr(cp_hooks.logger, "warning_once"):  # diffusers 0.42.1: reached for Wan's 1-D timestep
        cp_hooks.logger.warning_once = cp_hooks.logger.warning
    device = torch.cuda.get_device_name() if e2e.DEVICE == "cuda" else "cpu"
    log(f"device {world} x {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    command = "torchrun --nproc_per_node " + str(world) + " benchmarks/context_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    for name in args.models:
        results.append(run_model(name, args, world))
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "context_parallel.json").write_text(json.dumps({"device": f"{world} x {device}", "command": command, "results": results}, indent=1))
            Path(args.out, "context_parallel.md").write_text(markdown(results, f"{world} x {device}", command))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
