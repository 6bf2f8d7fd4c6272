"""What re-planning dynamic patterns less often costs in fidelity, on the trained reference model.

    python benchmarks/replan_fidelity.py --replan 1,2,3,5 --steps 10,30 --out $OUT

For each held-out clip the dense video is generated once; then each method (uniform k-means, uniform
prune, the shipped per-head profile) is run with every ``replan_every`` value, same prompt and seed,
and compared with the dense clip (PSNR over the clip, SSIM per frame; `sparse_dit.metrics`). Settings
follow benchmarks/results/fidelity.md (16 x 48 x 48 pixels, guidance 4, block 32, the first 20% of the
steps dense) so the numbers sit beside that table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402
from sparse_dit import PatternSpec  # noqa: E402
from sparse_dit.metrics import psnr, ssim  # noqa: E402
from sparse_dit.profile import Profile  # noqa: E402
from sparse_dit.reference import load_reference_model, sample_scene  # noqa: E402

METHODS = {
    "kmeans top_p 0.5": {"pattern": PatternSpec("kmeans", top_p=0.5)},
    # one warm Lloyd step per re-plan instead of the default two: half the planning arithmetic (planning.md)
    "kmeans top_p 0.5 warm_iters 1": {"pattern": PatternSpec("kmeans", top_p=0.5, warm_iters=1)},
    "kmeans top_p 0.9": {"pattern": PatternSpec("kmeans", top_p=0.9)},
    "kmeans top_p 0.9 warm_iters 1": {"pattern": PatternSpec("kmeans", top_p=0.9, warm_iters=1)},
    "prune keep 0.25": {"pattern": PatternSpec("prune", keep_ratio=0.25)},
    "profile reference.json": {"profile": "reference"},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replan", default="1,2,3,5", help="comma-separated replan_every values")
    p.add_argument("--steps", default="10", help="comma-separated step counts")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = load_reference_model(device, torch.float16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        settings = dict(steps=steps, guidance_scale=4.0, frames=args.frames, height=args.size, width=args.size)
        dense_steps = max(1, round(0.2 * steps))
        for i in range(args.clips):
            prompt, seed = sample_scene(20_000 + i).prompt, 100 + i
            sparse_dit.unpatch(ref.transformer)
            dense = ref.generate(prompt, seed=seed, **settings)
            for method, kw in methods.items():
                for replan in [int(r) for r in args.replan.split(",")]:
                    patch_kw = dict(kw, block_size=args.block_size, replan_every=replan)
                    if "pattern" in kw:
                        patch_kw["dense_steps"] = dense_steps
                    else:
                        # the profile keeps its own dense warm-up (dense_above) for its calibration schedule
                        patch_kw["profile"] = Profile.coerce(kw["profile"])
                    sparse_dit.patch(ref.transformer, **patch_kw)
                    try:
                        sparse = ref.generate(prompt, seed=seed, **settings)
                        stats = sparse_dit.patch_state(ref.transformer).stats
                    finally:
                        sparse_dit.unpatch(ref.transformer)
                    row = dict(steps=steps, seed=seed, method=method, replan_every=replan, psnr=psnr(dense, sparse),
                               ssim=ssim(dense, sparse), density=stats["mean_density"])
                    rows.append(row)
                    print(f"steps {steps} seed {seed} {method:24s} replan {replan}: PSNR {row['psnr']:.2f} dB, "
                          f"SSIM {row['ssim']:.4f}, density {row['density']:.3f}", flush=True)
    Path(args.out, "replan_fidelity.json").write_text(json.dumps(rows, indent=1))
    print("\nmean over clips:")
    print("| steps | method | replan_every | density | PSNR (dB) | SSIM |")
    print("|---:|---|---:|---:|---:|---:|")
    keys = sorted({(r["steps"], r["method"], r["replan_every"]) for r in rows}, key=lambda k: (k[0], list(METHODS).index(k[1]), k[2]))
    for steps, method, replan in keys:
        sel = [r for r in rows if (r["steps"], r["method"], r["replan_every"]) == (steps, method, replan)]
        print(f"| {steps} | {method} | {replan} | {np.mean([r['density'] for r in sel]):.3f} | "
              f"{np.mean([r['psnr'] for r in sel]):.2f} | {np.mean([r['ssim'] for r in sel]):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
