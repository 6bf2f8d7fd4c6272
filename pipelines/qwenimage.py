"""QwenImage: joint self-attention ``transformer_blocks[i].attn`` over [text, image] (text first) with a
key-padding mask over the prompt. Latents arrive packed (B, S, C); the grid comes from ``img_shapes``
(frames, height, width per batch element). The pipeline passes timesteps already divided by 1000."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, S, C) packed latents
    timestep = call_argument(args, kwargs, "timestep", 3)
    shapes = call_argument(args, kwargs, "img_shapes", 4)
    first = shapes[0]
    first = first[0] if isinstance(first, list) else first  # per batch element: a list of (F, H, W)
    grid = tuple(int(x) for x in first)
    if grid[0] * grid[1] * grid[2] != hidden.shape[1]:
        raise ValueError(
            f"QwenImage img_shapes {tuple(grid)} describe {grid[0] * grid[1] * grid[2]} tokens but there are "
            f"{hidden.shape[1]} (several images per prompt are not supported yet)"
        )
    return CallInfo(batch=hidden.shape[0], grid=grid, timestep=normalised_timestep(timestep, 1.0))


QWENIMAGE = ModelAdapter(
    family="qwenimage",
    transformer_classes=("QwenImageTransformer2DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn"),
    read_call=_read_call,
    text_position="first",
)
