"""Profiles across grids, calibration that predicts quality, and calibration time (GPU evidence for the profiler).

    python benchmarks/profile_transfer.py --out $OUT/profile_transfer.json

Three parts (``--parts``), each on the GPU:

``transfer``: the reference model calibrated at the Wan-480p grid (21 x 120 x 208 px) gives a per-head profile;
that profile is applied at other grids (a smaller frame, a larger frame, fewer frames) and compared with a profile
calibrated at each of those grids with the same calibration set, budget and warm-up. Per grid: PSNR/SSIM of each
against the dense clip of the same prompt and noise (held-out clips), and the measured density after the warm-up.

``rank``: every candidate of a ladder (tile, radial, k-means, prune members near 10-40% density) applied uniformly
at the 480p grid; the Spearman correlation between -calibration error and held-out PSNR over the candidates, for
each calibration metric (``rel_l2`` the original one, ``out_proj_sq``, ``mass``), measured in one pass
(`sparse_dit.calibrate.candidate_rank_study`).

``wan-time``: how long `sparse-dit profile`'s defaults (4 prompts x 10 steps, CFG, 256 query rows, the default
candidate ladder) take on Wan2.1-1.3B at 480p: random bf16 weights from the published config (speed does not
depend on the weights), a few measured steps timed and scaled to the CLI's 40 steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

import sparse_dit  # noqa: E402
from fidelity import post_warmup_density  # noqa: E402
from sparse_dit.calibrate import CalibrationSet, candidate_rank_study  # noqa: E402
from sparse_dit.commands.inspect import short_label  # noqa: E402
from sparse_dit.geometry import Geometry  # noqa: E402
from sparse_dit.metrics import psnr, ssim  # noqa: E402
from sparse_dit.profiler import build_profile, calibrate, default_candidates  # noqa: E402
from sparse_dit.reference import load_reference_model, sample_scene  # noqa: E402

SOURCE = (21, 120, 208)
GRIDS = {"smaller": (21, 80, 144), "larger": (21, 128, 224), "fewer frames": (13, 120, 208)}
RANK_LABELS = ("tile2x3x5", "tile2x4x7", "tile4x4x7", "radial0.25", "radial0.5", "kmeans0.35", "kmeans0.5",
               "prune0.15", "prune0.25", "prune0.35")


def log(*a) -> None:
    print(*a, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="transfer,rank,wan-time")
    p.add_argument("--target", type=float, default=0.2, help="profile budget (mean density after the warm-up)")
    p.add_argument("--warmup", type=float, default=0.2, help="dense share of the steps")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--calib-prompts", type=int, default=1)
    p.add_argument("--query-rows", type=int, default=128)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--rank-steps", type=int, default=30)
    p.add_argument("--rank-clips", type=int, default=2)
    p.add_argument("--wan-steps", type=int, default=3, help="measured CFG steps of the Wan calibration (first call cold)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--source", default="x".join(map(str, SOURCE)), help="calibration grid of the transferred profile, FxHxW px")
    p.add_argument("--grids", default=",".join(f"{k}={'x'.join(map(str, v))}" for k, v in GRIDS.items()),
                   help="name=FxHxW px,... grids the profile is applied at")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.source = tuple(int(x) for x in args.source.split("x"))
    args.grids = {k: tuple(int(x) for x in v.split("x")) for k, v in (item.split("=") for item in args.grids.split(","))}
    return args


def transfer(args, ref, meta: dict, on_row=lambda rows: None) -> list[dict]:
    size = dict(guidance_scale=4.0)
    prompts = [sample_scene(10_000 + i).prompt for i in range(args.calib_prompts)]

    def calibrated_at(grid: tuple[int, int, int]):
        frames, height, width = grid
        t0 = time.perf_counter()
        stats = calibrate(ref.transformer,
                          lambda: [ref.generate(p, seed=i, steps=args.calib_steps, frames=frames, height=height,
                                                width=width, **size) for i, p in enumerate(prompts)],
                          block_size=args.block_size, query_rows=args.query_rows, seed=0)
        secs = time.perf_counter() - t0
        log(f"calibrated at {grid}: {secs:.0f} s")
        return stats, secs

    def profile_of(stats, target: float):
        prof = build_profile(stats, target_density=target, num_buckets=2, dense_fraction=args.warmup,
                             block_size=args.block_size, model_class=type(ref.transformer).__name__,
                             model_id="sparse-dit reference model")
        log(f"  profile at target {target:.3f}: density {prof.density():.3f}")
        return prof

    source_stats, source_s = calibrated_at(args.source)
    source = profile_of(source_stats, args.target)
    meta["source_calibration_seconds"] = round(source_s, 1)
    clips = [(sample_scene(20_000 + i).prompt, 100 + i) for i in range(args.clips)]
    n_warm = int(round(args.warmup * args.steps))
    rows = []
    for name, grid in args.grids.items():
        frames, height, width = grid
        own_stats, own_s = calibrated_at(grid)
        dense = {}
        per: dict[str, list] = {}

        def run(label: str, prof) -> None:
            for prompt, seed in clips:
                kw = dict(seed=seed, steps=args.steps, frames=frames, height=height, width=width, **size)
                if seed not in dense:
                    dense[seed] = ref.generate(prompt, **kw)
                sparse_dit.patch(ref.transformer, profile=prof, dense_steps=n_warm, block_size=args.block_size)
                try:
                    clip = ref.generate(prompt, **kw)
                    st = dict(sparse_dit.patch_state(ref.transformer).stats)
                finally:
                    sparse_dit.unpatch(ref.transformer)
                per.setdefault(label, []).append(
                    {"psnr": psnr(dense[seed], clip), "ssim": ssim(dense[seed], clip),
                     "density": post_warmup_density(st, n_warm * ref.transformer.config.num_layers)})

        run("transferred", source)
        run("own", profile_of(own_stats, args.target))
        # the transfer rule keeps each pattern's meaning, not its density (a tile window keeps its length in frames,
        # so on fewer frames it covers more of the clip): compare at equal density too, with a profile calibrated
        # at this grid for the density the transferred one measured
        moved = float(np.mean([v["density"] for v in per["transferred"]]))
        equal = "own" if abs(moved - args.target) <= 0.02 else "own_equal_density"
        if equal != "own":
            run(equal, profile_of(own_stats, moved))
        row = {"grid": name, "grid_px": list(grid), "tokens": frames * (height // 4) * (width // 4),
               "own_calibration_seconds": round(own_s, 1)}
        for label, vals in per.items():
            row[label] = {k: float(np.mean([v[k] for v in vals])) for k in ("psnr", "ssim", "density")}
            row[label]["psnr_per_clip"] = [round(v["psnr"], 2) for v in vals]
        row["psnr_difference"] = row["transferred"]["psnr"] - row[equal]["psnr"]
        row["compared_with"] = equal
        log(f"{name:13s} {grid}: transferred {row['transferred']['psnr']:.2f} dB @ {row['transferred']['density']:.3f}"
            f" | own {row['own']['psnr']:.2f} dB @ {row['own']['density']:.3f}"
            + (f" | own at equal density {row[equal]['psnr']:.2f} dB @ {row[equal]['density']:.3f}" if equal != "own" else "")
            + f" | diff {row['psnr_difference']:+.2f} dB")
        rows.append(row)
        on_row(rows)
    return rows


def rank(args, ref) -> dict:
    frames, height, width = args.source
    geometry = Geometry(batch=1, heads=ref.transformer.config.num_attention_heads,
                        head_dim=ref.transformer.config.attention_head_dim, frames=frames, height=height // 4, width=width // 4)
    ladder = {short_label(c): c for c in default_candidates(geometry, args.block_size)}
    missing = [label for label in RANK_LABELS if label not in ladder]
    if missing:
        raise SystemExit(f"rank: candidates {missing} are not in the default ladder at {SOURCE}: {sorted(ladder)}")
    t0 = time.perf_counter()
    study = candidate_rank_study(
        [ladder[label] for label in RANK_LABELS], model=ref,
        calibration=CalibrationSet(tuple(sample_scene(10_000 + i).prompt for i in range(args.calib_prompts)),
                                   query_rows=args.query_rows, metrics=("rel_l2", "out_proj_sq", "mass")),
        heldout_prompts=[sample_scene(20_000 + i).prompt for i in range(args.rank_clips)],
        heldout_seeds=[100 + i for i in range(args.rank_clips)], steps=args.rank_steps, frames=frames, height=height,
        width=width, block_size=args.block_size)
    study["seconds"] = round(time.perf_counter() - t0, 1)
    for r in study["candidates"]:
        log(f"  {r['pattern']:60s} density {r['density']:.3f}  PSNR {r['psnr']:.2f}  " +
            "  ".join(f"{m} {e:.4f}" for m, e in r["errors"].items()))
    log("spearman(-error, PSNR):", {m: round(v, 3) for m, v in study["spearman"].items()})
    return study


def wan_time(args) -> dict:
    """Calibration time of the CLI defaults on Wan2.1-1.3B 480p, from timed transformer calls: the first call of a
    prompt is cold (k-means clusters from scratch, Triton compiles), the rest warm-start; the CLI's 4 prompts x 10
    steps x 2 CFG calls cost 4 x (cold + 19 x warm)."""
    import e2e

    model, inputs = e2e.build("wan1.3b-480p")
    timesteps = torch.linspace(999, 100, 10).tolist()  # the CLI's 10-step schedule, as the bucketing sees it
    step = e2e.step_fn(model, inputs)
    step()  # warm-up (cuDNN plans, Triton compilation of the attention kernel)
    e2e.sync()
    t0 = time.perf_counter()
    step()
    e2e.sync()
    dense_step = time.perf_counter() - t0
    call_seconds: list[float] = []

    def run() -> None:
        with torch.no_grad():
            for t in timesteps[: args.wan_steps]:
                for kw in inputs:
                    e2e.sync()
                    start = time.perf_counter()
                    model(timestep=torch.tensor([t], device="cuda"), return_dict=False, **kw)
                    e2e.sync()
                    call_seconds.append(time.perf_counter() - start)

    t0 = time.perf_counter()
    stats = calibrate(model, run, block_size=args.block_size, query_rows=256, seed=0)
    e2e.sync()
    secs = time.perf_counter() - t0
    cold, warm = call_seconds[0], (float(np.median(call_seconds[1:])) if len(call_seconds) > 1 else call_seconds[0])
    prompts, calls = 4, 10 * len(inputs)
    out = {"measured_steps": args.wan_steps, "measured_seconds": round(secs, 1), "candidates": len(stats.candidates),
           "call_seconds": [round(c, 2) for c in call_seconds], "cold_call_seconds": round(cold, 2),
           "warm_call_seconds": round(warm, 2), "dense_step_seconds": round(dense_step, 3),
           "cli_default_estimate_seconds": round(prompts * (cold + (calls - 1) * warm), 1),
           "cli_default_dense_seconds": round(dense_step * prompts * 10, 1)}
    log(f"wan1.3b-480p calibration: cold call {cold:.1f} s, warm call {warm:.1f} s ({len(stats.candidates)} candidates); "
        f"CLI defaults (4 prompts x 10 steps x {len(inputs)} calls) ~{out['cli_default_estimate_seconds'] / 60:.1f} min "
        f"vs dense sampling {out['cli_default_dense_seconds']:.0f} s")
    return out


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Profiles across grids, rank correlation, calibration time", "",
             f"Device {m['device']}, torch {m['torch']}, {m['date']}. Command: `{m['command']}`.", ""]
    if "transfer" in result:
        lines += [f"## A 480p-grid profile at other grids (target {m['target']}, warm-up {m['warmup']}, "
                  f"{m['steps']} steps, {m['clips']} held-out clips)", "",
                  f"Source calibration at {m['source']} px: {m.get('source_calibration_seconds')} s.", "",
                  "| grid | px | tokens | transferred PSNR | density | own-grid PSNR | density | "
                  "own-grid at the transferred density | difference at equal density |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["transfer"]:
            t, o = r["transferred"], r["own"]
            e = r.get(r.get("compared_with", "own"), o)
            same = "(same)" if e is o else f"{e['psnr']:.2f} dB @ {e['density']:.3f}"
            lines.append(f"| {r['grid']} | {'x'.join(map(str, r['grid_px']))} | {r['tokens']} | {t['psnr']:.2f} | "
                         f"{t['density']:.3f} | {o['psnr']:.2f} | {o['density']:.3f} | {same} | {r['psnr_difference']:+.2f} dB |")
    if "rank" in result:
        s = result["rank"]
        lines += ["", f"## Calibration error vs held-out PSNR ({len(s['candidates'])} uniform candidates, "
                      f"{s['settings']['steps']} steps, {len(s['settings']['heldout_seeds'])} clips)", "",
                  "| metric | Spearman(-error, PSNR) |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in s["spearman"].items()]
    if "wan_time" in result:
        w = result["wan_time"]
        lines += ["", "## Calibration time, Wan2.1-1.3B 480p (random weights)", "",
                  f"{w['measured_seconds']} s for {w['measured_steps']} CFG steps with {w['candidates']} candidates"
                  + (f" (cold call {w['cold_call_seconds']} s, warm {w['warm_call_seconds']} s)" if "cold_call_seconds" in w else "")
                  + f"; the CLI defaults (4 prompts x 10 steps) come to {w['cli_default_estimate_seconds']} s "
                  f"(dense sampling of the same steps: {w['cli_default_dense_seconds']} s)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = args.parts.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "target": args.target,
        "warmup": args.warmup, "steps": args.steps, "clips": args.clips, "source": list(args.source)}}

    def write() -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(result) + "\n")

    if "wan-time" in parts:
        result["wan_time"] = wan_time(args)
        write()
        torch.cuda.empty_cache()
    if "transfer" in parts or "rank" in parts:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ref = load_reference_model(dev, torch.float16 if dev.type == "cuda" else torch.float32)
        if "rank" in parts:
            result["rank"] = rank(args, ref)
            write()
        if "transfer" in parts:
            result["transfer"] = transfer(args, ref, result["meta"], lambda rows: (result.update(transfer=rows), write()))
            write()
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
