"""Wan 2.1 / 2.2 (T2V, I2V): self-attention is ``blocks[i].attn1`` over video tokens only; text enters
through cross-attention (``attn2``), which stays untouched."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, call_argument, normalised_timestep


def _self_attention(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.blocks]


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W) latents
    p_t, p_h, p_w = transformer.config.patch_size
    B, _, F, H, W = hidden.shape
    timestep = call_argument(args, kwargs, "timestep", 1)
    return CallInfo(batch=B, grid=(F // p_t, H // p_h, W // p_w), timestep=normalised_timestep(timestep, 1000.0))


WAN = ModelAdapter(
    family="wan",
    transformer_classes=("WanTransformer3DModel",),
    pipeline_transformers=("transformer", "transformer_2"),
    self_attention=_self_attention,
    read_call=_read_call,
    text_position="none",
)
