"""Mochi 1: joint self-attention ``transformer_blocks[i].attn1`` over [video, text] (text last). Its processor
drops padded prompt tokens itself and attends each batch element separately, so every attention call
sees only valid text. Mochi counts timesteps the other way (0 = pure noise)."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, grid_5d, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W)
    timestep = call_argument(args, kwargs, "timestep", 2)
    p = transformer.config.patch_size
    return CallInfo(batch=hidden.shape[0], grid=grid_5d(hidden, (1, p, p)), timestep=normalised_timestep(timestep, 1000.0, reversed=True))


MOCHI = ModelAdapter(
    family="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn1"),
    read_call=_read_call,
    text_position="last",
)
