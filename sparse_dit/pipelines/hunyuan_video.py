"""HunyuanVideo: joint self-attention over [video, text] (text last) in the dual-stream blocks
(``transformer_blocks[i].attn``) and single-stream blocks (``single_transformer_blocks[i].attn``), with
a key-padding mask over the prompt (padded text keys attended by nobody). The prompt refiner's own
text-only attention is not touched."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, blocks_attr, call_argument, grid_5d, normalised_timestep


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, C, F, H, W)
    timestep = call_argument(args, kwargs, "timestep", 1)
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    return CallInfo(batch=hidden.shape[0], grid=grid_5d(hidden, (p_t, p, p)), timestep=normalised_timestep(timestep, 1000.0))


HUNYUAN_VIDEO = ModelAdapter(
    family="hunyuan-video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn", "single_transformer_blocks.attn"),
    read_call=_read_call,
    text_position="last",
)
