"""QwenImage: joint self-attention ``transformer_blocks[i].attn`` over [text, image] (text first) with a
key-padding mask over the prompt. Latents arrive packed (B, S, C); the grid comes from ``img_shapes``
(frames, height, width per batch element; a list of them when there are several images: edit references, the
layers of QwenImage-Layered). The first image is the grid; the tokens of the others follow it and are attended
like text. The pipeline passes timesteps already divided by 1000."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, NoGridError, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, S, C) packed latents
    timestep = call_argument(args, kwargs, "timestep", 3)
    shapes = call_argument(args, kwargs, "img_shapes", 4)
    if not shapes:
        raise NoGridError("QwenImage was called without img_shapes, so sparse-dit has no grid")
    per_element = [s if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)) else [s] for s in shapes]
    first = [tuple(int(x) for x in images[0]) for images in per_element]
    if len(set(first)) != 1:
        raise NoGridError(f"QwenImage batch elements have different first images {sorted(set(first))}")
    grid = first[0]
    video = grid[0] * grid[1] * grid[2]
    if video > hidden.shape[1]:
        raise NoGridError(f"QwenImage img_shapes {grid} describe {video} tokens but there are {hidden.shape[1]}")
    return CallInfo(
        batch=hidden.shape[0],
        grid=grid,
        timestep=normalised_timestep(timestep, 1.0),
        extra_len=hidden.shape[1] - video,  # further images (edit references, layered output): attended like text
    )


QWENIMAGE = ModelAdapter(
    family="qwenimage",
    transformer_classes=("QwenImageTransformer2DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn"),
    read_call=_read_call,
    text_position="first",
)
