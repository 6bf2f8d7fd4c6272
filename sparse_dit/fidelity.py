"""Fidelity harness: how far a sparse-attention run drifts from the dense run of the same model.

    from sparse_dit import fidelity
    report = fidelity.evaluate({"name": "tile", "window": 3}, seeds=[0, 1], steps=10, out_dir="out/eval")

For every (prompt, seed) the model generates twice from the same starting noise: once unpatched (dense
attention) and once patched with the pattern or profile under test. Both clips are compared frame by
frame; the report holds per-clip PSNR, SSIM, attention density and wall times, and their means. By
default the model is sparse-dit's trained reference video DiT (`sparse_dit.reference`), which runs
offline on a CPU.

Metrics: PSNR and SSIM as defined in `sparse_dit.metrics` (frames in [0, 1], data range 1.0).

- density: the share of (query, key) pairs the sparse layouts computed, averaged over the attention calls
  that ran sparse: ``stats["density_sum"] / stats["sparse_calls"]`` of `sparse_dit.patch_state`. Calls
  that ran dense (the pattern ``dense``, ``dense_steps``) are counted in ``dense_calls``; with no sparse call
  density is 1.0. ``overall_density`` counts the dense calls as 1.0.
- times: wall-clock seconds of each whole generation (first clip includes warm-up such as Triton compiles).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sparse_dit.metrics import psnr, ssim


def _spec_label(pattern: Any) -> str:
    if pattern is None:
        return "dense"
    if isinstance(pattern, str):
        return pattern
    return repr(pattern)


def evaluate(
    pattern: Any = None,
    *,
    profile: Any = None,
    model: Any = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = 10,
    guidance_scale: float = 4.0,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    dense_steps: int = 0,
    block_size: int = 64,
    backend: str = "auto",
    replan_every: int = 1,
    device: "str | torch.device | None" = None,
    out_dir: "str | Path | None" = None,
    keep_videos: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Compare dense and patched generations of ``model`` on every (prompt, seed) pair.

    pattern / profile: what `sparse_dit.patch` gets (one of them; neither means ``"dense"``). model: an object
    with ``.transformer`` and ``.generate(prompt, seed=, steps=, guidance_scale=, frames=, height=, width=)``
    returning (T, H, W, 3) uint8; default: the reference model on ``device`` (CUDA when available). prompts:
    default: the prompts of the held-out reference clips of ``seeds`` (`sparse_dit.reference.sample_scene`);
    given prompts are each run with every seed. out_dir: where ``fidelity.json`` and ``fidelity.md`` go.
    keep_videos: put the dense and sparse clips (uint8 numpy) in the result under ``videos``.

    Returns a dict: ``settings``, ``clips`` (one dict per clip: prompt, seed, psnr, ssim, density,
    overall_density, sparse_calls, dense_calls, dense_s, sparse_s) and ``summary`` (means; PSNR mean over
    finite values, ``inf`` if all are infinite).
    """
    import sparse_dit

    if model is None:
        from sparse_dit.reference import load_reference_model

        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_reference_model(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    if prompts is None:
        from sparse_dit.reference import sample_scene

        pairs = [(sample_scene(int(s)).prompt, int(s)) for s in seeds]
    else:
        pairs = [(p, int(s)) for p in prompts for s in seeds]
    gen_kw = dict(steps=steps, guidance_scale=guidance_scale, frames=frames, height=height, width=width)
    transformer = model.transformer
    patch_kw = dict(dense_steps=dense_steps, block_size=block_size, backend=backend, replan_every=replan_every)
    if profile is not None:
        patch_kw["profile"] = profile
    else:
        patch_kw["pattern"] = pattern if pattern is not None else "dense"
    clips, videos = [], []
    sparse_dit.unpatch(transformer)
    for prompt, seed in pairs:
        t0 = time.perf_counter()
        dense = model.generate(prompt, seed=seed, **gen_kw)
        t1 = time.perf_counter()
        sparse_dit.patch(transformer, **patch_kw)
        try:
            t2 = time.perf_counter()
            sparse = model.generate(prompt, seed=seed, **gen_kw)
            t3 = time.perf_counter()
            stats = dict(sparse_dit.patch_state(transformer).stats)
        finally:
            sparse_dit.unpatch(transformer)
        n_sparse, n_dense = int(stats["sparse_calls"]), int(stats["dense_calls"])
        density = stats["density_sum"] / n_sparse if n_sparse else 1.0
        overall = (stats["density_sum"] + n_dense) / max(1, n_sparse + n_dense)
        clip = {
            "prompt": prompt,
            "seed": seed,
            "psnr": psnr(dense, sparse),
            "ssim": ssim(dense, sparse),
            "density": density,
            "overall_density": overall,
            "sparse_calls": n_sparse,
            "dense_calls": n_dense,
            "dense_s": t1 - t0,
            "sparse_s": t3 - t2,
        }
        clips.append(clip)
        if keep_videos:
            videos.append({"dense": dense, "sparse": sparse})
        if verbose:
            print(
                f"seed {seed}: PSNR {clip['psnr']:.2f} dB, SSIM {clip['ssim']:.4f}, density {density:.3f}, "
                f"dense {clip['dense_s']:.1f}s, sparse {clip['sparse_s']:.1f}s  ({prompt})",
                flush=True,
            )
    finite = [c["psnr"] for c in clips if math.isfinite(c["psnr"])]
    summary = {
        "clips": len(clips),
        "psnr": float(np.mean(finite)) if finite else math.inf,
        "psnr_min": min(c["psnr"] for c in clips),
        "ssim": float(np.mean([c["ssim"] for c in clips])),
        "ssim_min": min(c["ssim"] for c in clips),
        "density": float(np.mean([c["density"] for c in clips])),
        "overall_density": float(np.mean([c["overall_density"] for c in clips])),
        "dense_s": float(sum(c["dense_s"] for c in clips)),
        "sparse_s": float(sum(c["sparse_s"] for c in clips)),
    }
    p = next(transformer.parameters())
    settings = {
        "pattern": _spec_label(pattern) if profile is None else None,
        "profile": str(profile) if profile is not None else None,
        "model": type(transformer).__name__,
        "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "backend": backend,
        "block_size": block_size,
        "dense_steps": dense_steps,
        "replan_every": replan_every,
        **gen_kw,
        "sparse_dit_version": sparse_dit.__version__,
    }
    report: dict[str, Any] = {"settings": settings, "clips": clips, "summary": summary}
    if out_dir is not None:
        write_report(report, out_dir)
    if keep_videos:
        report["videos"] = videos
    return report


def _fmt(x: float, digits: int = 2) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the settings that ran, one row per clip, and a mean row (times are
    per-clip means, not sums; the totals are stated under the table)."""
    s, m, clips = report["settings"], report["summary"], report["clips"]
    what = s["pattern"] if s.get("profile") is None else f"profile {s['profile']}"
    n = max(1, len(clips))
    dense_mean = sum(c["dense_s"] for c in clips) / n
    sparse_mean = sum(c["sparse_s"] for c in clips) / n
    lines = [
        f"# Fidelity: {what} vs dense",
        "",
        f"Model {s['model']} on {s['device']} ({s['dtype']}), backend {s['backend']}, block {s['block_size']}, "
        f"{s['frames']}x{s['height']}x{s['width']} frames, {s['steps']} steps, guidance {s['guidance_scale']}, "
        f"dense steps {s['dense_steps']}, sparse-dit {s['sparse_dit_version']}.",
        "",
        "PSNR over the whole clip (data range 1); SSIM per frame and channel (11x11 Gaussian window, sigma 1.5), "
        "averaged; density = computed share of the attention matrix over sparse calls; times are wall seconds "
        "of one whole generation.",
        "",
        "| seed | prompt | PSNR (dB) | SSIM | density | dense s | sparse s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in clips:
        lines.append(
            f"| {c['seed']} | {c['prompt']} | {_fmt(c['psnr'])} | {c['ssim']:.4f} | {c['density']:.3f} | "
            f"{c['dense_s']:.1f} | {c['sparse_s']:.1f} |"
        )
    lines += [
        f"| **mean** | {m['clips']} clips | {_fmt(m['psnr'])} | {m['ssim']:.4f} | {m['density']:.3f} | "
        f"{dense_mean:.1f} | {sparse_mean:.1f} |",
        "",
        f"Total wall time: dense {m['dense_s']:.1f} s, sparse {m['sparse_s']:.1f} s over {m['clips']} clips.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: "str | Path") -> tuple[Path, Path]:
    """Write ``fidelity.json`` and ``fidelity.md`` into ``out_dir`` (created if missing); returns their paths.
    Each file is written to a temporary file beside it and moved into place, so a failed write keeps the
    previous report whole."""
    from sparse_dit.io import write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in report.items() if k != "videos"}
    # JSON has no infinity: identical clips are written as the string "inf"
    text = json.dumps(clean, indent=1, default=str, allow_nan=True).replace("Infinity", '"inf"')
    jpath = write_text_atomic(out / "fidelity.json", text + "\n")
    mpath = write_text_atomic(out / "fidelity.md", to_markdown(report))
    return jpath, mpath


# ------------------------------------------------------------------------------ patterns for the CLIs
def local_block_mask(grid: tuple[int, int, int], block_size: int, radius: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """(1, 1, NB, NB) block mask of a local 3-D neighbourhood on a video grid in raster (f, h, w) order; the
    mask of the ``local`` pattern (`sparse_dit.patterns.local`)."""
    from sparse_dit.patterns import local

    return local.block_mask(grid, block_size, radius)


def cli_pattern(
    name: str,
    grid: tuple[int, int, int],
    block_size: int,
    window: Sequence[int] | None = None,
    tile: Sequence[int] | None = None,
) -> Any:
    """The pattern a CLI option names: a registered name (``tile``, ``radial``, ``dense``, ...) with the
    ``window``/``tile`` options where the pattern takes them, a JSON mapping (``{"name": "radial", "decay": 1}``),
    or ``local`` (the registered pattern, ``PatternSpec("local", radius=...)``) with ``window`` as its radius."""
    from sparse_dit.patterns import PatternSpec

    name = name.strip()
    if name.startswith("{"):
        return PatternSpec.coerce(json.loads(name))
    if name == "local":
        if tile:
            raise ValueError("--tile applies to the tile pattern; the local pattern takes --window (its radius f h w)")
        return PatternSpec("local", radius=tuple(window)) if window else PatternSpec("local")
    params: dict[str, Any] = {}
    if name == "tile":
        if window:
            params["window"] = window[0] if len(window) == 1 else tuple(window)
        if tile:
            params["tile"] = tuple(tile)
    elif window or tile:
        raise ValueError(f"--window/--tile apply to the tile and local patterns; for {name!r} pass a JSON mapping")
    return PatternSpec(name, **params)


def default_pattern() -> str:
    """``tile`` when that pattern is installed, else the ``local`` block mask."""
    from sparse_dit.patterns import names

    return "tile" if "tile" in names() else "local"
__all__ = ["cli_pattern", "default_pattern", "evaluate", "local_block_mask", "psnr", "ssim", "to_markdown", "write_report"]
