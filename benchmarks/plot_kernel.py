#!/usr/bin/env python3
"""Plot a `benchmarks/kernel.py` bench JSON: effective TFLOP/s against density, one panel per shape and mask kind,
a line per engine (our Triton kernel, the Gluon engine, FA4 block-sparse) and the dense baselines of the same run
(cuDNN, FA4 dense) as horizontal lines.

    python3 benchmarks/plot_kernel.py benchmarks/results/raw/kernel_h200_1249/kernel_bench.json \
        --out benchmarks/results/kernel_h200_1249.png [--target 600]

Runs on a CPU (matplotlib only); the figure is written through a temporary file, so a failed write leaves any
earlier figure in place.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

ENGINES = (("tflops", "Triton kernel", "tab:blue"), ("gluon_tflops", "Gluon engine", "tab:green"),
           ("fa4_tflops", "FA4 block-sparse", "tab:red"))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot(data: dict, out: Path, target: float | None) -> Path:
    """Draw ``data`` (kernel.py's JSON) into ``out`` (PNG/PDF/SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparse_dit.io import atomic_path

    rows = [r for r in data.get("bench", []) if "density" in r and _finite(r.get("tflops"))]
    if not rows:
        raise ValueError("no bench rows with timings in this JSON (run kernel.py with --sections bench)")
    panels = sorted({(r["shape"], r["kind"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (shape, kind) in zip(axes[0], panels):
        sel = sorted((r for r in rows if r["shape"] == shape and r["kind"] == kind), key=lambda r: r["density"])
        for key, label, color in ENGINES:
            pts = [(r["density"], r[key]) for r in sel if _finite(r.get(key))]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=label)
        dense_note = []
        for name, style, label in (("cudnn", ":", "cuDNN dense"), ("fa4_dense", "--", "FA4 dense")):
            dense = data.get(name, {}).get(shape, {}).get("tflops")
            if _finite(dense):
                ax.axhline(dense, color="gray", linestyle=style, label=label)
                dense_note.append(f"{label} {dense:.0f}")
        if target:
            ax.axhline(target, color="black", linewidth=0.8, label=f"target {target:.0f}")
        ax.set_title(f"{shape}, {kind} 128x128 blocks\n{', '.join(dense_note)}", fontsize=9)
        ax.set_xlabel("density (kept query-key pairs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective TFLOP/s (bf16, D=128)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Block-sparse attention forward, {data.get('device', '?')} "
                 f"(torch {data.get('torch', '?')}, triton {data.get('triton', '?')})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="kernel.py's output JSON (kernel_bench.json)")
    ap.add_argument("--out", required=True, help="figure path (.png, .pdf or .svg)")
    ap.add_argument("--target", type=float, default=None, help="draw a target line at this TFLOP/s")
    args = ap.parse_args()
    try:
        data = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"cannot read {args.json}: {e}")
    try:
        print(f"wrote {plot(data, Path(args.out), args.target)}")
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
