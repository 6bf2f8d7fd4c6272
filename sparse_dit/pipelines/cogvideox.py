"""CogVideoX 1.0 / 1.5: joint self-attention ``transformer_blocks[i].attn1`` over [text, video] (text first,
226 tokens, no padding mask); video latents (B, F, C, H, W), spatial patch ``patch_size`` and, in 1.5,
temporal patch ``patch_size_t``."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, F, C, H, W)
    timestep = call_argument(args, kwargs, "timestep", 2)
    B, F, _, H, W = hidden.shape
    p = transformer.config.patch_size
    p_t = transformer.config.patch_size_t or 1
    return CallInfo(batch=B, grid=(-(-F // p_t), H // p, W // p), timestep=normalised_timestep(timestep, 1000.0))


COGVIDEOX = ModelAdapter(
    family="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn1"),
    read_call=_read_call,
    text_position="first",
)
