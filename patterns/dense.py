"""Dense attention: every query attends every key."""

from __future__ import annotations

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

NAME = "dense"
STATIC = True


def check_params(geometry: Geometry | None, **params) -> dict:
    if params:
        raise ValueError(f"pattern 'dense' takes no parameters; got {sorted(params)}")
    return {}


def build(geometry: Geometry, num_heads: int, block_q: int, device: torch.device | str) -> Layout:
    """One segment covering the whole sequence for every query block of every head."""
    return Layout.dense(geometry.seq_len, num_heads, block_q=block_q, device=device)
