"""Profile a model: run it densely on calibration prompts, measure every candidate pattern per layer and
head against dense attention, and write a profile under one budget (--target-density or --max-error).

  sparse-dit profile --model reference --target-density 0.2 --out ref.json
  sparse-dit profile --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts prompts.txt \\
      --height 480 --width 832 --frames 81 --steps 50 --target-density 0.15 --out wan13b.json
  sparse-dit profile --model ./my-wan-i2v --images first.png --target-density 0.2 --out i2v.json
  sparse-dit profile --model ./flux-dev --height 1024 --width 1024 --target-density 0.3 --out flux.json

--model is 'reference' (the bundled model) or any diffusers pipeline (local folder or hub id) of a supported
family: Wan 2.1/2.2 T2V and I2V, HunyuanVideo, CogVideoX, LTX-Video, Mochi, Flux, SD3/3.5, QwenImage. A
pipeline with two transformers (Wan 2.2) gets one profile per transformer: OUT's stem plus
'.transformer.json' and '.transformer_2.json'. A profile applies at any resolution and length (the transfer
rule is in sparse_dit/profile.py); --extend adds this calibration grid to an existing profile.
"""

from __future__ import annotations

import argparse
from typing import Any
import math
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="'reference' (the shipped model), or a diffusers pipeline folder or hub id of a supported family")
    p.add_argument("--prompts", help="text file, one calibration prompt per line (default: built-in varied prompts)")
    p.add_argument("--num-prompts", type=int, default=4, help="built-in calibration prompts used when --prompts is not given (default 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds; every prompt runs with each (default: --seed)")
    p.add_argument("--images", nargs="+", metavar="PNG", help="conditioning images for image-to-video pipelines, cycled over the prompts")
    p.add_argument("--height", type=int, help="pixels (default: the model's own)")
    p.add_argument("--width", type=int, help="pixels (default: the model's own)")
    p.add_argument("--frames", type=int, help="frames (default: the model's own)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per prompt (default 10)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="prompt tokens for the text encoder (default: the pipeline's)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-density", type=float, nargs="+",
                        help="mean attention density outside the dense warm-up; one value, or one per bucket")
    budget.add_argument("--max-error", type=float, help="per-head error ceiling; cheapest pattern under it")
    p.add_argument("--buckets", type=int, default=2, help="timestep buckets with their own plan (default 2)")
    p.add_argument("--dense-fraction", type=float, default=0.2, help="first fraction of steps kept dense (default 0.2)")
    p.add_argument("--dense-layers", type=int, default=0, help="first layers kept dense (default 0)")
    p.add_argument("--block-size", type=int, default=128, help="query block of the layouts (default 128)")
    p.add_argument("--query-rows", type=int, default=256, help="query rows sampled per head and call (default 256)")
    p.add_argument("--metric", nargs="+", default=["rel_l2"], metavar="NAME",
                   help="calibration error metric(s): rel_l2, out_proj_sq, mass; the first drives the allocation, "
                        "the others are recorded (default rel_l2)")
    p.add_argument("--measure-steps", type=int, nargs="+", metavar="STEP",
                   help="denoising step indices (from 0) whose attention is measured (default: all)")
    p.add_argument("--patterns", help="comma-separated pattern families to consider (default: all: tile,radial,kmeans,prune)")
    p.add_argument("--measure-cost", action=argparse.BooleanOptionalAction, default=None,
                   help="time the per-pattern cost table on --device (default: on with CUDA; otherwise a FLOP estimate)")
    p.add_argument("--extend", metavar="PROFILE", help="an existing profile of this model: the new one holds its grids plus this one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="profile file to write (.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration from OUT.partial.pt (finished prompts are kept)")


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts} has no prompts")
        return prompts
    if args.model != "reference":
        from sparse_dit.calibrate import DEFAULT_PROMPTS

        return list(DEFAULT_PROMPTS[: max(1, args.num_prompts)])
    from sparse_dit.reference import sample_scene

    # seeds far from the evaluation seeds, so fidelity is measured on held-out prompts
    return [sample_scene(10_000 + i).prompt for i in range(args.num_prompts)]


def _target_density(args: argparse.Namespace):
    """One density, a per-bucket list, or None (the --max-error budget)."""
    if args.target_density is None:
        return None
    return args.target_density[0] if len(args.target_density) == 1 else list(args.target_density)


def _output_paths(out: str, names: list[str]) -> dict[str, Path]:
    """``--out`` for a single transformer; ``<stem>.<attribute>.json`` per transformer otherwise."""
    out_path = Path(out)
    if len(names) == 1:
        return {names[0]: out_path}
    return {name: out_path.with_name(f"{out_path.stem}.{name}{out_path.suffix or '.json'}") for name in names}


def _profile_reference(args, prompts, extend, progress):
    """{"transformer": Profile} for the bundled reference model."""
    from sparse_dit.calibrate import CalibrationSet, build_profiles, run_calibration
    from sparse_dit.pipelines import find_adapter
    from sparse_dit.reference import SAMPLING, load_reference_model

    device = torch.device(args.device)
    ref = load_reference_model(device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    adapter = find_adapter(ref.transformer)
    if extend is not None:
        extend.check_fits(ref.transformer, adapter.self_attention(ref.transformer))
    settings = {
        "frames": args.frames or SAMPLING["frames"],
        "height": args.height or SAMPLING["height"],
        "width": args.width or SAMPLING["width"],
        "steps": args.steps,
        "guidance_scale": SAMPLING["guidance_scale"] if args.guidance is None else args.guidance,
    }
    calibration = CalibrationSet(tuple(prompts), tuple(args.seeds or [args.seed]), (),
                                 tuple(args.measure_steps) if args.measure_steps else None, args.query_rows, tuple(args.metric))
    progress.reset(total=len(calibration.runs()) * args.steps)
    patterns = args.patterns.split(",") if args.patterns else None
    stats = run_calibration(
        [("transformer", ref.transformer, adapter)], calibration,
        lambda run: ref.generate(run.prompt, seed=run.seed, **settings),
        patterns=patterns, block_size=args.block_size, seed=args.seed, partial_path=f"{args.out}.partial.pt",
        resume=bool(getattr(args, "resume", False)), fingerprint={"model": "reference", "settings": settings},
        on_step=lambda: progress.update(1),
    )
    cost_model = _measured_cost(args, stats["transformer"], device)
    profiles = build_profiles(
        stats, {"transformer": ref.transformer}, target_density=_target_density(args), max_error=args.max_error,
        num_buckets=args.buckets, dense_fraction=args.dense_fraction, dense_layers=args.dense_layers, block_size=args.block_size,
        cost_model=cost_model, model_id="sparse-dit reference model",
        calibration={"prompts": prompts, "seeds": list(calibration.seeds), "settings": settings, "seed": args.seed,
                     "query_rows": args.query_rows, "device": str(device)},
    )
    Path(f"{args.out}.partial.pt").unlink(missing_ok=True)
    return profiles


def _measured_cost(args, stats, device):
    """The cost table timed on the device (default on CUDA only), else None (build_profile's FLOP estimate)."""
    from sparse_dit.calibrate import measured_cost_model_or_estimate

    measure = args.measure_cost if args.measure_cost is not None else device.type == "cuda"
    return measured_cost_model_or_estimate(stats, args.block_size, device) if measure else None


def _profile_pipeline(args, prompts, extend, progress):
    """{pipeline attribute: Profile} for a diffusers pipeline of any supported family."""
    import sparse_dit
    from sparse_dit.calibrate import load_images, load_pipeline, pipeline_needs_image, profile_pipeline, read_pipeline_config

    import diffusers

    config = read_pipeline_config(args.model)  # unsupported or missing models fail here, before loading weights
    pipeline_class = getattr(diffusers, str(config.get("_class_name")), None)
    if pipeline_class is not None and pipeline_needs_image(pipeline_class) and not args.images:
        raise ValueError(f"{config['_class_name']} is image-to-video: give calibration images with --images")
    images = load_images(args.images) if args.images else []
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    if extend is not None:  # an unfit --extend profile is refused before calibrating
        targets = sparse_dit.pipelines.resolve_transformers(pipe)
        if len(targets) > 1:
            raise ValueError("--extend takes one profile, and this pipeline has two transformers: profile without --extend "
                             "and combine each transformer's profiles with sparse_dit.profile.Profile.merge")
        for transformer, adapter in targets:
            extend.check_fits(transformer, adapter.self_attention(transformer))
    seeds = args.seeds or [args.seed]
    progress.reset(total=len(prompts) * len(seeds) * args.steps)
    measure = args.measure_cost if args.measure_cost is not None else device.type == "cuda"
    return profile_pipeline(
        pipe, prompts, target_density=_target_density(args), max_error=args.max_error, seeds=seeds, images=images,
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
        guidance_scale=args.guidance, max_sequence_length=args.max_sequence_length,
        measure_steps=args.measure_steps, query_rows=args.query_rows, metrics=args.metric,
        patterns=args.patterns.split(",") if args.patterns else None, block_size=args.block_size,
        num_buckets=args.buckets, dense_fraction=args.dense_fraction, dense_layers=args.dense_layers,
        measure_cost=measure, seed=args.seed, partial_path=f"{args.out}.partial.pt",
        resume=bool(getattr(args, "resume", False)), on_step=lambda: progress.update(1), model_id=args.model,
    )


def write_profile(profile: Any, out: Path) -> bool:
    """Write ``profile`` to ``out`` through a temporary file in the same folder (a failed or interrupted write
    keeps a previous file whole). Returns True when it replaced an existing file."""
    from sparse_dit.io import atomic_path

    existed = Path(out).exists()
    with atomic_path(out) as tmp:
        profile.save(tmp)
    return existed


def validate(args: argparse.Namespace) -> None:
    """Every argument checked before any model is built (one-line errors through the CLI)."""
    from sparse_dit.io import check_output_path

    if args.target_density is not None and not all(0 < d <= 1 for d in args.target_density):
        raise ValueError(f"--target-density must be in (0, 1]; got {args.target_density}")
    if args.max_error is not None and args.max_error <= 0:
        raise ValueError(f"--max-error must be > 0; got {args.max_error}")
    for name in ("steps", "buckets", "block_size", "query_rows", "num_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.block_size < 16:
        raise ValueError(f"--block-size must be >= 16; got {args.block_size}")
    if not 0 <= args.dense_fraction < 1:
        raise ValueError(f"--dense-fraction must be in [0, 1); got {args.dense_fraction}")
    if args.dense_layers < 0:
        raise ValueError(f"--dense-layers must be >= 0; got {args.dense_layers}")
    if args.model == "reference":
        from sparse_dit.reference import TRANSFORMER_CONFIG

        if args.dense_layers >= TRANSFORMER_CONFIG["num_layers"]:
            raise ValueError(f"--dense-layers {args.dense_layers} leaves no sparse layer (the reference model has "
                             f"{TRANSFORMER_CONFIG['num_layers']}); lower it")
    elif args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        raise FileNotFoundError(f"--model {args.model!r}: no pipeline folder there; give a pipeline folder or a hub id")
    for name in ("height", "width", "frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    sparse_steps = args.steps - math.ceil(args.dense_fraction * args.steps)
    if args.buckets > max(1, sparse_steps):
        raise ValueError(f"--buckets {args.buckets} needs at least that many sparse steps; --steps {args.steps} with "
                         f"--dense-fraction {args.dense_fraction} leaves {sparse_steps}: lower --buckets or raise --steps")
    if args.prompts and not Path(args.prompts).is_file():
        raise FileNotFoundError(f"--prompts {args.prompts!r} does not exist")
    if not str(args.out).endswith(".json"):
        raise ValueError(f"--out must be a .json file; got {args.out!r}")
    if args.resume and not Path(f"{args.out}.partial.pt").exists():
        raise FileNotFoundError(f"--resume: no interrupted calibration {args.out}.partial.pt; run without --resume")
    check_output_path(args.out, force=True if (args.force or args.resume) else False)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparse_dit.profile import Profile

    validate(args)
    prompts = calibration_prompts(args)
    extend = Profile.coerce(args.extend) if args.extend else None
    start = time.perf_counter()
    with tqdm(total=0, desc="calibrating", unit="step") as progress:
        if args.model == "reference":
            profiles = _profile_reference(args, prompts, extend, progress)
        else:
            profiles = _profile_pipeline(args, prompts, extend, progress)
    elapsed = time.perf_counter() - start
    paths = _output_paths(args.out, list(profiles))
    for name, profile in profiles.items():
        profile.header["calibration"]["seconds"] = round(elapsed, 1)
        s, cost = profile.summary, profile.header["cost"]
        if extend is not None:
            profile = extend.merge(profile)
        path = paths[name]
        write_profile(profile, path)
        print(f"wrote {path}: density {s['density']:.3f}, mean error {s['mean_error']:.4f}, patterns {s['patterns']}, "
              f"expected attention speed-up {cost['sparse_steps']:.2f}x on sparse steps "
              f"({'measured' if cost['measured'] else 'FLOP estimate'}), grids {profile.calibration_grids()}, "
              f"calibration {elapsed:.0f} s")
    if len(profiles) > 1:
        mapping = ", ".join(f"{name!r}: {str(paths[name])!r}" for name in profiles)
        print(f"use: sparse_dit.patch(pipe, profile={{{mapping}}})")
    return 0
