"""A local 3-D neighbourhood as a block mask: query block i keeps key block j when some token of j lies
within ``radius`` = (frames, rows, columns) of some token of i (a box, per-axis distance), tokens in raster
(frame, row, column) order, no reordering. Exact at token level, simple, and a baseline for ``tile``
(which reorders tokens into tiles so that a window wastes less of each block). Video-only sequences
(no text tokens in self-attention, as in Wan)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

NAME = "local"
STATIC = True


def check_params(geometry: Geometry | None, radius: int | Sequence[int] = (1, 2, 2)) -> dict:
    """Normalise ``radius`` to an int triple (one int: the same on every axis); raise ValueError for bad values."""
    values = [radius] if isinstance(radius, (int, float)) else list(radius)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 0 for v in values):
        raise ValueError(f"local pattern: radius must be one int or three (frames, rows, columns), each >= 0; got {radius!r}")
    if geometry is not None and geometry.text_len:
        raise ValueError("local pattern: sequences with text tokens in self-attention are not supported; use tile or radial")
    return {"radius": tuple(int(v) for v in values)}


def block_mask(grid: Sequence[int], block_size: int, radius: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """(1, 1, NB, NB) bool block mask of the neighbourhood of ``radius`` on a raster-ordered video ``grid``."""
    Fg, Hg, Wg = (int(v) for v in grid)
    S = Fg * Hg * Wg
    nb = -(-S // block_size)
    owner = torch.zeros(nb, S)
    owner[torch.arange(S) // block_size, torch.arange(S)] = 1.0
    rf, rh, rw = (int(r) for r in radius)
    reach = F.max_pool3d(
        owner.view(nb, 1, Fg, Hg, Wg), kernel_size=(2 * rf + 1, 2 * rh + 1, 2 * rw + 1), stride=1, padding=(rf, rh, rw)
    ).view(nb, S)
    pad = nb * block_size - S
    reach = F.pad(reach, (0, pad)).view(nb, nb, block_size)
    return (reach.amax(-1) > 0)[None, None]


def build(geometry: Geometry, num_heads: int, block_q: int, device: torch.device | str,
          radius: Sequence[int] = (1, 2, 2)) -> Layout:
    """The layout of `block_mask` with blocks of ``block_q`` tokens, the same for every head."""
    check_params(geometry, radius)
    mask = block_mask(geometry.grid, block_q, radius).expand(1, num_heads, -1, -1).to(device)
    return Layout.from_block_mask(mask, block_q, seq_len=geometry.seq_len)
