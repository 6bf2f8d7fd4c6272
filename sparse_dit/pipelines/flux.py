"""Flux.1 (and Flux.1 Kontext): joint self-attention over [text, image] (text first) in the double-stream blocks
(``transformer_blocks[i].attn``) and the single-stream blocks (``single_transformer_blocks[i].attn``).
Latents arrive packed (B, S, C); the 2-D grid comes from ``img_ids`` (index, row, column per token): the leading
tokens that share the first token's index and form a row-major grid are the grid. Tokens after it (Kontext's
reference-image tokens, index 1) are attended like text. Ids that form no grid (arbitrary ids, as diffusers' own
tests pass) run dense. The pipeline passes timesteps already divided by 1000."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter, NoGridError, blocks_attr, call_argument, normalised_timestep


def image_grid(ids: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the row-major grid that the leading image ids (S, 3) describe; NoGridError if none."""
    ids = ids.detach()
    same = ids[:, 0] == ids[0, 0]
    n = int(same.long().cumprod(0).sum())  # the leading run with the first token's index
    rows, cols = ids[:n, 1], ids[:n, 2]
    height, width = int(rows.max().round()) + 1, int(cols.max().round()) + 1
    if height * width == n and rows.min() >= 0 and cols.min() >= 0:
        expect_rows = torch.arange(height, device=ids.device).repeat_interleave(width).to(ids.dtype)
        expect_cols = torch.arange(width, device=ids.device).repeat(height).to(ids.dtype)
        if torch.equal(rows, expect_rows) and torch.equal(cols, expect_cols):
            return height, width
    raise NoGridError("Flux image ids do not start with a row-major (row, column) grid, so sparse-dit has no grid for them")


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
    hidden = call_argument(args, kwargs, "hidden_states", 0)  # (B, S, C) packed latents
    timestep = call_argument(args, kwargs, "timestep", 3)
    ids = call_argument(args, kwargs, "img_ids", 4)
    ids = ids[0] if ids.dim() == 3 else ids  # (S, 3): (index, row, column)
    if ids.shape[0] != hidden.shape[1]:
        raise NoGridError(f"Flux img_ids hold {ids.shape[0]} tokens but hidden_states {hidden.shape[1]}")
    height, width = image_grid(ids)
    return CallInfo(
        batch=hidden.shape[0],
        grid=(1, height, width),
        timestep=normalised_timestep(timestep, 1.0),
        extra_len=hidden.shape[1] - height * width,
    )


FLUX = ModelAdapter(
    family="flux",
    transformer_classes=("FluxTransformer2DModel",),
    pipeline_transformers=("transformer",),
    self_attention=blocks_attr("transformer_blocks.attn", "single_transformer_blocks.attn"),
    read_call=_read_call,
    text_position="first",
)
