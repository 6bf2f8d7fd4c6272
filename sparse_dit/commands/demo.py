"""Generate one clip with sparse-dit's trained reference video DiT twice, with dense attention and with a
sparse pattern, from the same noise; write them side by side (dense | sparse | 4x difference) as an mp4 and
print the attention density, PSNR, SSIM and the wall times. Runs offline: with the defaults (16 frames of
32x32 pixels = 1,024 video tokens, 10 Euler steps with classifier-free guidance, tile pattern of 2x4x4-token
tiles and a 3-tile window, density 0.375) it took 47 s on a 2-core CPU (dense 15 s, sparse 23 s with the
PyTorch reference backend, which is slower than dense SDPA on a CPU); on a GPU it takes seconds with the
Triton kernel. 16x48x48 took about 4 minutes on that CPU (the reference backend dominates).

    sparse-dit demo                                   # tile pattern, writes sparse_dit_demo.mp4
    sparse-dit demo --pattern local --window 1 2 2    # a 3-D neighbourhood block mask instead
    sparse-dit demo --frames 16 --size 64 --steps 20  # the model's training size (for a GPU)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .eval import add_pattern_arguments, clip_and_patch_options, resolve_pattern

DEFAULT_PROMPT = "two shapes: a yellow square spinning, a blue ring sliding; camera pans left"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pattern_arguments(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (words from the reference vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4; 1 halves the cost)")
    p.add_argument("--frames", type=int, default=16, help="frames (default 16)")
    p.add_argument("--size", type=int, default=32, help="height = width in pixels, a multiple of 4 (default 32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="sparse_dit_demo.mp4", help="output video (default sparse_dit_demo.mp4)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the frames (default 4)")


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
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (imageio with imageio-ffmpeg), padding to even sizes."""
    import imageio.v2 as imageio

    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, (-H) % 16), (0, (-W) % 16), (0, 0)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=16,
                            ffmpeg_log_level="error") as writer:
        for f in frames:
            writer.append_data(np.ascontiguousarray(f))
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    import sparse_dit
    from sparse_dit.fidelity import evaluate
    from sparse_dit.reference import load_reference_model

    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    ref = load_reference_model(device, torch.float16 if device.type == "cuda" else torch.float32)
    pattern, label = resolve_pattern(args, args.frames, args.size)
    backend = args.backend
    kernel = "Triton kernel" if device.type == "cuda" and backend != "reference" else "PyTorch reference backend"
    print(f"reference model: {sum(p.numel() for p in ref.transformer.parameters()) / 1e6:.1f}M parameters on {device}; "
          f"{args.frames}x{args.size}x{args.size} frames, {args.steps} steps, guidance {args.guidance}")
    print(f"sparse pattern: {label}, block {args.block_size}, dense steps {args.dense_steps}, {kernel}")
    print(f"prompt: {args.prompt!r}, seed {args.seed}")
    report = evaluate(
        pattern,
        model=ref,
        prompts=[args.prompt],
        seeds=[args.seed],
        backend=backend,
        keep_videos=True,
        **clip_and_patch_options(args),
    )
    clip, videos = report["clips"][0], report["videos"][0]
    out = write_video(args.out, side_by_side(videos["dense"], videos["sparse"], args.scale,
                                             ("dense", f"sparse ({clip['density']:.0%} density)")), args.fps)
    psnr = "inf" if clip["psnr"] == float("inf") else f"{clip['psnr']:.2f} dB"
    print(f"attention density {clip['density']:.3f} (over {clip['sparse_calls']} sparse calls; "
          f"{clip['dense_calls']} dense calls)")
    print(f"PSNR {psnr}, SSIM {clip['ssim']:.4f} (sparse vs dense)")
    print(f"time: dense {clip['dense_s']:.1f}s, sparse {clip['sparse_s']:.1f}s, total {time.perf_counter() - start:.1f}s")
    print(f"wrote {out}")
    sparse_dit.unpatch(ref.transformer)
    return 0
