"""Figures that show the reference model learned something: generated clips next to real ones, and what
its attention heads look at. Needs matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .attention import attention_rows, head_survey
from .videos import render, sample_scene

# Held-out clips (training uses seeds >= 1,000,000): a one-, two- and three-shape scene, each camera.
FIGURE_SEEDS = (0, 1, 2, 5)


def samples_figure(
    ref: Any, path: "str | Path", seeds: Sequence[int] = FIGURE_SEEDS, frames: int = 16, size: int = 64,
    steps: int = 25, guidance_scale: float = 4.0, shown: int = 8, height: int | None = None, width: int | None = None,
) -> None:
    """Rows of real frames and generated frames (same prompt, the clip's seed as sampling seed); frames are
    ``height`` x ``width`` (both default to ``size``)."""
    height, width = height or size, width or size
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.linspace(0, frames - 1, shown).round().astype(int)
    cell = 1.3 * max(1.0, width / height)
    fig, axes = plt.subplots(2 * len(seeds), shown, figsize=(cell * shown, 2.9 * len(seeds)))
    for r, seed in enumerate(seeds):
        scene = sample_scene(seed)
        real = (render(scene, frames, height, width).numpy() * 255).round().astype(np.uint8)
        gen = ref.generate(scene.prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, frames=frames,
                           height=height, width=width)
        for row, clip, label in ((2 * r, real, "real"), (2 * r + 1, gen, "generated")):
            for c, f in enumerate(idx):
                ax = axes[row, c]
                ax.imshow(clip[f], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
                if row == 2 * r:
                    ax.set_title(f"t={f}", fontsize=7)
        axes[2 * r, 0].text(0, -0.45, f'"{scene.prompt}"', transform=axes[2 * r, 0].transAxes, fontsize=8)
    fig.suptitle(f"reference model: real clips vs generated, {frames}x{height}x{width} px ({steps} steps, "
                 f"guidance {guidance_scale})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def classify_heads(layers: dict[int, dict[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """Pick one example (layer, head) each: ``local`` (least reach in space and time), ``temporal``
    (least spatial reach relative to its temporal reach) and ``global`` (largest spatial reach)."""
    rows = [(l, h, float(m["spatial"][h]), float(m["temporal"][h])) for l, m in layers.items()
            for h in range(len(m["spatial"]))]
    local = min(rows, key=lambda r: r[2] + r[3])
    temporal = max((r for r in rows if r[:2] != local[:2]), key=lambda r: r[3] / (r[2] + 0.5))
    glob = max((r for r in rows if r[:2] not in (local[:2], temporal[:2])), key=lambda r: r[2])
    return {"local": local[:2], "temporal": temporal[:2], "global": glob[:2]}


def attention_figure(ref: Any, path: "str | Path", seed: int = 1, frames: int = 16, size: int = 64,
                     t: float = 500.0, height: int | None = None, width: int | None = None) -> dict[str, Any]:
    """Attention maps of a local, a temporal and a global head for the query at the centre of the clip,
    over every other frame, plus a scatter of every head's spatial and temporal reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scene = sample_scene(seed)
    survey = head_survey(ref, scene.prompt, seed=seed, t=t, frames=frames, height=height or size, width=width or size)
    Fg, Hg, Wg = survey["grid"]
    picks = classify_heads(survey["layers"])
    qrow = torch.tensor([(Fg // 2) * Hg * Wg + (Hg // 2) * Wg + Wg // 2])
    shown = list(range(0, Fg, max(1, Fg // 8)))
    fig = plt.figure(figsize=(1.4 * max(1.0, Wg / Hg) * len(shown) + 3.5, 5.2))
    grid = fig.add_gridspec(3, len(shown) + 2, width_ratios=[1] * len(shown) + [0.2, 2.6])
    for r, (kind, (layer, head)) in enumerate(picks.items()):
        q, k = survey["qk"][layer]
        probs = attention_rows(q, k, qrow)[0, head, 0].reshape(Fg, Hg, Wg)
        vmax = float(probs.max())
        for c, f in enumerate(shown):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(probs[f].numpy(), vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
            if f == Fg // 2:
                ax.plot([Wg // 2], [Hg // 2], "c+", ms=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
            if c == 0:
                m = survey["layers"][layer]
                ax.set_ylabel(f"{kind}\nL{layer} H{head}\nreach {float(m['spatial'][head]):.1f} cells,\n"
                              f"{float(m['temporal'][head]):.1f} frames", fontsize=7)
    ax = fig.add_subplot(grid[:, -1])
    for layer, m in survey["layers"].items():
        ax.scatter(m["spatial"].numpy(), m["temporal"].numpy(), s=18, label=f"L{layer}")
        for h in range(len(m["spatial"])):
            ax.annotate(f"{layer}.{h}", (float(m["spatial"][h]), float(m["temporal"][h])), fontsize=5)
    ax.set_xlabel("mean spatial reach (patch cells)", fontsize=8)
    ax.set_ylabel("mean temporal reach (frames)", fontsize=8)
    ax.legend(fontsize=5, ncol=2)
    ax.set_title("every head (layer.head)", fontsize=8)
    fig.suptitle(f"self-attention of the query at the clip's centre (frame {Fg // 2}), t={t:.0f}/1000, "
                 f"{Fg}x{Hg}x{Wg} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return {"picks": picks, "reach": {l: {k: v.tolist() for k, v in m.items()} for l, m in survey["layers"].items()}}


def _geometry(row: dict[str, str]) -> tuple[int, int, int]:
    """(frames, height, width) of a loss.csv row; older files have one ``size`` column for square clips."""
    if "height" in row:
        return int(row["frames"]), int(row["height"]), int(row["width"])
    return int(row["frames"]), int(row["size"]), int(row["size"])


def loss_figure(csv_path: "str | Path", path: "str | Path") -> None:
    """The training loss curve from examples/train_reference.py's loss.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(step, [float(r["loss_ema"]) for r in rows], lw=1.5, color="k", label="all geometries, smoothed")
    geometries = sorted({_geometry(r) for r in rows}, key=lambda g: g[0] * g[1] * g[2])
    for g in geometries:
        pts = [(int(r["step"]), float(r["loss"])) for r in rows if _geometry(r) == g]
        xs, ys = zip(*pts)
        smooth, acc = [], None
        for y in ys:  # per-geometry exponential smoothing over its own samples
            acc = y if acc is None else 0.8 * acc + 0.2 * y
            smooth.append(acc)
        ax.plot(xs, smooth, lw=0.9, alpha=0.8, label=f"{g[0]}x{g[1]}x{g[2]} px ({len(pts)} points)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(f"reference model training ({float(rows[-1]['elapsed_s']):.0f} s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["FIGURE_SEEDS", "attention_figure", "classify_heads", "loss_figure", "samples_figure"]
