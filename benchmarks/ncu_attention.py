#!/usr/bin/env python3
"""One block-sparse attention launch of one engine, bracketed for Nsight Compute (GPU only).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python3 benchmarks/ncu_attention.py --engine gluon --kind random --density 0.3

Builds a Wan 480p-shaped problem (B=2 H=12 S=32760 D=128 bf16, or --shape), a random or window 128 x 128 block
mask of the given density (the masks of benchmarks/gluon_engine_check.py), runs the engine twice outside the
profiled range (compilation, table conversion), then once between cudaProfilerStart/Stop, so only the attention
kernel itself (and, for the FA4 engine, nothing else: its tables are converted and cached by the first call) is
profiled. Engines: gluon, fa4, triton. Prints the kernel's time measured with CUDA events outside the profiler.
(The 2026-12-04 schedule experiments used this script's `--gluon-schedule` at commit 95ad850, with the experiment
kernel of that commit; both were reverted after.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()  # importable on a bare GPU machine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("gluon", "fa4", "triton"), required=True)
    ap.add_argument("--kind", choices=("random", "window"), default="random")
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--shape", type=int, nargs=4, default=[2, 12, 32760, 128], metavar=("B", "H", "S", "D"))
    ap.add_argument("--per-tile", action="store_true",
                    help="Gluon engine only: one CTA per query block instead of the persistent grid")
    args = ap.parse_args()

    import torch

    from gluon_engine_check import kept_pairs, random_block_mask, window_block_mask
    from sparse_dit.layout import Layout

    if not torch.cuda.is_available():
        print("ncu_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    B, H, S, D = args.shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    nb = -(-S // 128)
    if args.kind == "random":
        mask = random_block_mask(1, H, nb, args.density, gen, "cuda")
    else:
        mask = window_block_mask(1, H, nb, args.density, "cuda")
    layout = Layout.from_block_mask(mask, 128, S)
    flop = 4.0 * D * kept_pairs(mask, S, B)

    if args.engine == "gluon":
        import functools

        from sparse_dit.kernels.gluon_attention import gluon_block_sparse_attention as fn

        if args.per_tile:
            fn = functools.partial(fn, persistent=False)
    elif args.engine == "fa4":
        from sparse_dit.kernels.fa4 import fa4_block_sparse_attention as fn
    else:
        from sparse_dit.kernels.triton_attention import triton_block_sparse_attention as fn

    with torch.no_grad():
        for _ in range(2):
            fn(q, k, v, layout)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(q, k, v, layout)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
        torch.cuda.cudart().cudaProfilerStart()
        fn(q, k, v, layout)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"[ncu_attention] {args.engine} {args.kind} density {args.density} B={B} H={H} S={S} D={D}: "
          f"{ms:.3f} ms unprofiled, {flop / (ms * 1e-3) / 1e12:.1f} effective TFLOP/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
