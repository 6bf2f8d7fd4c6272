"""Whether the CFG branches of a step can share k-means' warm start (CPU, the shipped reference model).

    python benchmarks/kmeans_warm_branch.py --out benchmarks/results/kmeans_warm_branch.json

diffusers' Wan pipeline calls the transformer once per CFG branch (prompt, then negative prompt) at each step. The
patch keeps k-means' centroids between calls for a warm start of ``warm_iters`` Lloyd iterations; kept per branch they
are held twice (at Wan2.1-14B 720p, 0.56 GiB per copy). This measures what sharing one state costs in clustering
quality. A rendered clip is noised along one flow-matching path at ``--steps`` decreasing timesteps; the reference
model's queries and keys are captured at each timestep for the prompt and for the null prompt. Per (layer, head)
both are clustered as the kmeans pattern does (256 queries / 64 keys per cluster), by two chains of warm starts:

- ``per-branch``: each branch starts from its own centroids of the previous step (what the patch did before),
- ``shared``: prompt then null prompt at each step, each from the latest centroids of either (what it does now),

both after the same cold start at the first timestep (16 iterations from random tokens). Reported per chain: the
summed inertia after the warm iterations, relative to a fresh 16-iteration clustering of the same tokens, over the
warm steps (lower is better; 1.0 = as good as a converged cold start).
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
from sparse_dit.reference.attention import capture_qk  # noqa: E402
from sparse_dit.reference.model import load_reference_model, video_to_model  # noqa: E402
from sparse_dit.reference.videos import render_batch  # noqa: E402

TOKENS_PER_CLUSTER = {"q": 256, "k": 64}


def capture(model, x0: torch.Tensor, noise: torch.Tensor, t: float, ctx: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"q", "k"}: (layers * H, S, D) float32 of one forward at timestep t (0..1000) with text context ctx."""
    s = t / 1000.0
    x = ((1 - s) * x0 + s * noise).to(model.device, model.dtype)
    qk = capture_qk(model.transformer, (x, torch.tensor([t], device=model.device), ctx))
    out = {}
    for i, name in enumerate(("q", "k")):
        xs = [qk[layer][i].float() for layer in sorted(qk)]  # (1, H, S, D) each
        out[name] = torch.cat([x.reshape(-1, *x.shape[2:]) for x in xs])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help="timesteps along the path (the first is the cold start)")
    p.add_argument("--t-first", type=float, default=900.0)
    p.add_argument("--t-last", type=float, default=400.0)
    p.add_argument("--warm-iters", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="clip height and width in pixels (16 frames)")
    p.add_argument("--prompt", default="a red ball bouncing")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (one cold start and at least one warm step)")
    t0 = time.perf_counter()
    model = load_reference_model()
    video, _ = render_batch([args.seed], 16, args.size, args.size)
    x0 = video_to_model(video)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    contexts = {
        "prompt": model.text_encoder.encode([args.prompt], model.device).to(model.dtype),
        "null": model.text_encoder.encode([""], model.device).to(model.dtype),
    }
    times = torch.linspace(args.t_first, args.t_last, args.steps).tolist()
    with torch.no_grad():
        acts = [{branch: capture(model, x0, noise, t, ctx) for branch, ctx in contexts.items()} for t in times]

    def lloyd(x: torch.Tensor, C: int, iters: int, init: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        cent, labels, _, _ = kmeans.kmeans(x, C, iters, 0.0, init, seed=args.seed)
        return cent, float(kmeans.inertia(x, cent, labels).sum())

    totals: dict[str, dict[str, float]] = {}
    for name in ("q", "k"):
        S = acts[0]["prompt"][name].shape[1]
        C = max(1, S // TOKENS_PER_CLUSTER[name])
        converged = {(i, b): lloyd(acts[i][b][name], C, 16, None)[1] for i in range(1, len(times)) for b in contexts}
        start = {b: lloyd(acts[0][b][name], C, 16, None)[0] for b in contexts}
        # per-branch chains
        own = dict(start)
        shared = start["null"]  # the last call of the first step
        row = {"per-branch": 0.0, "shared": 0.0, "converged cold start": 0.0}
        for i in range(1, len(times)):
            for b in contexts:  # prompt, then null prompt, as the pipeline calls them
                own[b], inertia_own = lloyd(acts[i][b][name], C, args.warm_iters, own[b])
                shared, inertia_shared = lloyd(acts[i][b][name], C, args.warm_iters, shared)
                row["per-branch"] += inertia_own
                row["shared"] += inertia_shared
                row["converged cold start"] += converged[(i, b)]
        totals[name] = row
    relative = {name: {chain: v / row["converged cold start"] for chain, v in row.items()} for name, row in totals.items()}
    for name, row in relative.items():
        print(f"{name}: " + "  ".join(f"{chain} {v:.4f}" for chain, v in row.items()))
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
        "device": "cpu",
        "command": "python benchmarks/kmeans_warm_branch.py " + " ".join(sys.argv[1:]),
        "timesteps": times,
        "warm_iters": args.warm_iters,
        "inertia_vs_converged": relative,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
