"""Dense attention: every query attends every key."""

from __future__ import annotations

from dataclasses import replace

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
    """One segment covering the whole sequence for every query block of every head. With text tokens the
    segment covers the video and text comes through ``text_kv``/``dense_q`` like every other pattern's, so
    dense heads stack with sparse ones in one layer."""
    layout = Layout.dense(geometry.seq_len, num_heads, block_q=block_q, device=device)
    if geometry.text_range is None:
        return layout
    v0 = geometry.video_start
    return replace(
        layout,
        kv_start=torch.full_like(layout.kv_start, v0),
        kv_end=torch.full_like(layout.kv_end, v0 + geometry.video_len),
        text_kv=geometry.text_range,
        dense_q=geometry.text_range,
    )
