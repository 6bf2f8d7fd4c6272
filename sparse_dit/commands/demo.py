"""Generate one clip with sparse-dit's trained reference video DiT twice, with dense attention and with a
sparse pattern (or a profile), from the same noise; write them side by side (dense | sparse | 4x difference)
as an mp4 and print the attention density, PSNR and SSIM with a one-line reading, and the wall times.
Runs offline. A progress bar counts denoising steps.

    sparse-dit demo                                   # tile pattern, writes sparse_dit_demo.mp4
    sparse-dit demo --profile reference               # the shipped per-head profile
    sparse-dit demo --pattern local --window 1 2 2    # a 3-D neighbourhood block mask instead
    sparse-dit demo --list-words                      # the words the reference model's prompts may use
    sparse-dit demo --device cuda --frames 21 --height 120 --width 208   # the Wan 480p latent grid, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from ._common import check_backend, check_positive, require, resolve_device, step_progress
from .eval import (
    add_pattern_arguments,
    add_size_arguments,
    check_generation_args,
    latent_grid,
    resolve_clip_size,
    resolve_sparse_method,
)

DEFAULT_PROMPT = "two shapes: a yellow square spinning, a blue ring sliding; camera pans left"
# The demo's default clip (frames, height, width in pixels). Chosen by measurement so that the whole demo
# (dense + sparse generation, 10 steps with guidance) stays under 2 minutes on a 2-core CPU; see README.
DEMO_CLIP = (16, 48, 48)
DEMO_STEPS = 10
# By default the first 20% of the steps run dense (as profiles do): the layout of the video is decided
# early, and sparse attention in those steps costs more quality than it saves time.
DEMO_DENSE_FRACTION = 0.2
# Panels are upscaled (nearest neighbour) to about this many pixels on their longer side.
PANEL_PIXELS = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pattern_arguments(p, dense_steps_default=f"{DEMO_DENSE_FRACTION * 100:.0f} percent of --steps, rounded; with --profile 0")
    p.set_defaults(dense_steps=None)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt, in the reference model's words (see --list-words)")
    p.add_argument("--list-words", action="store_true", help="print the words the reference model knows and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"denoising steps (default {DEMO_STEPS})")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4; 1 halves the cost)")
    add_size_arguments(p, *DEMO_CLIP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="sparse_dit_demo.mp4",
                   help="output video (default sparse_dit_demo.mp4; an existing file is replaced, and the output says so)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the video (default 8)")
    p.add_argument("--scale", type=int, default=None,
                   help=f"nearest-neighbour upscaling of the frames (default: panels of about {PANEL_PIXELS} px)")
    p.description = (p.description or "") + (
        f"\nDense warm-up: by default the first {DEMO_DENSE_FRACTION:.0%} of the steps (rounded) run dense "
        "(--dense-steps N to choose, 0 for none); with --profile, the profile's own warm-up."
    )


def reference_vocabulary() -> tuple[str, ...]:
    """The words the shipped reference model's prompt encoder knows (read from its config, no weights loaded)."""
    from sparse_dit.reference import ASSETS
    from sparse_dit.reference.text import VOCAB

    root = Path(os.environ.get("SPARSE_DIT_REFERENCE") or ASSETS)
    try:
        words = json.loads((root / "text_encoder" / "config.json").read_text())["vocab"]
    except (OSError, ValueError, KeyError):
        words = VOCAB
    return tuple(w for w in words if not w.startswith("<"))


def unknown_words(prompt: str, vocabulary: tuple[str, ...]) -> list[str]:
    """Words of ``prompt`` (as the prompt encoder splits it) that are not in ``vocabulary``, in order, once each."""
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in known))


def reading(psnr_db: float, ssim_value: float) -> str:
    """One line a person can act on: what a PSNR (and SSIM) between the dense and sparse clips looks like."""
    if psnr_db == float("inf"):
        return "identical: sparse attention changed nothing"
    if psnr_db >= 40:
        verdict = "no visible difference"
    elif psnr_db >= 32:
        verdict = "differences are hard to see"
    elif psnr_db >= 27:
        verdict = "small differences, visible when you compare closely"
    elif psnr_db >= 22:
        verdict = "visible differences, same scene and motion"
    else:
        verdict = "clearly different in places; look at the difference panel"
    return f"PSNR {psnr_db:.1f} dB, SSIM {ssim_value:.3f}: {verdict}"


def _label(width: int, text: str) -> np.ndarray:
    """A white-on-black strip with ``text``, ``width`` pixels wide (PIL's default font)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, 16), (0, 0, 0))
    ImageDraw.Draw(img).text((4, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


def side_by_side(dense: np.ndarray, sparse: np.ndarray, scale: int = 4, labels: tuple[str, str] = ("dense", "sparse")) -> np.ndarray:
    """(T, H, W, 3) uint8 clips -> (T, 16 + H*scale, 3*W*scale + 2 gaps, 3): dense | sparse | 4x |difference|."""
    diff = np.clip(np.abs(dense.astype(np.int16) - sparse.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
    panels = []
    for clip, text in ((dense, labels[0]), (sparse, labels[1]), (diff, "4x |difference|")):
        up = clip.repeat(scale, axis=1).repeat(scale, axis=2)
        head = np.broadcast_to(_label(up.shape[2], text), (up.shape[0], 16, up.shape[2], 3))
        panels.append(np.concatenate([head, up], axis=1))
    gap = np.full((panels[0].shape[0], panels[0].shape[1], 4, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=2)


def write_video(path: "str | Path", frames: np.ndarray, fps: int = 8) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (imageio with imageio-ffmpeg), padding to multiples of
    16. The video goes to a temporary file beside ``path`` and is moved into place only when complete, so a
    failed or interrupted write leaves an earlier file at ``path`` as it was."""
    import imageio.v2 as imageio

    from sparse_dit.io import atomic_path

    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, (-H) % 16), (0, (-W) % 16), (0, 0)))
    path = Path(path)
    with atomic_path(path) as tmp:
        with imageio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=16,
                                ffmpeg_log_level="error") as writer:
            for f in frames:
                writer.append_data(np.ascontiguousarray(f))
    return path


def run(args: argparse.Namespace) -> int:
    vocabulary = reference_vocabulary()
    if args.list_words:
        print(" ".join(vocabulary))
        return 0

    # ---- every check before the model is loaded
    from sparse_dit.io import check_output_path

    frames, height, width = resolve_clip_size(args)
    if args.dense_steps is None:  # a profile brings its own dense warm-up (its first timesteps)
        fraction = 0.0 if args.profile else DEMO_DENSE_FRACTION
        args.dense_steps = int(fraction * args.steps + 0.5) if args.steps > 1 else 0
    check_generation_args(args)
    check_positive(args, "--fps", "--scale")
    require(args.seed >= 0, f"--seed must be 0 or more; got {args.seed}")
    require(args.out.lower().endswith(".mp4"), f"--out must name an .mp4 file; got {args.out!r}")
    out = check_output_path(args.out)
    device = resolve_device(args.device)
    backend_label = check_backend(args.backend, device)
    cfg_batch = 2 if args.guidance != 1.0 else 1
    method = resolve_sparse_method(args, latent_grid(frames, height, width), cfg_batch)
    scale = args.scale or max(1, PANEL_PIXELS // max(height, width))
    unknown = unknown_words(args.prompt, vocabulary)
    if unknown:
        print(f"warning: the reference model does not know {', '.join(map(repr, unknown))}; those words are ignored "
              f"(sparse-dit demo --list-words prints the words it knows)", file=sys.stderr)

    # ---- the work
    import torch

    import sparse_dit
    from sparse_dit.fidelity import evaluate
    from sparse_dit.reference import load_reference_model

    start = time.perf_counter()
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    ref = load_reference_model(device, torch.float16 if device.type == "cuda" else torch.float32)
    print(f"reference model: {sum(p.numel() for p in ref.transformer.parameters()) / 1e6:.1f}M parameters on {device}; "
          f"{frames} frames of {height}x{width} px, {args.steps} steps, guidance {args.guidance:g}")
    print(f"sparse: {method['label']}, dense steps {args.dense_steps}, {backend_label}")
    print(f"prompt: {args.prompt!r}, seed {args.seed}", flush=True)
    try:
        with step_progress(ref.transformer, 2 * args.steps, "denoising (dense, then sparse)"):
            report = evaluate(
                method["pattern"],
                profile=method["profile"],
                model=ref,
                prompts=[args.prompt],
                seeds=[args.seed],
                backend=args.backend,
                keep_videos=True,
                steps=args.steps,
                guidance_scale=args.guidance,
                frames=frames,
                height=height,
                width=width,
                dense_steps=args.dense_steps,
                replan_every=args.replan_every,
                block_size=method["block_size"],
            )
    finally:
        sparse_dit.unpatch(ref.transformer)
    clip, videos = report["clips"][0], report["videos"][0]
    existed = out.exists()
    write_video(out, side_by_side(videos["dense"], videos["sparse"], scale,
                                  ("dense", f"sparse ({clip['density']:.0%} density)")), args.fps)
    require(out.is_file() and out.stat().st_size > 0, f"the video {out} was not written; check the folder and disk space")
    print(f"attention density {clip['density']:.3f} over {clip['sparse_calls']} sparse calls "
          f"({clip['dense_calls']} dense calls in the warm-up)")
    print(reading(clip["psnr"], clip["ssim"]))
    print(f"time: dense {clip['dense_s']:.1f}s, sparse {clip['sparse_s']:.1f}s, total {time.perf_counter() - start:.1f}s")
    replaced = " (replaced the previous file)" if existed else ""
    print(f"wrote {out}{replaced}")
    return 0
