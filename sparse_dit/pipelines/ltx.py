"""LTX-Video: self-attention ``transformer_blocks[i].attn1`` over video tokens only (text through ``attn2``);
latents arrive packed (B, S, C) with the post-patchify ``num_frames``, ``height``, ``width`` as arguments."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, S, C) packed latents
    timestep = call_argument(args, kwargs, "timestep", 2)
    grid = tuple(int(call_argument(args, kwargs, name, i)) for name, i in (("num_frames", 4), ("height", 5), ("width", 6)))
    return CallInfo(batch=hidden.shape[0], grid=grid, timestep=normalised_timestep(timestep, 1000.0))


LTX_VIDEO = ModelAdapter(
    family="ltx-video",
    transformer_classes=("LTXVideoTransformer3DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn1"),
    read_call=_read_call,
    text_position="none",
)
