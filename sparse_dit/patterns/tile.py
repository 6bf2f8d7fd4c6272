"""Sliding tile attention (after STA, Zhang et al. 2025) on any video grid and any window.

Video tokens are reordered so that each tile of ``tile = (t, h, w)`` tokens is contiguous (tiles in
raster order, tokens in raster order inside a tile). The default tile has ``block_q`` tokens (2x8x8 for
blocks of 128, see `_tiling.default_tile`), so every query block is exactly one tile. A query tile
attends the ``window = (wt, wh, ww)`` tiles around it; at the borders the window is shifted (not cut)
so that it stays inside the video and every query tile attends the same number of tiles.

Grids that are not a multiple of the tile are handled by the permutation: a tile cut by the border
keeps its query slots and fills the missing ones with -1, so any (F, H, W) works and no resolution
list exists. The key order is the same tile order without those padding slots, so key segments
never contain dead keys. Text tokens (if any) are attended by every query (``text_kv``) and attend
every key (``dense_q``).

Parameters: ``window`` (int or (wt, wh, ww) in tiles; default (3, 3, 3) cut to the tile grid); ``tile``
((t, h, w) in tokens, default from ``block_q``). An explicit window larger than the tile grid is an
error at build time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

from ._tiling import TileOrder, as_triple, default_tile, layout_from_segments, merge_segments, window_start

NAME = "tile"
STATIC = True


def check_params(
    geometry: Geometry | None,
    window: int | Sequence[int] | None = None,
    tile: int | Sequence[int] | None = None,
) -> dict:
    """Normalise ``window`` and ``tile`` to int triples (None: defaults); raise ValueError for bad values."""
    out = {
        "window": None if window is None else as_triple(window, "tile pattern: window"),
        "tile": None if tile is None else as_triple(tile, "tile pattern: tile"),
    }
    if geometry is not None and out["tile"] is not None and out["window"] is not None:  # default tile needs block_q
        _check_fits(geometry, out["window"], out["tile"])
    return out


def _check_fits(geometry: Geometry, window: tuple[int, int, int], tile: tuple[int, int, int]) -> tuple[int, int, int]:
    F, H, W = geometry.grid
    counts = (-(-F // tile[0]), -(-H // tile[1]), -(-W // tile[2]))
    if any(w > n for w, n in zip(window, counts)):
        raise ValueError(
            f"tile pattern: window {window} (in tiles) is larger than the tile grid {counts} of video grid "
            f"{geometry.grid} with tile {tile}; use a window of at most {counts}"
        )
    return counts


def tile_segments(order: TileOrder, window: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query tile, the key segments of its window: count (T,), start/end (T, G) in key order."""
    nf, nh, nw = order.counts
    wt, wh, ww = window
    c = order.coords()  # (T, 3)
    sf = window_start(c[:, 0], wt, nf)
    sh = window_start(c[:, 1], wh, nh)
    sw = window_start(c[:, 2], ww, nw)
    device = c.device
    df = torch.arange(wt, device=device)
    dh = torch.arange(wh, device=device)
    # one run of ww consecutive tiles per (frame-tile, row-tile) of the window
    first = ((sf[:, None, None] + df[None, :, None]) * nh + (sh[:, None, None] + dh[None, None, :])) * nw + sw[:, None, None]
    first = first.reshape(len(c), -1)
    start = order.kv_offset[first]
    end = order.kv_offset[first + ww]
    return merge_segments(start, end, torch.ones_like(start, dtype=torch.bool))


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    window: int | Sequence[int] | None = None,
    tile: int | Sequence[int] | None = None,
) -> Layout:
    """Layout (L=1, H=num_heads): query blocks in tile order, each attending its tile's window."""
    tile = default_tile(block_q, geometry.grid) if tile is None else as_triple(tile, "tile pattern: tile")
    if window is None:
        counts = tuple(-(-g // t) for g, t in zip(geometry.grid, tile))
        window = tuple(min(3, n) for n in counts)
    window = as_triple(window, "tile pattern: window")
    _check_fits(geometry, window, tile)
    order = TileOrder(geometry, tile, block_q, device)
    count, start, end = tile_segments(order, window)
    per_tile = order.slot // block_q  # query blocks per tile
    if per_tile > 1:
        count, start, end = (x.repeat_interleave(per_tile, 0) for x in (count, start, end))
    return layout_from_segments(geometry, block_q, num_heads, count, start, end, order.q_perm, order.kv_perm)
