"""Radial attention (after Li et al. 2025): attention density that halves as the frame distance doubles.

Frame distance ``d = |i - j|`` between a query frame ``i`` and a key frame ``j`` falls in band
``g = d.bit_length()`` (0 for d = 0, 1 for d = 1, 2 for d = 2..3, 3 for d = 4..7, ...). Within one band the
share of the key frame that a query attends is ``a = decay / 2**g``, so the total work is O(n log n).
Keys in the first ``sinks`` frames are attended by every query (attention sinks), and a query always
attends its whole own frame (d = 0). When the share would fall below a minimum window, the window
stays at the minimum and only every ``split``-th frame of the band is kept (``d % split == 0``,
``split = floor(minimum / share)``), as the paper does below one block.

Two variants, parameter ``variant``:

- ``"band"`` — the paper's mask over raster order (no token permutation): query token (i, s) attends
  key (j, s') when ``|s - s'| <= max(floor(P * a), min_window)`` with P = H * W tokens per frame and s
  the raster index inside a frame; a 1-D band around the diagonal of each frame pair. ``min_window``
  defaults to ``block_q`` tokens (the paper's threshold).
- ``"tile2d"`` (default) — the same decay as a 2-D neighbourhood in tile order (tiles as in the ``tile``
  pattern, distances in tile-frames): key tile (j, y', x') is attended by query tile (i, y, x) when it
  lies in a window of ``ceil(nt_h * sqrt(a)) x ceil(nt_w * sqrt(a))`` tiles around (y, x) (shifted to stay
  inside the grid, like STA), so the attended *area* halves as d doubles; below one tile, frames are
  subsampled as above. A sink tile-frame is one that contains a frame ``< sinks``.
  This is the default for now: a spatial band in raster order (``"band"``) attends whole rows far
  to the left and right but nothing just above or below once the band is narrower than a row,
  while the 2-D window keeps true spatial neighbours. Which approximates dense attention better is
  to be measured on a trained model.

Query blocks (``block_q`` consecutive positions of the query order) attend the union of the keys their
rows need under the rule above; in ``tile2d`` with the default tile a block is exactly one tile.
Any sequence length works (edge blocks and tiles are padded with -1 query slots). Text tokens are
attended by every query and attend every key. Parameters: ``decay`` (> 0, default 1.0; larger keeps
more), ``sinks`` (frames, >= 0, default 1), ``variant``, ``min_window`` (band only, tokens), ``tile``
(tile2d only).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

from ._tiling import TileOrder, as_triple, default_tile, layout_from_segments, merge_segments, window_start

NAME = "radial"
STATIC = True
VARIANTS = ("tile2d", "band")


def check_params(
    geometry: Geometry | None,
    decay: float = 1.0,
    sinks: int = 1,
    variant: str = "tile2d",
    min_window: int | None = None,
    tile: int | Sequence[int] | None = None,
) -> dict:
    """Normalise parameters; raise ValueError for a non-positive decay, negative sinks or unknown variant."""
    if variant not in VARIANTS:
        raise ValueError(f"radial pattern: variant must be one of {VARIANTS}; got {variant!r}")
    try:
        decay = float(decay)
    except (TypeError, ValueError):
        raise ValueError(f"radial pattern: decay must be a positive number; got {decay!r}") from None
    if not decay > 0 or not math.isfinite(decay):
        raise ValueError(f"radial pattern: decay must be a positive finite number; got {decay!r}")
    if isinstance(sinks, bool) or int(sinks) != sinks or sinks < 0:
        raise ValueError(f"radial pattern: sinks (number of sink frames) must be an int >= 0; got {sinks!r}")
    if min_window is not None and (int(min_window) != min_window or min_window < 1):
        raise ValueError(f"radial pattern: min_window must be a positive number of tokens; got {min_window!r}")
    if variant == "tile2d" and min_window is not None:
        raise ValueError("radial pattern: min_window applies to variant='band' only (tile2d's minimum is one tile)")
    if variant == "band" and tile is not None:
        raise ValueError("radial pattern: tile applies to variant='tile2d' only")
    return {
        "decay": decay,
        "sinks": int(sinks),
        "variant": variant,
        "min_window": None if min_window is None else int(min_window),
        "tile": None if tile is None else as_triple(tile, "radial pattern: tile"),
    }


def band_share(d: torch.Tensor, decay: float) -> torch.Tensor:
    """Share ``decay / 2**bit_length(d)`` of a key frame attended at frame distance d (float64; d=0 -> decay)."""
    g = torch.where(d > 0, torch.floor(torch.log2(d.clamp(min=1).double())) + 1, torch.zeros_like(d, dtype=torch.float64))
    return decay / torch.pow(2.0, g)


def frame_rule(d: torch.Tensor, share: torch.Tensor, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For frame distances d with shares ``share * extent`` (already in window units) and a minimum window:
    (kept (bool), window (float64, in the same units)). d = 0 is always kept."""
    below = share < minimum
    split = torch.where(below, torch.floor(minimum / share.clamp(min=1e-300)), torch.ones_like(share)).clamp(min=1)
    kept = (d == 0) | (torch.remainder(d.double(), split) == 0)
    return kept, torch.where(below, torch.full_like(share, minimum), share)


def _band(geometry: Geometry, block_q: int, decay: float, sinks: int, min_window: int, device) -> tuple:
    F, H, W = geometry.grid
    P, V = H * W, geometry.video_len
    nq = -(-V // block_q)
    span = -(-(block_q - 1) // P) + 1  # query frames a block can touch
    b = torch.arange(nq, device=device)
    lo_tok, hi_tok = b * block_q, (b * block_q + block_q).clamp(max=V) - 1  # inclusive raster range
    i = (lo_tok // P)[:, None] + torch.arange(span, device=device)  # (nq, span) query frames
    present = i <= (hi_tok // P)[:, None]
    s_lo = torch.where(i == (lo_tok // P)[:, None], (lo_tok % P)[:, None], 0)
    s_hi = torch.where(i == (hi_tok // P)[:, None], (hi_tok % P)[:, None], P - 1)
    j = torch.arange(F, device=device)
    d = (i[:, :, None] - j).abs()  # (nq, span, F)
    kept, width = frame_rule(d, P * band_share(d, decay), float(min_window))
    half = torch.floor(width).long()
    full = (d == 0) | (j < sinks)
    a = torch.where(full, 0, (s_lo[:, :, None] - half).clamp(min=0))
    e = torch.where(full, P, (s_hi[:, :, None] + half + 1).clamp(max=P))
    valid = present[:, :, None] & (kept | full)
    off = geometry.video_start + j * P
    start, end = (a + off).reshape(nq, -1), (e + off).reshape(nq, -1)
    count, start, end = merge_segments(start, end, valid.reshape(nq, -1))
    q_perm = None
    if geometry.video_start > 0:  # text first: give the query order the video tokens only, block aligned
        q_perm = torch.full((nq * block_q,), -1, dtype=torch.int64, device=device)
        q_perm[:V] = torch.arange(V, device=device) + geometry.video_start
    return count, start, end, q_perm, None


def _tile2d(geometry: Geometry, block_q: int, decay: float, sinks: int, tile, device) -> tuple:
    tile = default_tile(block_q, geometry.grid) if tile is None else tile
    order = TileOrder(geometry, tile, block_q, device)
    nf, nh, nw = order.counts
    c = order.coords()  # (T, 3)
    T = len(c)
    j = torch.arange(nf, device=device)
    d = (c[:, 0, None] - j).abs()  # (T, nf) tile-frame distance
    share = band_share(d, decay)
    kept, area = frame_rule(d, share * (nh * nw), 1.0)  # area in tiles, at least one tile
    side = torch.sqrt((area / (nh * nw)).clamp(max=1.0))
    full = (d == 0) | (j * tile[0] < sinks)
    wh = torch.where(full, nh, torch.ceil(nh * side - 1e-9).long().clamp(1, nh))
    ww = torch.where(full, nw, torch.ceil(nw * side - 1e-9).long().clamp(1, nw))
    sh = window_start(c[:, 1, None], wh, nh)  # (T, nf)
    sw = window_start(c[:, 2, None], ww, nw)
    dh = torch.arange(nh, device=device)
    rows = sh[:, :, None] + dh  # (T, nf, nh): tile rows of the window (only the first wh are used)
    valid = (kept | full)[:, :, None] & (dh < wh[:, :, None])
    first = (j[None, :, None] * nh + rows.clamp(max=nh - 1)) * nw + sw[:, :, None]
    last = first + ww[:, :, None]
    start = order.kv_offset[first].reshape(T, -1)
    end = order.kv_offset[last].reshape(T, -1)
    count, start, end = merge_segments(start, end, valid.reshape(T, -1))
    per_tile = order.slot // block_q
    if per_tile > 1:
        count, start, end = (x.repeat_interleave(per_tile, 0) for x in (count, start, end))
    return count, start, end, order.q_perm, order.kv_perm


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    decay: float = 1.0,
    sinks: int = 1,
    variant: str = "tile2d",
    min_window: int | None = None,
    tile: int | Sequence[int] | None = None,
) -> Layout:
    """Layout (L=1, H=num_heads) of the radial mask for ``geometry`` (see the module docstring)."""
    p = check_params(geometry, decay=decay, sinks=sinks, variant=variant, min_window=min_window, tile=tile)
    if p["variant"] == "band":
        mw = block_q if p["min_window"] is None else p["min_window"]
        parts = _band(geometry, block_q, p["decay"], p["sinks"], mw, device)
    else:
        parts = _tile2d(geometry, block_q, p["decay"], p["sinks"], p["tile"], device)
    return layout_from_segments(geometry, block_q, num_heads, *parts)
