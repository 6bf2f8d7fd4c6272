"""CPU benchmark of the PyTorch backend (sparse_dit/kernels/reference.py): dense SDPA vs the masked path vs the gather path.

    python benchmarks/cpu_backend.py                                   # reference-model shapes, 2 threads
    python benchmarks/cpu_backend.py --grids 16x16x16 --repeats 7 --out benchmarks/results/cpu_backend.md

Shapes are the reference model's self-attention (B=2 for classifier-free guidance, H=4, D=64, float32) on
video grids F x H x W after patchify (16x16x16 = 4,096 tokens; 21x30x52 = 32,760 tokens). Layouts are the
tile pattern as `sparse_dit.patching` builds them from a `Geometry` (block 128, default 2x8x8 tiles), with
the window (in tiles) whose density is closest to each target. q, k, v are (B, S, H, D) views of (B, H, S, D)
tensors, as diffusers hands them to attention.

  dense    torch.nn.functional.scaled_dot_product_attention on (B, H, S, D): what an unpatched model runs.
  masked   reference_attention(method="masked"): every query block against every key, masked (the oracle
           and the CPU backend before the gather path). Slow; run only up to --masked-max-seq tokens.
  gather   reference_attention(method="gather"), the default CPU backend. "plan" is its first call on a
           layout (index tables built and cached on the layout, as a patched model does once per layout).

Runs are interleaved (dense, then each density, repeat) so that load from other processes hits every case
alike; the tables give the median and the minimum of --repeats timed calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import torch.nn.functional as F  # noqa: E402

from sparse_dit.geometry import Geometry  # noqa: E402
from sparse_dit.kernels.reference import reference_attention  # noqa: E402
from sparse_dit.layout import Layout  # noqa: E402
from sparse_dit.patterns import tile  # noqa: E402
from sparse_dit.patterns._tiling import default_tile  # noqa: E402


def parse_grid(text: str) -> tuple[int, int, int]:
    f, h, w = (int(x) for x in text.lower().split("x"))
    return f, h, w


def tile_layouts(geometry: Geometry, block: int, targets: list[float]) -> dict[float, tuple[tuple[int, int, int], Layout]]:
    """For each target density, the tile-pattern window (in tiles) whose layout density is closest to it."""
    tile_shape = default_tile(block, geometry.grid)
    counts = [-(-g // t) for g, t in zip(geometry.grid, tile_shape)]
    density: dict[tuple[int, int, int], float] = {}
    for window in itertools.product(*(range(1, c + 1) for c in counts)):
        share = 1.0
        for w, c in zip(window, counts):
            share *= w / c
        density[window] = share  # tile-count estimate, to pick candidates without building every layout
    chosen = {}
    for target in targets:
        candidates = sorted(density, key=lambda w: abs(density[w] - target))[:6]
        best = None
        for window in candidates:
            layout = tile.build(geometry, geometry.heads, block, "cpu", window=window)
            if best is None or abs(layout.density - target) < abs(best[1].density - target):
                best = (window, layout)
        chosen[target] = best
    return chosen


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_grid(grid, args) -> list[dict]:
    B, H, D = args.batch, args.heads, args.head_dim
    geometry = Geometry(B, H, D, *grid)
    S = geometry.seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D) views, as diffusers hands them
    layouts = tile_layouts(geometry, args.block, args.densities)

    def dense():
        F.scaled_dot_product_attention(q, k, v)

    rows = []
    plan_s = {}
    with torch.no_grad():
        dense()
        for target, (window, layout) in layouts.items():
            plan_s[target] = timed(lambda: reference_attention(q4, k4, v4, layout))
            if S <= 8192:  # a sanity check of the timed path (the tests do the thorough ones)
                want = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.to_dense_mask())
                err = float((reference_attention(q4, k4, v4, layout).transpose(1, 2) - want).abs().max())
                assert err < 1e-4, f"gather path disagrees with masked SDPA: max abs error {err}"
        dense_times, gather_times = [], {t: [] for t in layouts}
        for _ in range(args.repeats):
            dense_times.append(timed(dense))
            for target, (_, layout) in layouts.items():
                gather_times[target].append(timed(lambda: reference_attention(q4, k4, v4, layout)))
            print(f"  {grid}: dense {dense_times[-1]:.3f}s, gather "
                  + ", ".join(f"{t}: {gather_times[t][-1]:.3f}s" for t in layouts), flush=True)
        masked_times = {}
        if S <= args.masked_max_seq:
            for target, (_, layout) in layouts.items():
                masked_times[target] = [timed(lambda: reference_attention(q4, k4, v4, layout, method="masked"))
                                        for _ in range(args.masked_repeats)]
    d_med = statistics.median(dense_times)
    for target, (window, layout) in layouts.items():
        gt = gather_times[target]
        mt = masked_times.get(target)
        rows.append(dict(
            grid=grid, S=S, window=window, density=layout.density, dense_med=d_med, dense_min=min(dense_times),
            gather_med=statistics.median(gt), gather_min=min(gt), plan_s=plan_s[target],
            masked_med=statistics.median(mt) if mt else None, masked_n=len(mt) if mt else 0,
        ))
    return rows


def markdown(rows: list[dict], args, started: str, load: tuple, load_end: tuple) -> str:
    command = "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = [
        f"## {args.label or 'run'} ({started})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical CPUs visible, affinity {len(os.sched_getaffinity(0))} "
        f"CPUs, torch threads {torch.get_num_threads()}; torch {torch.__version__}, Python {platform.python_version()}.",
        f"- Load average (1/5/15 min) at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, at end "
        f"{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}.",
        f"- B={args.batch}, H={args.heads}, D={args.head_dim}, float32, block {args.block}, tile pattern; "
        f"{args.repeats} interleaved timed calls per case after a warm-up (median, min); masked path "
        f"{args.masked_repeats} call(s) where run.",
        "",
        "| grid | S | window (tiles) | density | dense SDPA s (med / min) | masked s | gather s (med / min) "
        "| gather plan s (1st call) | dense / gather (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        masked = f"{r['masked_med']:.3f}" if r["masked_med"] is not None else "not run"
        lines.append(
            f"| {'x'.join(map(str, r['grid']))} | {r['S']} | {'x'.join(map(str, r['window']))} | {r['density']:.3f} "
            f"| {r['dense_med']:.3f} / {r['dense_min']:.3f} | {masked} | {r['gather_med']:.3f} / {r['gather_min']:.3f} "
            f"| {r['plan_s']:.3f} | {r['dense_med'] / r['gather_med']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", nargs="+", default=["16x16x16", "21x30x52"], help="video grids F x H x W after patchify")
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--masked-repeats", type=int, default=1)
    p.add_argument("--masked-max-seq", type=int, default=8192, help="skip the (slow) masked path above this S")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: a 2-core CPU)")
    p.add_argument("--label", default="", help="heading of this run in the results file")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    rows = []
    for grid in args.grids:
        rows += run_grid(parse_grid(grid), args)
    text = markdown(rows, args, started, load, os.getloadavg())
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
