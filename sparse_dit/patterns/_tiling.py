"""Shared helpers of the pattern modules: video token indices, tile orders, segment merging.

Nothing here keeps state; every function is a pure function of its arguments.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

Triple = tuple[int, int, int]


def as_triple(value: int | Sequence[int], what: str) -> Triple:
    """``3`` -> ``(3, 3, 3)``; a sequence of three positive ints is kept. Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int or three positive ints (t, h, w); got {value!r}")
    if isinstance(value, int):
        value = (value, value, value)
    try:
        out = tuple(int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive int or three positive ints (t, h, w); got {value!r}") from None
    if len(out) != 3 or any(v < 1 for v in out) or any(float(v) != float(o) for v, o in zip(out, value)):  # type: ignore[arg-type]
        raise ValueError(f"{what} must be a positive int or three positive ints (t, h, w); got {value!r}")
    return out  # type: ignore[return-value]


def video_index(geometry: Geometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """(F, H, W) int64: attention-sequence position of every video token (raster order plus text offset)."""
    F, H, W = geometry.grid
    return torch.arange(F * H * W, device=device).view(F, H, W) + geometry.video_start


def text_ranges(geometry: Geometry) -> dict:
    """``text_kv``/``dense_q`` keyword arguments for `Layout`: text keys always attended, text queries dense."""
    r = geometry.text_range
    return {"text_kv": r, "dense_q": r}


def default_tile(block_q: int, grid: Triple) -> Triple:
    """Tile shape (t, h, w) for a query block of ``block_q`` tokens on ``grid`` (F, H, W).

    Doubles h and w alternately (w first) up to 8 and then t, which gives STA's 2x8x8 for 128 tokens
    (1x4x4 for 16, 1x4x8 for 32, 1x8x8 for 64, 2x8x16 for 256); a dimension stops growing once it
    covers the grid, so images (F = 1) get flat tiles such as 1x8x16. If ``block_q`` is not a power of
    two, the remaining factor goes to w. When the whole grid is smaller than a block the tile is the grid.
    """
    tile = [1, 1, 1]  # t, h, w
    rest = int(block_q)
    weight = (4, 1, 1)  # t grows only after h and w reach 4x its size (2x8x8)
    while rest % 2 == 0 and rest > 1:
        cand = [d for d in (2, 1, 0) if tile[d] < grid[d]]
        if not cand:
            break
        d = min(cand, key=lambda i: tile[i] * weight[i])  # ties: w, then h, then t
        tile[d] *= 2
        rest //= 2
    if rest > 1 and tile[2] < grid[2]:
        tile[2] *= rest
    return (tile[0], tile[1], tile[2])


class TileOrder:
    """Video tokens reordered tile by tile (tiles in raster order, tokens inside a tile in raster order).

    Attributes (all on ``device``):
      tile: (t, h, w); counts: tiles per dimension (nt_f, nt_h, nt_w); slot: query-order slots per tile
      (the tile's token count rounded up to a multiple of ``block_q``, so a query block never spans two tiles);
      q_perm: (T * slot,) original index per query slot, -1 where a tile is cut by the grid border;
      kv_perm: (V,) the same order without the padding slots; kv_offset: (T + 1,) start of each tile in kv_perm;
      tile_of_token: (V,) tile index of each video token in raster order.
    """

    def __init__(self, geometry: Geometry, tile: Triple, block_q: int, device: torch.device | str = "cpu") -> None:
        F, H, W = geometry.grid
        t, h, w = tile
        self.tile = tile
        self.counts: Triple = (-(-F // t), -(-H // h), -(-W // w))
        nf, nh, nw = self.counts
        self.num_tiles = nf * nh * nw
        tokens = t * h * w
        self.slot = -(-tokens // block_q) * block_q
        idx = video_index(geometry, device)
        # pad the grid to whole tiles with -1, then move the tile axes in front
        padded = torch.full((nf * t, nh * h, nw * w), -1, dtype=torch.int64, device=device)
        padded[:F, :H, :W] = idx
        tiles = padded.view(nf, t, nh, h, nw, w).permute(0, 2, 4, 1, 3, 5).reshape(self.num_tiles, tokens)
        # valid tokens first inside each tile (stable: raster order kept), padding at the end of the slot
        valid = tiles >= 0
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        tiles = tiles.gather(1, order)
        q = torch.full((self.num_tiles, self.slot), -1, dtype=torch.int64, device=device)
        q[:, :tokens] = tiles
        self.q_perm = q.reshape(-1)
        self.kv_perm = tiles[tiles >= 0]
        sizes = valid.sum(1)
        self.kv_offset = torch.nn.functional.pad(sizes.cumsum(0), (1, 0))
        tf = torch.arange(F, device=device) // t
        th = torch.arange(H, device=device) // h
        tw = torch.arange(W, device=device) // w
        self.tile_of_token = ((tf[:, None, None] * nh + th[None, :, None]) * nw + tw[None, None, :]).reshape(-1)

    def coords(self) -> torch.Tensor:
        """(T, 3) tile coordinates (f, h, w) in tile order."""
        nf, nh, nw = self.counts
        device = self.q_perm.device
        f, h, w = torch.meshgrid(
            torch.arange(nf, device=device), torch.arange(nh, device=device), torch.arange(nw, device=device), indexing="ij"
        )
        return torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], 1)


def window_start(center: torch.Tensor, size: int | torch.Tensor, count: int) -> torch.Tensor:
    """First index of a window of ``size`` around ``center``, shifted to stay inside ``[0, count)``."""
    size_t = torch.as_tensor(size, device=center.device)
    return (center - (size_t - 1) // 2).clamp(min=0).minimum(count - size_t)


def merge_segments(start: torch.Tensor, end: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort and merge overlapping or touching ``[start, end)`` intervals along the last dimension.

    start, end, valid: (..., N). Returns count (...,), start (..., G), end (..., G) with G the largest
    count (at least 1); unused entries are 0.
    """
    valid = valid & (end > start)
    big = torch.iinfo(torch.int64).max
    s, order = torch.where(valid, start.long(), big).sort(-1)
    e = end.long().gather(-1, order)
    v = s != big
    e = torch.where(v, e, -1)
    run_end = e.cummax(-1).values
    prev_end = torch.nn.functional.pad(run_end[..., :-1], (1, 0), value=-1)
    new = v & (s > prev_end)
    count = new.sum(-1)
    G = max(1, int(count.max())) if count.numel() else 1
    seg = (new.long().cumsum(-1) - 1).clamp(min=0)
    seg = torch.where(v, seg, G)  # invalid entries go to a dump column
    shape = list(start.shape[:-1]) + [G + 1]
    out_s = torch.zeros(shape, dtype=torch.int64, device=start.device)
    out_e = torch.zeros(shape, dtype=torch.int64, device=start.device)
    out_s.scatter_(-1, torch.where(new, seg, G), torch.where(new, s, 0))
    out_e.scatter_reduce_(-1, seg, torch.where(v, e, 0), reduce="amax", include_self=True)
    return count, out_s[..., :G], out_e[..., :G]


def expand_heads(t: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """(X...) -> (1, heads, X...) view."""
    if t is None:
        return None
    return t.unsqueeze(0).unsqueeze(0).expand(1, heads, *t.shape)


def layout_from_segments(
    geometry: Geometry,
    block_q: int,
    heads: int,
    count: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    q_perm: torch.Tensor | None,
    kv_perm: torch.Tensor | None,
) -> Layout:
    """A `Layout` shared by ``heads`` heads from per-query-block segments (NQ,), (NQ, G) and 1-D permutations."""
    return Layout(
        geometry.seq_len,
        block_q,
        expand_heads(count, heads),
        expand_heads(start, heads),
        expand_heads(end, heads),
        expand_heads(q_perm, heads),
        expand_heads(kv_perm, heads),
        **text_ranges(geometry),
    )
