"""Profile a model: run it densely on calibration prompts, measure every candidate pattern per layer and
head against dense attention, and write a profile under one budget (--target-density or --max-error).

  sparse-dit profile --model reference --target-density 0.2 --out ref.json
  sparse-dit profile --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
      --height 480 --width 832 --frames 81 --steps 50 --target-density 0.15 --out wan13b-480p.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


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
    budget.add_argument("--target-density", type=float, help="mean attention density to reach outside the dense warm-up")
    budget.add_argument("--max-error", type=float, help="per-head relative L2 error ceiling; cheapest pattern under it")
    p.add_argument("--buckets", type=int, default=2, help="timestep buckets with their own plan (default 2)")
    p.add_argument("--dense-fraction", type=float, default=0.2, help="first fraction of steps kept dense (default 0.2)")
    p.add_argument("--dense-layers", type=int, default=0, help="first layers kept dense (default 0)")
    p.add_argument("--block-size", type=int, default=128, help="query block of the layouts (default 128)")
    p.add_argument("--query-rows", type=int, default=256, help="query rows sampled per head and call (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="profile file to write (.json)")


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"{args.prompts} has no prompts")
        return prompts
    if args.model != "reference":
        raise SystemExit("--prompts FILE is required for checkpoints other than 'reference'")
    from sparse_dit.reference import sample_scene

    # seeds far from the evaluation seeds, so fidelity is measured on held-out prompts
    return [sample_scene(10_000 + i).prompt for i in range(args.num_prompts)]


def _runner(args: argparse.Namespace, prompts: list[str], progress):
    """(transformer, run, model_id, model_class, settings) for the requested model."""
    device = torch.device(args.device)
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

        def run() -> None:
            for i, prompt in enumerate(prompts):
                ref.generate(prompt, seed=args.seed + i, **settings)
                progress.update(1)

        return ref.transformer, run, "sparse-dit reference model", settings
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
    settings = {
        "num_frames": args.frames or 81,
        "height": args.height or 480,
        "width": args.width or 832,
        "num_inference_steps": args.steps,
        "guidance_scale": 5.0 if args.guidance is None else args.guidance,
    }

    def run() -> None:
        for i, prompt in enumerate(prompts):
            pipe(prompt, generator=torch.Generator(device).manual_seed(args.seed + i), output_type="latent", **settings)
            progress.update(1)

    return pipe.transformer, run, args.model, settings


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparse_dit.profiler import build_profile, calibrate

    prompts = calibration_prompts(args)
    with tqdm(total=len(prompts), desc="calibrating", unit="prompt") as progress:
        transformer, run_model, model_id, settings = _runner(args, prompts, progress)
        calls = {"n": 0}

        def on_call() -> None:
            calls["n"] += 1
            progress.set_postfix(attention_calls=calls["n"])

        start = time.perf_counter()
        stats = calibrate(
            transformer, run_model, block_size=args.block_size, query_rows=args.query_rows, seed=args.seed, on_call=on_call
        )
    elapsed = time.perf_counter() - start
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
                     "seconds": round(elapsed, 1), "device": str(args.device)},
    )
    path = profile.save(args.out)
    s = profile.summary
    print(f"wrote {path}: density {s['density']:.3f}, mean error {s['mean_error']:.4f}, patterns {s['patterns']}, "
          f"calibration {elapsed:.0f} s")
    return 0
