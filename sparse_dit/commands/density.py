"""Print the attention density a static pattern has on a video grid (no model, no GPU needed).

Example (Wan 2.1 480p, 81 frames: latent grid 21x30x52 after patchify):

    sparse-dit density --pattern tile --window 3 3 3 --frames 21 --height 30 --width 52
    sparse-dit density --pattern radial --decay 1 --param variant=band --frames 21 --height 30 --width 52

Density is the fraction of the S x S (query, key) pairs computed; the per-distance table gives the
mean density between a query frame and a key frame |i - j| frames apart.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout
from sparse_dit.patterns import PatternSpec

from ._common import UsageError, check_block_size, check_non_negative, check_positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", required=True, help="a static pattern: tile, radial, dense, ...")
    parser.add_argument("--window", type=int, nargs="+", metavar="N", help="tile window in tiles: one int or three (t h w)")
    parser.add_argument("--tile", type=int, nargs=3, metavar=("T", "H", "W"), help="tile shape in tokens")
    parser.add_argument("--decay", type=float, help="radial decay (share of a frame kept at distance 1 is decay/2)")
    parser.add_argument("--variant", help="radial variant: tile2d or band")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any other pattern parameter")
    parser.add_argument("--frames", type=int, required=True, help="latent frames after patchify")
    parser.add_argument("--height", type=int, required=True, help="latent rows after patchify")
    parser.add_argument("--width", type=int, required=True, help="latent columns after patchify")
    parser.add_argument("--text-len", type=int, default=0, help="text tokens in the self-attention sequence")
    parser.add_argument("--text-position", choices=("first", "last"), default=None, help="where text tokens sit")
    parser.add_argument("--block-size", type=int, default=128, help="query block in tokens, at least 16 (default 128)")
    parser.add_argument("--distances", type=int, default=8, help="rows of the per-frame-distance table (0: none)")


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def pattern_params(args: argparse.Namespace) -> dict:
    """Pattern parameters from the named options and ``--param key=value`` pairs."""
    params: dict[str, Any] = {}
    if args.window is not None:
        if len(args.window) not in (1, 3):
            raise ValueError("--window takes one int or three (t h w)")
        params["window"] = args.window[0] if len(args.window) == 1 else tuple(args.window)
    if args.tile is not None:
        params["tile"] = tuple(args.tile)
    if args.decay is not None:
        params["decay"] = args.decay
    if args.variant is not None:
        params["variant"] = args.variant
    for item in args.param:
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip().replace("-", "_")] = _value(value.strip())
    return params


def frame_pair_density(layout: Layout, geometry: Geometry, chunk: int = 64) -> torch.Tensor:
    """(F, F) fraction of (query in frame i, key in frame j) pairs computed, head 0 of batch 0."""
    F, P = geometry.frames, geometry.height * geometry.width
    v0, V = geometry.video_start, geometry.video_len
    frame_of = torch.full((geometry.seq_len,), F, dtype=torch.long)  # text -> overflow column F
    frame_of[v0 : v0 + V] = torch.arange(V) // P
    pairs = torch.zeros(F + 1, F + 1, dtype=torch.float64)
    for first in range(0, layout.num_q_blocks, chunk):
        blocks = torch.arange(first, min(first + chunk, layout.num_q_blocks))
        keys = layout.key_mask(0, 0, blocks)  # (nb, S)
        rows = layout.query_rows(0, 0, blocks)  # (nb, block)
        keys_f = torch.zeros(len(blocks), F + 1, dtype=torch.float64).index_add_(1, frame_of, keys.double())
        valid = rows >= 0
        rows_f = torch.zeros(len(blocks), F + 1, dtype=torch.float64)
        rows_f.scatter_add_(1, torch.where(valid, frame_of[rows.clamp(min=0)], F), valid.double())
        pairs += rows_f.T @ keys_f
    return pairs[:F, :F] / (P * P)


def run(args: argparse.Namespace) -> int:
    check_positive(args, "--frames", "--height", "--width")
    check_non_negative(args, "--text-len", "--distances")
    check_block_size(args.block_size)
    text_position = args.text_position or ("first" if args.text_len else "none")
    if args.text_len == 0:
        text_position = "none"
    try:
        geometry = Geometry(1, 1, 64, args.frames, args.height, args.width, text_len=args.text_len, text_position=text_position)
        spec = PatternSpec(args.pattern, **pattern_params(args))
        if not spec.static:
            raise ValueError(f"pattern {args.pattern!r} is dynamic (its layout depends on q and k); give a static one")
        layout = spec.module.build(geometry, 1, args.block_size, "cpu", **spec.params)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    d = layout.density
    S = geometry.seq_len
    print(f"pattern   {spec!r}")
    print(f"grid      {args.frames}x{args.height}x{args.width} (+{args.text_len} text, {text_position}) S={S} block={args.block_size}")
    print(f"blocks    {layout.num_q_blocks} query blocks (query order {layout.q_order_len} slots, {layout.q_order_len - S} padded), "
          f"max {layout.kv_start.shape[-1]} segments per block")
    print(f"density   {d:.4f}  ({d * S * S / 1e6:.1f}M of {S * S / 1e6:.1f}M pairs; ideal speed-up x{1 / d:.2f})")
    if args.distances > 0:
        pair = frame_pair_density(layout, geometry)
        F = args.frames
        idx = torch.arange(F)
        dist = (idx[:, None] - idx[None, :]).abs()
        print("frame distance |i-j| -> mean density of the frame pair")
        shown = sorted({d for d in [0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64] if d < F})[: args.distances]
        for dd in shown:
            print(f"  {dd:3d}  {float(pair[dist == dd].mean()):.4f}")
    return 0
