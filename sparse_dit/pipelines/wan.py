"""Wan 2.1 / 2.2 (T2V, I2V): self-attention is ``blocks[i].attn1`` over video tokens only; text enters
through cross-attention (``attn2``), which stays untouched. Wan 2.2 pipelines hold two transformers
(``transformer`` for high noise, ``transformer_2`` for low noise): both are patched."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, grid_5d, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W) latents
    timestep = call_argument(args, kwargs, "timestep", 1)
    grid = grid_5d(hidden, tuple(transformer.config.patch_size))
    return CallInfo(batch=hidden.shape[0], grid=grid, timestep=normalised_timestep(timestep, 1000.0))


WAN = ModelAdapter(
    family="wan",
    transformer_classes=("WanTransformer3DModel",),
    pipeline_transformers=("transformer", "transformer_2"),
    self_attention=blocks_attr("blocks.attn1"),
    read_call=_read_call,
    text_position="none",
)
