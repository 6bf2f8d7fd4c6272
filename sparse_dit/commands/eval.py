"""Fidelity of a sparse pattern (or profile) against dense attention on sparse-dit's trained reference
video DiT: same prompts and seeds, dense and patched, PSNR / SSIM / attention density / wall time.

    sparse-dit eval --pattern tile --window 3 3 3 --seeds 0 1 2 3 --steps 10 --out out/eval
    sparse-dit eval --pattern '{"name": "radial", "decay": 1.0}' --frames 16 --size 64
    sparse-dit eval --profile reference          # a shipped profile, at its own block size

Writes fidelity.json and fidelity.md under --out (see sparse_dit.fidelity for the exact metrics).
A progress bar counts denoising steps (dense and sparse runs of every clip).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ._common import (
    BACKEND_CHOICES,
    BACKEND_HELP,
    UsageError,
    check_backend,
    check_block_size,
    check_non_negative,
    check_positive,
    check_profile_fits,
    check_window,
    load_profile_arg,
    require,
    resolve_device,
    step_progress,
)

# Query block for --pattern runs when --block-size is not given: the reference clips are short (a few
# thousand tokens), so 32-token blocks keep the patterns' shapes; a profile runs at the block size it was
# calibrated with unless --block-size overrides it.
PATTERN_BLOCK_SIZE = 32


def add_pattern_arguments(p: argparse.ArgumentParser, dense_steps_default: str = "0") -> None:
    """Options shared by ``eval`` and ``demo``: a pattern (with window/tile) or a profile, block size, warm-up.
    ``dense_steps_default``: how the help text states the command's --dense-steps default."""
    p.add_argument(
        "--pattern",
        default=None,
        help="tile (default), radial, local, kmeans, prune, dense, or a JSON mapping "
        "{\"name\": ..., params} (parameters: see the README's pattern table)",
    )
    p.add_argument("--profile", help="a profile file, or the name of a shipped profile (e.g. reference), instead of --pattern")
    p.add_argument("--window", type=int, nargs="+", metavar="N",
                   help="tile: window in tiles (one int or t h w; default 3); local: radius in tokens (f h w; default 1 2 2)")
    p.add_argument("--tile", type=int, nargs=3, metavar=("T", "H", "W"), help="tile: tile shape in tokens (default 2 4 4)")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"query block in tokens (default: {PATTERN_BLOCK_SIZE} for --pattern, the profile's own for --profile)")
    p.add_argument("--dense-steps", type=int, default=0, help=f"first denoising steps kept dense (default {dense_steps_default})")
    p.add_argument("--replan-every", type=int, default=1,
                   help="dynamic patterns (kmeans, prune) plan a new layout every N sparse steps (default 1)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)


def add_size_arguments(p: argparse.ArgumentParser, frames: int, height: int, width: int) -> None:
    """--frames, --size (square) and --height/--width, with the given defaults."""
    p.add_argument("--frames", type=int, default=None, help=f"frames (default {frames})")
    p.add_argument("--size", type=int, default=None, help="height = width in pixels, a multiple of 4")
    p.add_argument("--height", type=int, default=None, help=f"height in pixels, a multiple of 4 (default {height})")
    p.add_argument("--width", type=int, default=None, help=f"width in pixels, a multiple of 4 (default {width})")
    p.set_defaults(_default_clip=(frames, height, width))


def resolve_clip_size(args: argparse.Namespace) -> tuple[int, int, int]:
    """(frames, height, width) from --frames/--size/--height/--width, checked against the reference model."""
    from sparse_dit.reference import TRANSFORMER_CONFIG

    frames, height, width = args._default_clip
    require(args.size is None or (args.height is None and args.width is None),
            "give either --size or --height/--width, not both")
    check_positive(args, "--frames", "--size", "--height", "--width")
    if args.size is not None:
        height = width = args.size
    height = args.height if args.height is not None else height
    width = args.width if args.width is not None else width
    frames = args.frames if args.frames is not None else frames
    pt, ph, pw = TRANSFORMER_CONFIG["patch_size"]
    require(height % ph == 0 and width % pw == 0,
            f"height and width must be multiples of {ph} pixels (the model's patch); got {height}x{width}")
    limit = TRANSFORMER_CONFIG["rope_max_seq_len"]
    require(max(frames // pt, height // ph, width // pw) <= limit,
            f"the model's position table covers at most {limit} patches per axis; got {frames}x{height}x{width} pixels")
    args.frames, args.height, args.width = frames, height, width
    return frames, height, width


def check_generation_args(args: argparse.Namespace) -> None:
    """Steps, guidance and warm-up: checked before anything runs."""
    check_positive(args, "--steps", "--replan-every")
    check_non_negative(args, "--dense-steps")
    require(math.isfinite(args.guidance) and args.guidance >= 1.0,
            f"--guidance must be 1 or more (1 turns classifier-free guidance off); got {args.guidance:g}")
    require(args.dense_steps < args.steps,
            f"--dense-steps {args.dense_steps} keeps every one of the {args.steps} steps dense; "
            f"give fewer dense steps than --steps")


def resolve_sparse_method(args: argparse.Namespace, grid: tuple[int, int, int], batch: int) -> dict[str, Any]:
    """Check the pattern or profile options against the model and the video ``grid`` (post-patchify) and
    return ``pattern``, ``profile``, ``label`` and the ``block_size`` that will run."""
    from sparse_dit.fidelity import cli_pattern, default_pattern
    from sparse_dit.reference import TRANSFORMER_CONFIG

    check_block_size(args.block_size)
    check_window(args.window)
    if args.profile is not None:
        require(args.pattern is None, "give --pattern or --profile, not both (a profile chooses every head's pattern)")
        require(args.window is None and args.tile is None,
                "--window/--tile set a single pattern; they do not apply to --profile")
        profile = load_profile_arg(args.profile)
        block_size = args.block_size or int(profile.header.get("block_size", 128))
        check_profile_fits(profile, model_class="WanTransformer3DModel", layers=TRANSFORMER_CONFIG["num_layers"],
                           heads=TRANSFORMER_CONFIG["num_attention_heads"], grid=grid, block_size=block_size,
                           batch=batch, head_dim=TRANSFORMER_CONFIG["attention_head_dim"],
                           what="the reference model at this size")
        source = "--block-size" if args.block_size else "the profile's"
        return {"pattern": None, "profile": profile, "block_size": block_size,
                "label": f"profile {args.profile} (block {block_size}, {source})"}
    block_size = args.block_size or PATTERN_BLOCK_SIZE
    name = args.pattern or default_pattern()
    tile = args.tile
    if name == "tile" and tile is None:
        tile = (2, 4, 4)
    try:
        spec = cli_pattern(name, grid, block_size, args.window, tile)
    except json.JSONDecodeError as err:
        raise UsageError(f"--pattern looks like JSON but does not parse ({err.msg} at column {err.colno}); "
                         f"example: '{{\"name\": \"radial\", \"decay\": 1.0}}'") from None
    if spec.static:
        from sparse_dit.geometry import Geometry

        geometry = Geometry(batch, TRANSFORMER_CONFIG["num_attention_heads"], TRANSFORMER_CONFIG["attention_head_dim"], *grid)
        try:
            spec.module.build(geometry, 1, block_size, "cpu", **spec.params)
        except ValueError as err:
            raise UsageError(f"pattern does not fit grid {'x'.join(map(str, grid))} with block {block_size}: {err}") from None
    return {"pattern": spec, "profile": None, "block_size": block_size, "label": f"{spec!r}, block {block_size}"}


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The reference model's post-patchify grid for a clip of frames x height x width pixels."""
    from sparse_dit.reference import TRANSFORMER_CONFIG

    pt, ph, pw = TRANSFORMER_CONFIG["patch_size"]
    return (frames // pt, height // ph, width // pw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pattern_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="sampling seeds; without --prompt also the held-out clips whose prompts are used")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); each runs with every seed")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    add_size_arguments(p, 16, 64, 64)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for fidelity.json and fidelity.md (created if missing)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def run(args: argparse.Namespace) -> int:
    import torch

    from sparse_dit.fidelity import evaluate, to_markdown, write_report
    from sparse_dit.reference import load_reference_model

    # ---- every check before the model is loaded
    frames, height, width = resolve_clip_size(args)
    check_generation_args(args)
    require(all(s >= 0 for s in args.seeds), "--seeds must be 0 or more")
    device = resolve_device(args.device)
    backend_label = check_backend(args.backend, device)
    cfg_batch = 2 if args.guidance != 1.0 else 1
    method = resolve_sparse_method(args, latent_grid(frames, height, width), cfg_batch)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        require(not out_dir.is_file(), f"--out {args.out} is a file; give a folder for fidelity.json and fidelity.md")
        out_dir.mkdir(parents=True, exist_ok=True)
    clips = len(args.seeds) * (len(args.prompt) if args.prompt else 1)

    # ---- the work
    model = load_reference_model(device, torch.float16 if device.type == "cuda" else torch.float32)
    if not args.json:
        print(f"{method['label']}; {frames}x{height}x{width}, {args.steps} steps, dense steps {args.dense_steps}, "
              f"{backend_label} on {device}", flush=True)
    with step_progress(model.transformer, 2 * args.steps * clips, "denoising (dense + sparse)"):
        report = evaluate(
            method["pattern"],
            profile=method["profile"],
            model=model,
            prompts=args.prompt,
            seeds=args.seeds,
            backend=args.backend,
            verbose=False,
            steps=args.steps,
            guidance_scale=args.guidance,
            frames=frames,
            height=height,
            width=width,
            dense_steps=args.dense_steps,
            replan_every=args.replan_every,
            block_size=method["block_size"],
        )
    report["settings"]["backend"] = f"{args.backend} ({backend_label})"
    if method["profile"] is not None:
        report["settings"]["profile"] = args.profile
    if args.json:
        print(json.dumps(report, indent=1, default=str).replace("Infinity", '"inf"'))
    else:
        print(to_markdown(report))
    if out_dir is not None:
        existed = [name for name in ("fidelity.json", "fidelity.md") if (out_dir / name).exists()]
        jpath, mpath = write_report(report, out_dir)
        note = f" (replaced the previous {' and '.join(existed)})" if existed else ""
        print(f"wrote {jpath} and {mpath}{note}", file=sys.stderr if args.json else sys.stdout)
    return 0 if all(not math.isnan(c["psnr"]) for c in report["clips"]) else 1

