"""Where the time of one patched denoising step goes: torch.profiler's top GPU kernels and host ops.

    python benchmarks/profile_step.py --model wan1.3b-480p --case kmeans@0.1 --replan 1,4 --out $OUT

Builds the transformer as benchmarks/e2e.py does (published config, random bf16 weights), patches it
with the case's plan, runs warm-up steps, then profiles ``--steps`` consecutive steps (a whole replan
period when ``replan_every`` > 1) and prints the kernels with the most GPU time, per step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (also makes sparse_dit importable)

import sparse_dit  # noqa: E402
from sparse_dit.geometry import Geometry  # noqa: E402
from sparse_dit.profile import Profile  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan1.3b-480p", choices=sorted(e2e.CONFIGS))
    p.add_argument("--case", default="kmeans@0.1", help="pattern@density as in e2e.py (tile, radial, kmeans, prune, mixed)")
    p.add_argument("--replan", default="1", help="comma-separated replan_every values, one profile each")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    family, _, _, text_len, _ = e2e.CONFIGS[args.model]
    model, inputs = e2e.build(args.model)
    F_, H_, W_ = e2e.grid_of(args.model)
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    text = (text_len, "last") if family == "hunyuan" else (0, "none")
    geometry = Geometry(1, heads, head_dim, F_, H_, W_, text_len=text[0], text_position=text[1])
    layers = len(sparse_dit.patching.resolve_transformers(model)[0][1].self_attention(model))
    pattern, target = args.case.split("@")
    if pattern == "mixed":
        plan, _ = e2e.mixed_plan(geometry, float(target), args.block, heads)
    else:
        plan = (e2e.pattern_at(pattern, float(target), geometry, args.block)[0],) * heads
    step = e2e.step_fn(model, inputs)
    # self time: each kernel and op counted once, not again in every op that encloses it
    sort_key = "self_cuda_time_total" if e2e.DEVICE == "cuda" else "self_cpu_time_total"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if e2e.DEVICE == "cuda" else [])
    for replan in [int(r) for r in args.replan.split(",")]:
        sparse_dit.patch(model, profile=Profile.constant(plan, layers, block_size=args.block), replan_every=replan)
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(replan):
                step()
            e2e.sync()
        sparse_dit.unpatch(model)
        table = prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60)
        head = f"== {args.model} {args.case} replan_every={replan}: {replan} step(s) profiled"
        print(head, table, sep="\n", flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"profile_{pattern}_{target}_r{replan}.txt").write_text(head + "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
