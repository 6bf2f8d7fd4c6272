"""How k-means' cold start affects the clustering of real activations (CPU, the shipped reference model).

    python benchmarks/kmeans_init.py --out benchmarks/results/kmeans_init.json

The reference model runs once on a noised rendered clip (16 x 128 x 128 pixels -> 16 x 32 x 32 tokens); the queries
and keys of every layer are clustered per head as the kmeans pattern does (256 queries / 64 keys per cluster,
`sparse_dit.patterns.kmeans.kmeans`, tol 0) from three starts, and the summed inertia after 2 and after 16 Lloyd
iterations is reported relative to k-means++:

- ``kmeans++``: k-means++ seeding (one sampling pass per centroid; defined here, as the baseline),
- ``random``: C distinct random tokens (`kmeans.sample_init`, what the pattern uses),
- ``strided``: C tokens evenly spaced along the raster order.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

from sparse_dit.io import write_text_atomic  # noqa: E402
from sparse_dit.patterns import kmeans  # noqa: E402
from sparse_dit.reference.attention import head_survey  # noqa: E402
from sparse_dit.reference.model import load_reference_model  # noqa: E402


def plus_plus(x: torch.Tensor, C: int, seed: int) -> torch.Tensor:
    """k-means++ seeding of N problems: x (N, S, D) -> (N, C, D)."""
    N, S, _ = x.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(N)
    picks = [torch.randint(0, S, (N,), generator=gen)]
    best = ((x - x[rows, picks[0]][:, None]) ** 2).sum(-1)
    for _ in range(1, C):
        picks.append(torch.multinomial(best.clamp(min=0) + 1e-12, 1, generator=gen).squeeze(1))
        best = torch.minimum(best, ((x - x[rows, picks[-1]][:, None]) ** 2).sum(-1))
    return x[rows[:, None], torch.stack(picks, 1)].clone()


def strided(x: torch.Tensor, C: int, seed: int) -> torch.Tensor:
    S = x.shape[1]
    return x[:, (torch.arange(C) * S) // C + (S // C) // 2].clone()


STARTS = {"kmeans++": plus_plus, "random": kmeans.sample_init, "strided": strided}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    model = load_reference_model()
    qk = head_survey(model, "a red ball bouncing", seed=args.seed, frames=16, size=128, queries=8)["qk"]
    inertia: dict[str, dict[str, float]] = {}
    for q, k in qk.values():
        for name, x, per in (("q", q, 256), ("k", k, 64)):
            B, H, S, D = x.shape
            flat = x.float().reshape(B * H, S, D)
            C = max(1, S // per)
            for start, fn in STARTS.items():
                init = fn(flat, C, args.seed)
                for iters in (2, 16):
                    cent, labels, _, _ = kmeans.kmeans(flat, C, iters, 0.0, init)
                    key = f"{name}, {iters} iters"
                    inertia.setdefault(key, {}).setdefault(start, 0.0)
                    inertia[key][start] += float(kmeans.inertia(flat, cent, labels).sum())
    relative = {key: {s: v / row["kmeans++"] for s, v in row.items()} for key, row in inertia.items()}
    for key, row in relative.items():
        print(f"{key:14s} " + "  ".join(f"{s} {v:.4f}" for s, v in row.items()))
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "device": "cpu",
              "layers": len(qk), "inertia_vs_kmeanspp": relative, "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
