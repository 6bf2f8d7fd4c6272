"""Per-head profiles vs uniform single patterns at equal attention density, on the reference model (CPU).

    python benchmarks/fidelity.py --out benchmarks/results/fidelity.json \\
        --save-profile sparse_dit/profiles/reference.json --save-density 0.25

1. Calibrate once, exactly as ``sparse-dit profile --model reference`` does with the same options
   (prompts ``sample_scene(10_000 + i)``, seeds ``seed + i``, the same frames/size/steps/guidance), and time it.
2. For every target density build a profile (``dense_fraction`` 0.2, 2 timestep buckets) and pick, for
   every pattern family (tile, radial, kmeans, prune), the uniform baseline: the calibrated candidate of that
   family whose calibration density (outside the warm-up) is the highest not above target + ``--slack``; ties
   within half a point go to the lower calibration error. Uniform baselines run with ``dense_steps`` equal to
   the profile's warm-up steps, so every method has the same dense warm-up.
3. Generate held-out clips (prompts ``sample_scene(20_000 + i)``, seeds ``100 + i``) densely once and with every
   method; report PSNR / SSIM against the dense clip (`sparse_dit.fidelity.psnr` / ``ssim``, data range 1) and the
   measured density over the calls after the warm-up (layers whose plan is all-dense count as 1.0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402
from sparse_dit.fidelity import psnr, ssim  # noqa: E402
from sparse_dit.commands.inspect import short_label  # noqa: E402
from sparse_dit.profiler import build_profile, calibrate  # noqa: E402
from sparse_dit.reference import load_reference_model, sample_scene  # noqa: E402

FAMILIES = ("tile", "radial", "kmeans", "prune")
# sparser static settings than the profiler's candidates, for baselines at low targets (not calibrated: no error)
EXTRA = {"radial": [{"decay": d} for d in (0.1, 0.15, 0.2)]}


def uniform_baseline(stats, family: str, target: float, ts, slack: float, block_size: int):
    """(spec, calibration density, calibration error) of the family's candidate nearest the target from below."""
    err, dens = stats.mean(ts)
    rows = []
    for c, spec in enumerate(stats.candidates):
        if spec.name == family:
            rows.append((spec, float(dens[..., c].mean()), float(err[..., c].mean())))
    ok = [r for r in rows if r[1] <= target + slack]
    if not ok and family in EXTRA:  # no calibrated member this sparse: a static one, density from its layout
        from sparse_dit.patterns import PatternSpec

        for params in EXTRA[family]:
            spec = PatternSpec(family, **params)
            lay = spec.module.build(stats.geometry, stats.heads, block_size, "cpu", **spec.params)
            ok.append((spec, float(lay.density_per_head().mean()), float("nan")))
        ok = [r for r in ok if r[1] <= target + slack]
    ok = ok or [min(rows, key=lambda r: r[1])]
    top = max(r[1] for r in ok)
    return min((r for r in ok if r[1] >= top - 0.005), key=lambda r: r[2])


def post_warmup_density(stats: dict, warm_calls: int) -> float:
    dense_after = stats["dense_calls"] - warm_calls
    n = stats["sparse_calls"] + dense_after
    return (stats["density_sum"] + dense_after) / n if n else 1.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--query-rows", type=int, default=256)
    p.add_argument("--calib-prompts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buckets", type=int, default=2)
    p.add_argument("--dense-fraction", type=float, default=0.2)
    p.add_argument("--densities", default="0.15,0.25,0.35")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--slack", type=float, default=0.01, help="a uniform baseline may exceed the target by this much")
    p.add_argument("--methods", default="profile," + ",".join(FAMILIES))
    p.add_argument("--stats-cache", help="pickle of the calibration statistics: reused if present, else written")
    p.add_argument("--dense-cache", help="folder of the dense held-out clips (.npy per prompt/seed/settings): "
                   "reused if present, else written, so runs over different targets share one dense reference")
    p.add_argument("--save-profile", help="write the profile of --save-density here")
    p.add_argument("--save-density", type=float, default=0.25)
    p.add_argument("--out", help="results JSON (a markdown table goes next to it as .md)")
    args = p.parse_args()
    torch.manual_seed(0)

    ref = load_reference_model("cpu", torch.float32)
    settings = {"frames": args.frames, "height": args.height, "width": args.width, "steps": args.steps,
                "guidance_scale": args.guidance}
    prompts = [sample_scene(10_000 + i).prompt for i in range(args.calib_prompts)]
    cache = Path(args.stats_cache) if args.stats_cache else None
    if cache is not None and cache.exists():
        stats, calib_s = pickle.loads(cache.read_bytes())
        print(f"calibration statistics from {cache} (took {calib_s:.0f} s when measured)", flush=True)
    else:
        def run() -> None:
            for i, prompt in enumerate(prompts):
                ref.generate(prompt, seed=args.seed + i, **settings)

        t0 = time.perf_counter()
        stats = calibrate(ref.transformer, run, block_size=args.block_size, query_rows=args.query_rows, seed=args.seed)
        calib_s = time.perf_counter() - t0
        print(f"calibration: {calib_s:.0f} s, {len(stats.candidates)} candidates", flush=True)
        if cache is not None:
            cache.write_bytes(pickle.dumps((stats, calib_s)))

    layers = stats.layers
    targets = [float(x) for x in args.densities.split(",")]
    methods = args.methods.split(",")
    calibration = {"prompts": prompts, "settings": settings, "seed": args.seed, "query_rows": args.query_rows,
                   "seconds": round(calib_s, 1), "device": "cpu"}
    plans = {}
    for target in targets:
        t0 = time.perf_counter()
        profile = build_profile(stats, target_density=target, num_buckets=args.buckets, dense_fraction=args.dense_fraction,
                                block_size=args.block_size, model_class=type(ref.transformer).__name__,
                                model_id="sparse-dit reference model", calibration=calibration)
        build_s = time.perf_counter() - t0
        n_dense = sum(1 for t in stats.timesteps if t > profile.dense_above)
        sparse_ts = [t for t in stats.timesteps if t <= profile.dense_above]
        entries = {}
        if "profile" in methods:
            entries["profile"] = {"patch": {"profile": profile}, "label": "per-head profile",
                                  "calib_density": profile.density(), "calib_error": profile.summary["mean_error"]}
        for fam in FAMILIES:
            if fam in methods:
                spec, d, e = uniform_baseline(stats, fam, target, sparse_ts, args.slack, args.block_size)
                entries[fam] = {"patch": {"pattern": spec, "dense_steps": n_dense, "block_size": args.block_size},
                                "label": short_label(spec), "calib_density": d, "calib_error": e}
        plans[target] = (profile, n_dense, entries, build_s)
        print(f"target {target}: warm-up {n_dense} steps, profile {profile.summary} (built in {build_s:.1f} s); "
              + ", ".join(f"{k}: {v['label']} ({v['calib_density']:.3f}, err {v['calib_error']:.4f})" for k, v in entries.items()),
              flush=True)
        if args.save_profile and abs(target - args.save_density) < 1e-9:
            profile.save(args.save_profile)
            print(f"wrote {args.save_profile}", flush=True)

    clips = [(sample_scene(20_000 + i).prompt, 100 + i) for i in range(args.clips)]
    results = {target: {m: [] for m in plans[target][2]} for target in targets}
    transformer = ref.transformer
    for prompt, seed in clips:
        sparse_dit.unpatch(transformer)
        dense_file = None
        if args.dense_cache:
            key = hashlib.sha256(json.dumps([prompt, seed, settings], sort_keys=True).encode()).hexdigest()[:16]
            dense_file = Path(args.dense_cache) / f"dense_{seed}_{key}.npy"
        if dense_file is not None and dense_file.exists():
            dense = np.load(dense_file)
            print(f"clip seed {seed}: dense from {dense_file}  ({prompt})", flush=True)
        else:
            t0 = time.perf_counter()
            dense = ref.generate(prompt, seed=seed, **settings)
            print(f"clip seed {seed}: dense {time.perf_counter() - t0:.1f} s  ({prompt})", flush=True)
            if dense_file is not None:
                dense_file.parent.mkdir(parents=True, exist_ok=True)
                np.save(dense_file, dense)
        for target in targets:
            _, n_dense, entries, _ = plans[target]
            for name, entry in entries.items():
                sparse_dit.patch(transformer, **entry["patch"])
                try:
                    t0 = time.perf_counter()
                    out = ref.generate(prompt, seed=seed, **settings)
                    secs = time.perf_counter() - t0
                    st = dict(sparse_dit.patch_state(transformer).stats)
                finally:
                    sparse_dit.unpatch(transformer)
                if not np.isfinite(out.astype(np.float64)).all():
                    raise RuntimeError(f"{name} produced non-finite frames")
                row = {"seed": seed, "prompt": prompt, "psnr": psnr(dense, out), "ssim": ssim(dense, out),
                       "density": post_warmup_density(st, n_dense * layers), "mean_density": st["mean_density"],
                       "sparse_calls": st["sparse_calls"], "dense_calls": st["dense_calls"], "seconds": secs}
                results[target][name].append(row)
                print(f"  target {target} {name:7s} {entry['label']:22s} PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.4f} "
                      f"density {row['density']:.3f} ({secs:.1f} s)", flush=True)

    summary, md = [], []
    md.append(f"Calibration: {calib_s:.0f} s on CPU ({len(stats.candidates)} candidates, {args.calib_prompts} prompts).")
    for target in targets:
        profile, n_dense, entries, build_s = plans[target]
        md += ["", f"### target density {target:g} (first {n_dense} of {args.steps} steps dense for every method)", "",
               "| method | pattern | density (measured) | calib. density | calib. error | PSNR (dB) | SSIM |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for name, entry in entries.items():
            rows = results[target][name]
            finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
            s = {"target": target, "method": name, "pattern": entry["label"],
                 "density": float(np.mean([r["density"] for r in rows])),
                 "mean_density": float(np.mean([r["mean_density"] for r in rows])),
                 "calib_density": entry["calib_density"], "calib_error": entry["calib_error"],
                 "psnr": float(np.mean(finite)) if finite else math.inf, "ssim": float(np.mean([r["ssim"] for r in rows])),
                 "psnr_per_clip": [round(r["psnr"], 2) for r in rows], "ssim_per_clip": [round(r["ssim"], 4) for r in rows]}
            summary.append(s)
            bold = "**" if name == "profile" else ""
            md.append(f"| {bold}{name}{bold} | {entry['label']} | {s['density']:.3f} | {s['calib_density']:.3f} | "
                      f"{s['calib_error']:.4f} |".replace("nan", "n/a") + f" {s['psnr']:.2f} | {s['ssim']:.4f} |")
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"settings": {**settings, "block_size": args.block_size, "query_rows": args.query_rows,
                            "calibration_prompts": prompts, "seed": args.seed, "buckets": args.buckets,
                            "dense_fraction": args.dense_fraction, "clips": [{"prompt": p_, "seed": s_} for p_, s_ in clips],
                            "torch_threads": torch.get_num_threads(), "sparse_dit": sparse_dit.__version__},
               "calibration_seconds": calib_s, "candidates": [short_label(c) for c in stats.candidates],
               "profiles": {str(t): plans[t][0].summary for t in targets},
               "summary": summary, "clips": {str(t): results[t] for t in targets}}
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text("\n".join(md) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
