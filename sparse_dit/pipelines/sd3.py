"""Stable Diffusion 3 / 3.5: joint self-attention ``transformer_blocks[i].attn`` over [image, text] (text
last), plus SD3.5's extra image-only self-attention ``attn2`` in its dual-attention layers."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, C, H, W)
    timestep = call_argument(args, kwargs, "timestep", 3)
    p = transformer.config.patch_size
    return CallInfo(batch=hidden.shape[0], grid=(1, hidden.shape[2] // p, hidden.shape[3] // p), timestep=normalised_timestep(timestep, 1000.0))


SD3 = ModelAdapter(
    family="sd3",
    transformer_classes=("SD3Transformer2DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn", "transformer_blocks.attn2"),
    read_call=_read_call,
    text_position="last",
)
