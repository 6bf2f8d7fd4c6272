"""Summarise a profile: density and error per layer and timestep bucket, pattern counts, and optionally a
heatmap of the pattern of every (layer, head) per bucket (--plot map.png)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile file (.json) or the name of a shipped profile")
    p.add_argument("--plot", metavar="PNG", help="write a pattern map: one panel per bucket, layers x heads (.png)")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="also report how unevenly the plan's cost spreads over N Ulysses context-parallel ranks")


def expected_cost(profile) -> dict | None:
    """The profile's stated cost (``header.cost``), or, for older files, its cost model applied now; None without either."""
    from sparse_dit.costmodel import expected_speedup

    if profile.header.get("cost"):
        return profile.header["cost"]
    return expected_speedup(profile) if profile.header.get("cost_model") else None


def summary_lines(profile) -> list[str]:
    h = profile.header
    cost = expected_cost(profile)
    grids = ", ".join("x".join(map(str, g)) for g in profile.calibration_grids() if g) or "none recorded"
    lines = [
        f"model      {h.get('model_id') or '?'} ({h.get('model_class')}), {profile.layers} layers x {profile.heads} heads, head dim {h.get('head_dim')}",
        f"budget     {h.get('budget')}, metric: {h.get('metric')}",
        f"grids      calibrated at {grids} (frames x height x width after patchify); other grids use the transfer rule",
        f"dense      timesteps t > {profile.dense_above:.3f} (warm-up), first {h.get('dense_layers', 0)} layers",
        f"overall    density {profile.density():.3f}"
        + (f", expected attention speed-up {cost['sparse_steps']:.2f}x on sparse steps ({cost['with_dense_warmup']:.2f}x with the "
           f"dense warm-up), patterns {profile.pattern_counts()}" if cost else f", patterns {profile.pattern_counts()}"),
    ]
    if cost:
        lines.append(f"cost       {'measured' if cost.get('measured') else 'NOT measured'}: {cost.get('source')}")
    for other in profile.more_grids:  # the further calibration grids, each with its own plan (not printed per layer)
        other_cost = expected_cost(other)
        lines.append(f"grid       {'x'.join(map(str, other.grid))}: density {other.density():.3f}"
                     + (f", expected attention speed-up {other_cost['sparse_steps']:.2f}x on sparse steps" if other_cost else "")
                     + f", patterns {other.pattern_counts()}")
    per_bucket = (cost or {}).get("per_bucket") or []
    for b, (lo, hi) in enumerate(profile.buckets):
        density = sum(c.density for layer in profile.plan[b] for c in layer) / max(1, profile.layers * profile.heads)
        speed = f", expected speed-up {per_bucket[b]:.2f}x" if b < len(per_bucket) else ""
        lines.append(f"bucket {b}   t in [{lo:.3f}, {hi:.3f}], density {density:.3f}{speed}")
        lines.append("  layer  density  error   patterns")
        for layer, heads in enumerate(profile.plan[b]):
            dens = sum(c.density for c in heads) / len(heads)
            err = sum(c.error for c in heads) / len(heads)
            names = " ".join(short_label(c.spec) for c in heads)
            lines.append(f"  {layer:5d}  {dens:7.3f}  {err:6.4f}  {names}")
    return lines


def rank_balance_line(profile, ranks: int) -> str:
    """One line: the imbalance of the plan's attention cost over ``ranks`` Ulysses ranks (`context_parallel.rank_imbalance`)."""
    from sparse_dit.context_parallel import rank_imbalance

    r = rank_imbalance(profile, ranks)
    b, layer, worst = r["worst"]
    balanced = (profile.header.get("balance") or {}).get("ranks")
    note = f"; the profiler balanced it for {balanced} ranks" if balanced else "; `build_profile(..., balance_ranks=N)` evens it out"
    return (f"ranks      over {ranks} Ulysses ranks the slowest rank's attention takes {r['step_slowdown']:.3f}x a balanced "
            f"split (mean per layer {r['mean']:.3f}x, worst: bucket {b} layer {layer} {worst:.3f}x){note}")


def short_label(spec) -> str:
    """Compact name of a PatternSpec for tables: tile3x3x5 (window in tiles, t x h x w), radial0.5 (decay),
    kmeans0.9 (top_p), prune0.3 (keep_ratio), local1x2x2 (radius in tokens), dense. The README explains them."""
    p = spec.params
    if spec.name == "tile":
        return "tile" + ("x".join(map(str, p["window"])) if p.get("window") else "") + ("p" if p.get("packed") else "")
    if spec.name == "local":
        return "local" + "x".join(map(str, p["radius"]))
    if spec.name == "radial":
        return f"radial{p['decay']:g}"
    if spec.name == "kmeans":
        return f"kmeans{p['top_p']:g}"
    if spec.name == "prune":
        return f"prune{p['keep_ratio']:g}"
    return spec.name


def plot_map(profile, path: str) -> None:
    """One panel per bucket: a layers x heads grid coloured by pattern family, each cell labelled with its density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    families = ["dense", "tile", "radial", "kmeans", "prune", "mask"]
    colours = ["#4d4d4d", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd"]
    nb = len(profile.buckets)
    fig, axes = plt.subplots(1, nb, figsize=(1.2 + 0.55 * profile.heads * nb + 1.5, 1.0 + 0.35 * profile.layers), squeeze=False)
    for b, ax in enumerate(axes[0]):
        grid = [[families.index(c.spec.name) for c in layer] for layer in profile.plan[b]]
        ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(families) - 1, aspect="auto")
        for layer, heads in enumerate(profile.plan[b]):
            for h, c in enumerate(heads):
                ax.text(h, layer, f"{c.density:.2f}", ha="center", va="center", fontsize=7, color="white")
        lo, hi = profile.buckets[b]
        ax.set_title(f"t in [{lo:.2f}, {hi:.2f}]", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer" if b == 0 else "")
        ax.set_xticks(range(profile.heads))
        ax.set_yticks(range(profile.layers))
    used = sorted({c.spec.name for bucket in profile.plan for layer in bucket for c in layer}, key=families.index)
    fig.legend(handles=[Patch(color=colours[families.index(n)], label=n) for n in used], loc="center right", fontsize=8)
    fig.suptitle(f"{profile.header.get('model_id') or 'profile'}: pattern per layer/head (cell: density)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plot(profile, path: "str | Path") -> bool:
    """`plot_map` into ``path`` through a temporary file in the same folder (a failed write keeps a previous
    file whole). Returns True when it replaced an existing file."""
    from sparse_dit.io import atomic_path

    existed = Path(path).exists()
    with atomic_path(path) as tmp:
        plot_map(profile, str(tmp))
    return existed


def run(args: argparse.Namespace) -> int:
    from sparse_dit.io import check_output_path

    from ._common import UsageError, load_profile_arg, require

    if args.plot:
        require(args.plot.lower().endswith(".png"), f"--plot must name a .png file; got {args.plot!r}")
        check_output_path(args.plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError('--plot needs matplotlib: pip install "sparse-dit[plot]"') from None
    if args.ranks is not None:
        require(args.ranks >= 1, f"--ranks must be >= 1; got {args.ranks}")
    profile = load_profile_arg(args.profile)
    print("\n".join(summary_lines(profile)))
    if args.ranks is not None:
        print(rank_balance_line(profile, args.ranks))
    if args.plot:
        existed = write_plot(profile, args.plot)
        print(f"wrote {args.plot}" + (" (replaced the previous file)" if existed else ""))
    return 0
