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

Packed (``packed=True``): at grids that are not a multiple of the tile, the padding slots of cut tiles are
dead query rows the kernel still computes (21 x 30 x 52, Wan 480p, with 2 x 8 x 8 tiles: 39,424 query slots for
32,760 tokens), and the key segments start and end inside key blocks, which FlashAttention-4's block-sparse forward
cannot express (`sparse_dit.kernels.fa4`). Packed, the queries take the key order itself (no padding slots; only the
last block is partial), a query block attends the windows of every tile it overlaps, and each key segment is widened
to whole blocks of ``block_q`` keys. That is a superset of the window (never less accurate, a little denser), made
of whole blocks, so FA4 can run it.

Parameters: ``window`` (int or (wt, wh, ww) in tiles; default (3, 3, 3) cut to the tile grid); ``tile``
((t, h, w) in tokens, default from ``block_q``); ``packed`` (bool, default False; above). An explicit window larger
than the tile grid is an error at build time.
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
    packed: bool = False,
) -> dict:
    """Normalise ``window`` and ``tile`` to int triples (None: defaults); raise ValueError for bad values."""
    if not isinstance(packed, bool):
        raise ValueError(f"tile pattern: packed must be True or False; got {packed!r}")
    out = {
        "window": None if window is None else as_triple(window, "tile pattern: window"),
        "tile": None if tile is None else as_triple(tile, "tile pattern: tile"),
    }
    if packed:  # only when set, so the keys of existing tile specs (and profiles) are unchanged
        out["packed"] = True
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


def packed_segments(
    order: TileOrder, block_q: int, count: torch.Tensor, start: torch.Tensor, end: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query block of the key order (blocks of ``block_q`` tokens, the last partial): the union of the key
    segments (count (T,), start/end (T, G) per tile) of every tile the block overlaps, each widened to whole blocks of
    ``block_q`` keys. Returns count (NQ,), start/end (NQ, G')."""
    offsets = order.kv_offset  # (T + 1,) strictly increasing: every tile holds at least one token
    V = int(offsets[-1])
    NQ = -(-V // block_q)
    device = offsets.device
    lo = torch.arange(NQ, device=device) * block_q
    hi = (lo + block_q).clamp(max=V)
    first = torch.searchsorted(offsets, lo, right=True) - 1
    last = torch.searchsorted(offsets, hi - 1, right=True) - 1
    span = int((last - first).max()) + 1  # tiles per block at most (cut tiles at the border can be small)
    tiles = first[:, None] + torch.arange(span, device=device)
    overlaps = tiles <= last[:, None]
    tiles = tiles.clamp(max=offsets.numel() - 2)
    G = start.shape[1]
    used = overlaps[..., None] & (torch.arange(G, device=device) < count[tiles][..., None])
    s = torch.div(start[tiles], block_q, rounding_mode="floor") * block_q
    e = (-torch.div(-end[tiles], block_q, rounding_mode="floor") * block_q).clamp(max=V)
    return merge_segments(s.reshape(NQ, -1), e.reshape(NQ, -1), used.reshape(NQ, -1))


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    window: int | Sequence[int] | None = None,
    tile: int | Sequence[int] | None = None,
    packed: bool = False,
) -> Layout:
    """Layout (L=1, H=num_heads): query blocks in tile order, each attending its tile's window (``packed``: the
    windows of the tiles it overlaps, in whole key blocks)."""
    tile = default_tile(block_q, geometry.grid) if tile is None else as_triple(tile, "tile pattern: tile")
    if window is None:
        counts = tuple(-(-g // t) for g, t in zip(geometry.grid, tile))
        window = tuple(min(3, n) for n in counts)
    window = as_triple(window, "tile pattern: window")
    _check_fits(geometry, window, tile)
    order = TileOrder(geometry, tile, block_q, device)
    count, start, end = tile_segments(order, window)
    if packed:
        count, start, end = packed_segments(order, block_q, count, start, end)
        q_perm = torch.full((count.shape[0] * block_q,), -1, dtype=torch.int64, device=order.kv_perm.device)
        q_perm[: order.kv_perm.numel()] = order.kv_perm
        return layout_from_segments(geometry, block_q, num_heads, count, start, end, q_perm, order.kv_perm)
    per_tile = order.slot // block_q  # query blocks per tile
    if per_tile > 1:
        count, start, end = (x.repeat_interleave(per_tile, 0) for x in (count, start, end))
    return layout_from_segments(geometry, block_q, num_heads, count, start, end, order.q_perm, order.kv_perm)
