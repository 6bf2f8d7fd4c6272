"""Fidelity of a sparse pattern (or profile) against dense attention on sparse-dit's trained reference
video DiT: same prompts and seeds, dense and patched, PSNR / SSIM / attention density / wall time.

    sparse-dit eval --pattern tile --window 3 3 3 --seeds 0 1 2 3 --steps 10 --out out/eval
    sparse-dit eval --pattern '{"name": "radial", "decay": 1.0}' --frames 16 --size 64
    sparse-dit eval --profile my_profile.json

Writes fidelity.json and fidelity.md under --out (see sparse_dit.fidelity for the exact metrics).
"""

from __future__ import annotations

import argparse
import json
import math


def add_pattern_arguments(p: argparse.ArgumentParser, default_block: int = 32) -> None:
    """Options shared by ``eval`` and ``demo``: the pattern, its window/tile and the block size."""
    p.add_argument(
        "--pattern",
        default=None,
        help="tile (default when installed), radial, dense, local (a 3-D neighbourhood block mask), "
        "any registered pattern, or a JSON mapping {\"name\": ..., params}",
    )
    p.add_argument("--window", type=int, nargs="+", metavar="N",
                   help="tile: window in tiles (one int or t h w; default 3); local: radius in tokens (f h w)")
    p.add_argument("--tile", type=int, nargs=3, metavar=("T", "H", "W"), help="tile shape in tokens (default 2 4 4)")
    p.add_argument("--block-size", type=int, default=default_block, help=f"query block in tokens (default {default_block})")
    p.add_argument("--dense-steps", type=int, default=0, help="first denoising steps kept dense (default 0)")
    p.add_argument("--replan-every", type=int, default=1,
                   help="dynamic patterns (kmeans, prune) plan a new layout every N sparse steps (default 1)")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="auto: the Triton kernel on a supported GPU, else the PyTorch reference")


def clip_and_patch_options(args: argparse.Namespace) -> dict:
    """The `evaluate` keywords that ``eval`` and ``demo`` read alike: clip settings and the shared patch options."""
    return dict(
        steps=args.steps,
        guidance_scale=args.guidance,
        frames=args.frames,
        height=args.size,
        width=args.size,
        dense_steps=args.dense_steps,
        replan_every=args.replan_every,
        block_size=args.block_size,
    )


def resolve_pattern(args: argparse.Namespace, frames: int, size: int):
    """(pattern for sparse_dit.patch, label) from the shared options, for a clip of frames x size x size."""
    from sparse_dit.fidelity import cli_pattern, default_pattern
    from sparse_dit.reference import TRANSFORMER_CONFIG

    name = args.pattern or default_pattern()
    tile = args.tile
    if name == "tile" and tile is None:
        tile = (2, 4, 4)
    pt, ph, pw = TRANSFORMER_CONFIG["patch_size"]
    grid = (frames // pt, size // ph, size // pw)
    spec = cli_pattern(name, grid, args.block_size, args.window, tile)
    return spec, spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pattern_arguments(p)
    p.add_argument("--profile", help="a profile file instead of --pattern")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="sampling seeds; without --prompt also the held-out clips whose prompts are used")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); each runs with every seed")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    p.add_argument("--frames", type=int, default=16, help="frames (default 16)")
    p.add_argument("--size", type=int, default=64, help="height = width in pixels, a multiple of 4 (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for fidelity.json and fidelity.md")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def run(args: argparse.Namespace) -> int:
    from sparse_dit.fidelity import evaluate, to_markdown

    pattern = None
    if args.profile is None:
        pattern, _ = resolve_pattern(args, args.frames, args.size)
    report = evaluate(
        pattern,
        profile=args.profile,
        prompts=args.prompt,
        seeds=args.seeds,
        backend=args.backend,
        device=args.device,
        out_dir=args.out,
        verbose=not args.json,
        **clip_and_patch_options(args),
    )
    if args.json:
        print(json.dumps(report, indent=1, default=str).replace("Infinity", '"inf"'))
    else:
        print(to_markdown(report))
        if args.out:
            print(f"wrote {args.out}/fidelity.json and fidelity.md")
    return 0 if all(not math.isnan(c["psnr"]) for c in report["clips"]) else 1
