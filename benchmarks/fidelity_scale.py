"""Fidelity at Wan-480p token counts: per-head profiles vs uniform patterns on the reference model (GPU).

    python benchmarks/fidelity_scale.py --out $OUT/fidelity_scale.json --profiles-dir $OUT

The reference video DiT generates 21 x 120 x 208 px clips (21 x 30 x 52 = 32,760 tokens, the Wan2.1 480p
token grid) with the flow-matching Euler sampler and classifier-free guidance. Steps:

1. Calibrate once on the GPU (held-out calibration prompts ``sample_scene(10_000 + i)``), timed.
2. For every dense warm-up (``--warmups``, a share of the steps) and target density build a per-head profile
   (its allocation skips the warm-up timesteps); every uniform family (tile, radial, kmeans, prune) takes its
   calibrated candidate nearest the target from below (`fidelity.uniform_baseline`).
3. Held-out clips (prompts ``sample_scene(20_000 + i)``, seeds ``100 + i``; training uses seeds >= 1,000,000):
   each method generates from the same starting noise as the dense run of the same clip, with exactly
   ``round(warmup * steps)`` dense steps. Per clip: PSNR and SSIM against the dense clip, measured density of
   the calls after the warm-up (dense heads/layers count as 1.0).

Methods run in priority order (``--order``) and the results file is rewritten after each method, so a run
cut short by ``--budget-s`` still reports everything it finished. ``attn_error`` is the attention-output
relative L2 error the calibration measured for the chosen candidates (mean over layers, heads and calls).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402
from fidelity import post_warmup_density, uniform_baseline  # noqa: E402
from sparse_dit.commands.inspect import short_label  # noqa: E402
from sparse_dit.metrics import psnr, ssim  # noqa: E402
from sparse_dit.profiler import build_profile, calibrate  # noqa: E402
from sparse_dit.reference import load_reference_model, sample_scene  # noqa: E402

FAMILIES = ("tile", "radial", "kmeans", "prune")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--width", type=int, default=208)
    p.add_argument("--steps", default="50,30", help="comma-separated step counts; the first is the main one")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--query-rows", type=int, default=128)
    p.add_argument("--calib-prompts", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=20,
                   help="sampling steps of each calibration run (20: 10%% and 20%% warm-ups are whole steps)")
    p.add_argument("--targets", default="0.1,0.15,0.2,0.3")
    p.add_argument("--warmups", default="0.2,0.1", help="dense warm-up shares of the steps; the first is the main one")
    p.add_argument("--secondary-targets", default="0.15,0.2",
                   help="targets of the profile runs with the second warm-up and the second step count")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--slack", type=float, default=0.01)
    p.add_argument("--schedules", default="0.3/0.1,0.35/0.2/0.1",
                   help="method group profile-sched: per-bucket density budgets, high-noise bucket first, '/'-separated "
                   "(one profile per schedule, as many timestep buckets as values), main warm-up and steps")
    p.add_argument("--bucket-weights", default="2/1,4/1",
                   help="method group profile-weighted: one overall budget per --targets value, the allocation's errors "
                   "weighted per timestep bucket (high-noise first, '/'-separated; `build_profile(bucket_weights=)`)")
    p.add_argument("--order", default="profile,tile,radial,kmeans,prune,profile-w2,profile-steps2",
                   help="priority of the method groups: profile (main warm-up), tile/radial/kmeans/prune (uniform, "
                        "main warm-up), profile-w2 (profile, second warm-up), profile-steps2 (profile, second step count); "
                        "not by default: profile-sched (--schedules), profile-weighted (--bucket-weights)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new method group past this many seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reference", help="reference model folder (default: the shipped one)")
    p.add_argument("--profiles-dir", help="write the profiles here (created if missing)")
    p.add_argument("--out", required=True, help="results JSON (a list of rows); .md and _run.json go next to it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    ref = load_reference_model(dev, dtype, path=args.reference)
    steps_list = [int(s) for s in args.steps.split(",")]
    warmups = [float(w) for w in args.warmups.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    secondary = {float(t) for t in args.secondary_targets.split(",")}
    size = dict(frames=args.frames, height=args.height, width=args.width, guidance_scale=args.guidance)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profiles_dir:  # before the calibration: a bad path fails now, not after minutes of GPU time
        Path(args.profiles_dir).mkdir(parents=True, exist_ok=True)

    # 1. calibration (dense runs of the calibration prompts, every candidate measured at every call)
    prompts = [sample_scene(10_000 + i).prompt for i in range(args.calib_prompts)]
    t0 = time.perf_counter()

    def run() -> None:
        for i, prompt in enumerate(prompts):
            ref.generate(prompt, seed=i, steps=args.calib_steps, **size)

    calls = [0]

    def progress() -> None:
        calls[0] += 1
        if calls[0] % 40 == 0:
            print(f"  calibration: {calls[0]} attention calls, {time.perf_counter() - t0:.0f} s", flush=True)

    stats = calibrate(ref.transformer, run, block_size=args.block_size, query_rows=args.query_rows, seed=0,
                      on_call=progress)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    calib_s = time.perf_counter() - t0
    print(f"calibration: {calib_s:.1f} s, {len(stats.candidates)} candidates, {len(stats.timesteps)} timesteps", flush=True)
    layers = stats.layers
    calibration = {"prompts": prompts, "steps": args.calib_steps, "query_rows": args.query_rows,
                   "seconds": round(calib_s, 1), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}

    # 2. methods: (group, label, patch kwargs, warm-up share, target, steps, calibration density/error)
    def profile_for(warmup: float, target, num_buckets: int = 2, **budget):
        return build_profile(stats, target_density=target, num_buckets=num_buckets, dense_fraction=warmup,
                             block_size=args.block_size, model_class=type(ref.transformer).__name__,
                             model_id="sparse-dit reference model", calibration=calibration, **budget)

    methods: dict[str, list] = {g: [] for g in args.order.split(",")}
    profiles = {}
    for warmup in warmups:
        for target in targets:
            prof = profile_for(warmup, target)
            profiles[(warmup, target)] = prof
            if args.profiles_dir:
                prof.save(Path(args.profiles_dir) / f"profile_w{warmup:g}_d{target:g}.json")
    main_w, main_steps = warmups[0], steps_list[0]
    sparse_ts = [t for t in stats.timesteps if t <= profiles[(main_w, targets[0])].dense_above]
    for target in targets:
        prof = profiles[(main_w, target)]
        entry = ("profile", {"profile": prof}, main_w, target, main_steps, prof.density(), prof.summary["mean_error"])
        methods.get("profile", []).append(entry)
        for fam in FAMILIES:
            if fam in methods:
                spec, d, e = uniform_baseline(stats, fam, target, sparse_ts, args.slack, args.block_size)
                methods[fam].append((short_label(spec), {"pattern": spec, "block_size": args.block_size}, main_w, target,
                                     main_steps, d, e))
        if len(warmups) > 1 and "profile-w2" in methods and target in secondary:
            p2 = profiles[(warmups[1], target)]
            methods["profile-w2"].append(("profile", {"profile": p2}, warmups[1], target, main_steps, p2.density(),
                                          p2.summary["mean_error"]))
        if len(steps_list) > 1 and "profile-steps2" in methods and target in secondary:
            methods["profile-steps2"].append(("profile", {"profile": prof}, main_w, target, steps_list[1], prof.density(),
                                              prof.summary["mean_error"]))

    if "profile-sched" in methods:  # where the budget goes over the timesteps, at the same mean
        for sched in [[float(x) for x in item.split("/")] for item in args.schedules.split(",") if item]:
            prof = profile_for(main_w, sched, num_buckets=len(sched))
            if args.profiles_dir:
                prof.save(Path(args.profiles_dir) / f"profile_w{main_w:g}_sched{'-'.join(f'{x:g}' for x in sched)}.json")
            # target: the mean budget the schedule implies (buckets can hold different numbers of steps)
            methods["profile-sched"].append((f"profile {'/'.join(f'{x:g}' for x in sched)}", {"profile": prof}, main_w,
                                             round(prof.density(), 3), main_steps, prof.density(), prof.summary["mean_error"]))

    if "profile-weighted" in methods:  # the allocator moves the budget where errors weigh more
        for weights in [[float(x) for x in item.split("/")] for item in args.bucket_weights.split(",") if item]:
            for target in targets:
                prof = profile_for(main_w, target, num_buckets=len(weights), bucket_weights=weights)
                label = f"profile w{'/'.join(f'{x:g}' for x in weights)}"
                methods["profile-weighted"].append((label, {"profile": prof}, main_w, target, main_steps, prof.density(),
                                                    prof.summary["mean_error"]))

    # 3. generation: dense once per (clip, steps), then every method
    clips = [(sample_scene(20_000 + i).prompt, 100 + i) for i in range(args.clips)]
    dense: dict[tuple[int, int], np.ndarray] = {}
    dense_s: dict[int, list[float]] = {}
    rows: list[dict] = []
    run_meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": calibration["device"], "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "backend": "auto",
        "grid_px": [args.frames, args.height, args.width], "tokens": stats.geometry.seq_len if stats.geometry else None,
        "calibration": calibration, "candidates": [short_label(c) for c in stats.candidates],
        "clips": [{"prompt": p_, "seed": s_} for p_, s_ in clips], "dense_seconds": dense_s, "skipped": [],
    }

    def dense_clip(prompt: str, seed: int, steps: int) -> np.ndarray:
        if (seed, steps) not in dense:
            t = time.perf_counter()
            dense[(seed, steps)] = ref.generate(prompt, seed=seed, steps=steps, **size)
            dense_s.setdefault(steps, []).append(round(time.perf_counter() - t, 2))
        return dense[(seed, steps)]

    def write() -> None:
        out.write_text(json.dumps(rows, indent=1) + "\n")
        out.with_name(out.stem + "_run.json").write_text(json.dumps(run_meta, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(rows, run_meta) + "\n")

    transformer = ref.transformer
    for group, entries in methods.items():
        if time.perf_counter() - start > args.budget_s:
            run_meta["skipped"].append(group)
            print(f"time budget reached: skipping {group}", flush=True)
            continue
        for label, patch_kw, warmup, target, steps, calib_d, calib_e in entries:
            n_warm = int(round(warmup * steps))
            per_clip = []
            for prompt, seed in clips:
                ref_clip = dense_clip(prompt, seed, steps)
                sparse_dit.patch(transformer, dense_steps=n_warm, **patch_kw)
                try:
                    t = time.perf_counter()
                    clip = ref.generate(prompt, seed=seed, steps=steps, **size)
                    secs = time.perf_counter() - t
                    st = dict(sparse_dit.patch_state(transformer).stats)
                finally:
                    sparse_dit.unpatch(transformer)
                per_clip.append({"seed": seed, "psnr": psnr(ref_clip, clip), "ssim": ssim(ref_clip, clip),
                                 "density": post_warmup_density(st, n_warm * layers), "seconds": round(secs, 2)})
            finite = [c["psnr"] for c in per_clip if math.isfinite(c["psnr"])]
            row = {
                "method": group.split("-")[0] if group.startswith("profile") else group, "pattern": label,
                "target": target, "density": float(np.mean([c["density"] for c in per_clip])), "warmup": warmup,
                "steps": steps, "psnr_mean": float(np.mean(finite)) if finite else math.inf,
                "psnr_min": float(min(c["psnr"] for c in per_clip)), "ssim_mean": float(np.mean([c["ssim"] for c in per_clip])),
                "clips": len(per_clip), "attn_error": calib_e, "calib_density": calib_d,
                "psnr_per_clip": [round(c["psnr"], 2) for c in per_clip], "seconds_per_clip": [c["seconds"] for c in per_clip],
            }
            rows.append(row)
            print(f"{group:15s} {label:14s} target {target:<5g} warm-up {warmup:<4g} steps {steps}: density "
                  f"{row['density']:.3f}  PSNR {row['psnr_mean']:.2f} (min {row['psnr_min']:.2f})  SSIM "
                  f"{row['ssim_mean']:.4f}  attn err {calib_e:.3f}  [{time.perf_counter() - start:.0f} s]", flush=True)
            write()
    run_meta["total_seconds"] = round(time.perf_counter() - start, 1)
    write()
    print(f"wrote {out}", flush=True)
    return 0


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Fidelity at {meta['grid_px'][0]} x {meta['grid_px'][1]} x {meta['grid_px'][2]} px ({meta['tokens']} tokens)",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, {meta['dtype']}, {meta['date']}. Command: `{meta['command']}`.",
        f"Calibration: {meta['calibration']['seconds']} s on {meta['calibration']['device']} ({len(meta['candidates'])} candidates, "
        f"{len(meta['calibration']['prompts'])} prompts x {meta['calibration']['steps']} steps).",
        "",
        "| method | pattern | target | density | warm-up | steps | PSNR mean | PSNR min | SSIM | attn err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["steps"], r["warmup"], r["target"], r["method"] != "profile", r["method"])):
        bold = "**" if r["method"] == "profile" else ""
        lines.append(
            f"| {bold}{r['method']}{bold} | {r['pattern']} | {r['target']:g} | {r['density']:.3f} | {r['warmup']:g} | "
            f"{r['steps']} | {r['psnr_mean']:.2f} | {r['psnr_min']:.2f} | {r['ssim_mean']:.4f} | {r['attn_error']:.3f} |"
        )
    if meta.get("skipped"):
        lines += ["", f"Not run (time budget): {', '.join(meta['skipped'])}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
