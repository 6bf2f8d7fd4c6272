"""Flux.1: joint self-attention over [text, image] (text first) in the double-stream blocks
(``transformer_blocks[i].attn``) and the single-stream blocks (``single_transformer_blocks[i].attn``).
Latents arrive packed (B, S, C); the 2-D grid comes from ``img_ids`` (row, column per token). The
pipeline passes timesteps already divided by 1000."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, S, C) packed latents
    timestep = call_argument(args, kwargs, "timestep", 3)
    ids = call_argument(args, kwargs, "img_ids", 4)
    ids = ids[0] if ids.dim() == 3 else ids  # (S, 3): (index, row, column)
    height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if height * width != hidden.shape[1]:
        raise ValueError(
            f"Flux image ids describe a {height}x{width} grid but there are {hidden.shape[1]} image tokens "
            "(extra reference-image tokens are not supported yet)"
        )
    return CallInfo(batch=hidden.shape[0], grid=(1, height, width), timestep=normalised_timestep(timestep, 1.0))


FLUX = ModelAdapter(
    family="flux",
    transformer_classes=("FluxTransformer2DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn", "single_transformer_blocks.attn"),
    read_call=_read_call,
    text_position="first",
)
