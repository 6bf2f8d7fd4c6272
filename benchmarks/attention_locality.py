"""How concentrated the reference model's attention heads are at the Wan-480p token grid (GPU or CPU).

    python benchmarks/attention_locality.py --out $OUT/attention_locality.json

For held-out clips noised to several timesteps, every (layer, head) attends from sampled query tokens over
all 21 x 30 x 52 = 32,760 tokens; the share of each query's attention mass that falls inside a 3-D window
centred on it is averaged over queries, clips and (per timestep) reported per head:

- ``small``: a 3 x 7 x 7 token window (frames x rows x columns; 0.45% of the tokens),
- ``sta``: an 11 x 17 x 27 window (15.4% of the tokens), comparable with Sliding Tile Attention's reading of
  HunyuanVideo (a local window holding 15.52% of the tokens captures about 70% of the attention mass),
- ``same_frame``: the query's own frame (1/21 of the tokens), ``far_frames``: frames 4 or more away.

Windows are clipped at the grid's edges; ``window_share`` reports the mean share of tokens they then cover.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import ensure_sparse_dit  # noqa: E402

ensure_sparse_dit()

from sparse_dit.reference import load_reference_model, sample_scene, video_to_model  # noqa: E402
from sparse_dit.reference.attention import attention_rows, capture_qk  # noqa: E402
from sparse_dit.reference.videos import render  # noqa: E402

WINDOWS = {"small": (1, 3, 3), "sta": (5, 8, 13)}  # half-extents (frames, rows, columns)


def window_masses(probs: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """probs: (H, R, S) attention of query ``rows`` (R,) over a grid of S tokens -> per head (H,) masses."""
    Fg, Hg, Wg = grid
    idx = torch.arange(Fg * Hg * Wg, device=probs.device)
    f, h, w = idx // (Hg * Wg), (idx // Wg) % Hg, idx % Wg
    rows = rows.to(probs.device)
    df = (f[None] - f[rows][:, None]).abs()
    dh = (h[None] - h[rows][:, None]).abs()
    dw = (w[None] - w[rows][:, None]).abs()
    out = {}
    for name, (a, b, c) in WINDOWS.items():
        inside = (df <= a) & (dh <= b) & (dw <= c)  # (R, S)
        out[name] = (probs * inside).sum(-1).mean(-1)
        out[f"{name}_window_share"] = inside.float().mean()
    out["same_frame"] = (probs * (df == 0)).sum(-1).mean(-1)
    out["far_frames"] = (probs * (df >= 4)).sum(-1).mean(-1)
    return out


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--width", type=int, default=208)
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--timesteps", default="900,500,200")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev = torch.device(args.device)
    ref = load_reference_model(dev, torch.float16 if dev.type == "cuda" else torch.float32)
    pt = ref.transformer.config.patch_size
    grid = (args.frames // pt[0], args.height // pt[1], args.width // pt[2])
    S = grid[0] * grid[1] * grid[2]
    L = len(ref.transformer.blocks)
    H = ref.transformer.config.num_attention_heads
    keys = ("small", "sta", "same_frame", "far_frames")
    result = {"grid": grid, "tokens": S, "windows": {k: [2 * e + 1 for e in v] for k, v in WINDOWS.items()}, "per_t": {}}
    g = torch.Generator().manual_seed(0)
    for t in [float(x) for x in args.timesteps.split(",")]:
        acc = {k: torch.zeros(L, H) for k in keys}
        shares = {}
        for c in range(args.clips):
            scene = sample_scene(c)
            x0 = video_to_model(render(scene, args.frames, args.height, args.width)[None])
            noise = torch.randn(x0.shape, generator=g)
            x = ((1 - t / 1000) * x0 + t / 1000 * noise).to(dev, ref.dtype)
            ctx = ref.text_encoder.encode([scene.prompt], dev).to(ref.dtype)
            qk = capture_qk(ref.transformer, (x, torch.tensor([t], device=dev), ctx))
            rows = torch.randperm(S, generator=g)[: args.queries]
            for layer, (q, k) in qk.items():
                m = window_masses(attention_rows(q, k, rows)[0], rows, grid)
                for key in keys:
                    acc[key][layer] += m[key].float().cpu() / args.clips
                shares = {f"{n}_window_share": float(m[f"{n}_window_share"]) for n in WINDOWS}
        result["per_t"][str(int(t))] = {**{k: v.tolist() for k, v in acc.items()}, **shares}
        line = ", ".join(f"{k} {float(v.mean()):.3f} (heads {float(v.min()):.2f}-{float(v.max()):.2f})" for k, v in acc.items())
        print(f"t={t:.0f}: mean mass {line}", flush=True)
    result["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    result["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["command"] = "python " + " ".join(sys.argv)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
