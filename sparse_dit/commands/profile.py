"""Profile a model: run it densely on calibration prompts, measure every candidate pattern per layer and
head against dense attention, and write a profile under one budget (--target-density or --max-error).

  sparse-dit profile --model reference --target-density 0.25 --out ref.json
  sparse-dit profile --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
      --height 480 --width 832 --frames 81 --steps 50 --target-density 0.15 --out wan13b-480p.json

A progress bar counts denoising steps. The calibration of every finished prompt is saved next to --out
(OUT.partial.pt); after an interruption, the same command with --resume continues from there. An existing
--out is replaced only with --force. The profile is tied to the model (class, layers, heads) and to the
grid it was calibrated on (its header records both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ._common import (
    UsageError,
    check_block_size,
    check_fraction,
    check_non_negative,
    check_positive,
    require,
    resolve_device,
    step_progress,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'reference' (the shipped model), or a Wan diffusers checkpoint path/id")
    p.add_argument("--prompts", help="text file, one calibration prompt per line (default: 4 generated prompts for 'reference')")
    p.add_argument("--num-prompts", type=int, default=4, help="generated calibration prompts when --prompts is not given")
    p.add_argument("--height", type=int, help="pixels (default: the model's own)")
    p.add_argument("--width", type=int, help="pixels (default: the model's own)")
    p.add_argument("--frames", type=int, help="frames (default: the model's own)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per prompt (default 10)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-density", type=float, help="mean attention density in (0, 1] to reach outside the dense warm-up")
    budget.add_argument("--max-error", type=float, help="per-head relative L2 error ceiling (> 0); cheapest pattern under it")
    p.add_argument("--buckets", type=int, default=2, help="timestep buckets with their own plan (default 2)")
    p.add_argument("--dense-fraction", type=float, default=0.2, help="first fraction of steps kept dense, in [0, 1) (default 0.2)")
    p.add_argument("--dense-layers", type=int, default=0, help="first layers kept dense (default 0)")
    p.add_argument("--block-size", type=int, default=128, help="query block of the layouts, at least 16 (default 128)")
    p.add_argument("--query-rows", type=int, default=256, help="query rows sampled per head and call (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="profile file to write (.json); its folder must exist")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration from OUT.partial.pt (same model, prompts and settings)")


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    """The calibration prompts: the --prompts file, or generated held-out prompts for the reference model."""
    if args.prompts:
        path = Path(args.prompts)
        require(path.is_file(), f"--prompts {args.prompts}: no such file; give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        require(bool(prompts), f"--prompts {args.prompts} has no prompts; write one prompt per line")
        return prompts
    require(args.model == "reference", "--prompts FILE is required for checkpoints other than 'reference'")
    from sparse_dit.reference import sample_scene

    # seeds far from the evaluation seeds, so fidelity is measured on held-out prompts
    return [sample_scene(10_000 + i).prompt for i in range(args.num_prompts)]


def check_arguments(args: argparse.Namespace) -> tuple[Path, Path]:
    """Every check that needs no model; returns (out path, checkpoint path)."""
    from sparse_dit.io import check_output_path

    check_fraction(args.target_density, "--target-density")
    if args.max_error is not None:
        require(math.isfinite(args.max_error) and args.max_error > 0,
                f"--max-error must be a relative error above 0 (e.g. 0.1); got {args.max_error:g}")
    check_fraction(args.dense_fraction, "--dense-fraction", low_open=False)
    check_positive(args, "--steps", "--buckets", "--query-rows", "--num-prompts", "--frames", "--height", "--width")
    check_non_negative(args, "--dense-layers", "--seed")
    check_block_size(args.block_size)
    if args.guidance is not None:
        require(math.isfinite(args.guidance) and args.guidance >= 1.0,
                f"--guidance must be 1 or more (1 turns classifier-free guidance off); got {args.guidance:g}")
    dense_steps = min(args.steps - 1, math.ceil(args.dense_fraction * args.steps)) if args.dense_fraction > 0 else 0
    require(args.buckets <= args.steps - dense_steps,
            f"--buckets {args.buckets} is more than the {args.steps - dense_steps} sparse steps "
            f"(--steps {args.steps}, --dense-fraction {args.dense_fraction:g}); use fewer buckets or more steps")
    if args.model == "reference":
        from sparse_dit.reference import TRANSFORMER_CONFIG

        layers = TRANSFORMER_CONFIG["num_layers"]
        require(args.dense_layers < layers, f"--dense-layers {args.dense_layers}: the reference model has {layers} layers")
        _, ph, pw = TRANSFORMER_CONFIG["patch_size"]
        for option, value, patch in (("--height", args.height, ph), ("--width", args.width, pw)):
            require(value is None or value % patch == 0, f"{option} must be a multiple of {patch} pixels; got {value}")
    else:
        require(Path(args.model).is_dir() or (args.model.count("/") == 1 and not args.model.startswith((".", "/"))),
                f"--model {args.model!r} is neither 'reference', a checkpoint folder, nor a hub id (org/name)")
        for option, value in (("--height", args.height), ("--width", args.width)):
            require(value is None or value % 16 == 0, f"{option} must be a multiple of 16 pixels for Wan; got {value}")
        require(args.frames is None or (args.frames - 1) % 4 == 0,
                f"--frames must be 4k+1 for Wan (e.g. 81); got {args.frames}")
    require(args.out.lower().endswith(".json"), f"--out must name a .json file; got {args.out!r}")
    out = Path(args.out)
    checkpoint = out.with_name(out.name + ".partial.pt")
    if args.resume:
        require(checkpoint.is_file(), f"--resume: no interrupted calibration at {checkpoint}; run without --resume")
        check_output_path(out, force=None)
    else:
        check_output_path(out, force=args.force)
    return out, checkpoint


def _runner(args: argparse.Namespace, prompts: list[str], device: torch.device):
    """(transformer, run_prompt(i), model_id, settings, forwards per step) for the requested model."""
    if args.model == "reference":
        from sparse_dit.reference import SAMPLING, load_reference_model

        ref = load_reference_model(device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
        settings = {
            "frames": args.frames or SAMPLING["frames"],
            "height": args.height or SAMPLING["height"],
            "width": args.width or SAMPLING["width"],
            "steps": args.steps,
            "guidance_scale": SAMPLING["guidance_scale"] if args.guidance is None else args.guidance,
        }

        def run_prompt(i: int) -> None:
            ref.generate(prompts[i], seed=args.seed + i, **settings)

        return ref.transformer, run_prompt, "sparse-dit reference model", settings, 1  # CFG is batched
    from diffusers import WanPipeline

    try:
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
    except (OSError, EnvironmentError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"cannot load --model {args.model!r} ({first_line}); give a local diffusers Wan "
                         f"checkpoint folder, a hub id reachable from here, or 'reference'") from None
    settings = {
        "num_frames": args.frames or 81,
        "height": args.height or 480,
        "width": args.width or 832,
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0 if args.guidance is None else args.guidance,
    }

    def run_prompt(i: int) -> None:
        generator = torch.Generator(device).manual_seed(args.seed + i)
        pipe(prompts[i], generator=generator, output_type="latent", **settings)

    passes = 2 if settings["guidance_scale"] > 1.0 else 1  # Wan runs the conditional and unconditional passes apart
    return pipe.transformer, run_prompt, args.model, settings, passes


# ------------------------------------------------------------------------------------ resumable calibration
def _fingerprint(args: argparse.Namespace, prompts: list[str], settings: dict) -> str:
    """What a saved partial calibration must match to be resumed."""
    return json.dumps({"model": args.model, "prompts": prompts, "settings": settings, "seed": args.seed,
                       "block_size": args.block_size, "query_rows": args.query_rows}, sort_keys=True)


def _save_checkpoint(path: Path, fingerprint: str, done: int, stats: Any, seconds: float) -> None:
    """Write the calibration so far (plain tensors and JSON-able values) atomically."""
    from sparse_dit.io import atomic_path

    state = {
        "fingerprint": fingerprint,
        "done": done,
        "seconds": seconds,
        "candidates": [[spec.name, json.dumps(spec.params)] for spec in stats.candidates],
        "layers": stats.layers,
        "heads": stats.heads,
        "head_dim": stats.head_dim,
        "geometry": json.dumps(dataclasses.asdict(stats.geometry)) if stats.geometry is not None else None,
        "err_sum": {str(t): v for t, v in stats.err_sum.items()},
        "dens_sum": {str(t): v for t, v in stats.dens_sum.items()},
        "calls": {str(t): v for t, v in stats.calls.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, fingerprint: str) -> tuple[int, Any, float]:
    """(prompts done, CalibrationStats, seconds spent) from a checkpoint that matches ``fingerprint``."""
    from sparse_dit.geometry import Geometry
    from sparse_dit.patterns import PatternSpec
    from sparse_dit.profiler import CalibrationStats

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file: report it by name, never its contents
        raise UsageError(f"{path} is not a readable partial calibration; delete it and run without --resume") from None
    require(state.get("fingerprint") == fingerprint,
            f"{path} was written for other settings (model, prompts, size, steps, seed, block size or query rows); "
            f"run with the same settings, or without --resume (and --force) to start over")
    stats = CalibrationStats(
        [PatternSpec(name, **json.loads(params)) for name, params in state["candidates"]],
        layers=int(state["layers"]), heads=int(state["heads"]), head_dim=int(state["head_dim"]),
        geometry=Geometry(**json.loads(state["geometry"])) if state["geometry"] else None,
    )
    for key, target in (("err_sum", stats.err_sum), ("dens_sum", stats.dens_sum), ("calls", stats.calls)):
        target.update({float(t): v for t, v in state[key].items()})
    return int(state["done"]), stats, float(state["seconds"])


def _merge(total: Any, part: Any) -> Any:
    """Add the sums of calibration ``part`` into ``total`` (same candidates); returns ``total``."""
    if total is None:
        return part
    require([s.key() for s in total.candidates] == [s.key() for s in part.candidates],
            "calibration candidates changed between prompts (the grid differs); use one size for all prompts")
    for t in part.err_sum:
        if t in total.err_sum:
            total.err_sum[t] += part.err_sum[t]
            total.dens_sum[t] += part.dens_sum[t]
            total.calls[t] += part.calls[t]
        else:
            total.err_sum[t], total.dens_sum[t], total.calls[t] = part.err_sum[t], part.dens_sum[t], part.calls[t]
    return total


def calibrate_prompts(transformer: torch.nn.Module, run_prompt: Callable[[int], None], count: int, *, block_size: int,
                      query_rows: int, seed: int, stats: Any = None, first: int = 0,
                      after_prompt: Callable[[int, Any], None] | None = None) -> Any:
    """Calibrate prompt by prompt from prompt ``first`` on, adding into ``stats``; ``after_prompt(done, stats)``
    runs after each prompt (the checkpoint). Each prompt samples its own query rows (seed + prompt index)."""
    from sparse_dit.profiler import calibrate

    for i in range(first, count):
        candidates = stats.candidates if stats is not None else None
        part = calibrate(transformer, lambda i=i: run_prompt(i), candidates=candidates, block_size=block_size,
                         query_rows=query_rows, seed=seed + i)
        stats = _merge(stats, part)
        if after_prompt is not None:
            after_prompt(i + 1, stats)
    return stats


def write_profile(profile: Any, out: Path) -> bool:
    """Write ``profile`` to ``out`` through a temporary file in the same folder (a failed or interrupted write
    keeps a previous file whole). Returns True when it replaced an existing file."""
    from sparse_dit.io import atomic_path

    existed = Path(out).exists()
    with atomic_path(out) as tmp:
        profile.save(tmp)
    return existed


def run(args: argparse.Namespace) -> int:
    from sparse_dit.profiler import build_profile

    out, checkpoint = check_arguments(args)
    device = resolve_device(args.device)
    prompts = calibration_prompts(args)
    transformer, run_prompt, model_id, settings, passes = _runner(args, prompts, device)
    fingerprint = _fingerprint(args, prompts, settings)
    done, stats, spent = (0, None, 0.0)
    if args.resume:
        done, stats, spent = _load_checkpoint(checkpoint, fingerprint)
        print(f"resuming: {done} of {len(prompts)} prompts already calibrated ({spent:.0f} s)", flush=True)
    start = time.perf_counter()

    def after_prompt(n: int, current: Any) -> None:
        _save_checkpoint(checkpoint, fingerprint, n, current, spent + time.perf_counter() - start)

    total_steps = len(prompts) * args.steps * passes
    with step_progress(transformer, total_steps, "calibrating", unit="step", initial=done * args.steps * passes):
        stats = calibrate_prompts(transformer, run_prompt, len(prompts), block_size=args.block_size,
                                  query_rows=args.query_rows, seed=args.seed, stats=stats, first=done,
                                  after_prompt=after_prompt)
    elapsed = spent + time.perf_counter() - start
    profile = build_profile(
        stats,
        target_density=args.target_density,
        max_error=args.max_error,
        num_buckets=args.buckets,
        dense_fraction=args.dense_fraction,
        dense_layers=args.dense_layers,
        block_size=args.block_size,
        model_class=type(transformer).__name__,
        model_id=model_id,
        calibration={"prompts": prompts, "settings": settings, "seed": args.seed, "query_rows": args.query_rows,
                     "seconds": round(elapsed, 1), "device": str(device)},
    )
    existed = write_profile(profile, out)
    checkpoint.unlink(missing_ok=True)
    s = profile.summary
    replaced = " (replaced the previous file)" if existed else ""
    print(f"wrote {out}{replaced}: density {s['density']:.3f}, mean error {s['mean_error']:.4f}, "
          f"patterns {s['patterns']}, calibration {elapsed:.0f} s")
    return 0
