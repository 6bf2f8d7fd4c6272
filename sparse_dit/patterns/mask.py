"""A user-supplied sparsity: a boolean block mask or a ready `Layout`, for tests and experiments."""

from __future__ import annotations

import torch

from sparse_dit.geometry import Geometry
from sparse_dit.layout import Layout

NAME = "mask"
STATIC = True


def check_params(
    geometry: Geometry | None,
    block_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    layout: Layout | None = None,
) -> dict:
    if (block_mask is None) == (layout is None):
        raise ValueError("pattern 'mask' needs exactly one of block_mask=(L, H, NQ, NK) bool with block_size=, or layout=")
    if block_mask is not None:
        if block_size is None or int(block_size) < 1:
            raise ValueError("pattern 'mask' with block_mask needs block_size= (tokens per block)")
        if block_mask.dtype != torch.bool or block_mask.dim() not in (2, 4):
            raise ValueError(
                f"block_mask must be bool with shape (NQ, NK) or (B or 1, H, NQ, NK); got {block_mask.dtype} "
                f"{tuple(block_mask.shape)}"
            )
        return {"block_mask": block_mask, "block_size": int(block_size)}
    return {"layout": layout}


def build(
    geometry: Geometry,
    num_heads: int,
    block_q: int,
    device: torch.device | str,
    block_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    layout: Layout | None = None,
) -> Layout:
    """The given layout, or the layout of the given block mask, after checking it fits ``geometry``."""
    S = geometry.seq_len
    if layout is not None:
        if layout.seq_len != S or layout.heads not in (1, num_heads) or layout.batch not in (1, geometry.batch):
            raise ValueError(
                f"pattern 'mask': layout is for seq_len={layout.seq_len}, heads={layout.heads}, batch={layout.batch}; "
                f"this attention call has seq_len={S}, heads={num_heads}, batch={geometry.batch}"
            )
        return layout.to(device)
    assert block_mask is not None and block_size is not None
    nb = -(-S // block_size)
    mask = block_mask if block_mask.dim() == 4 else block_mask[None, None]
    if mask.shape[-2:] != (nb, nb) or mask.shape[0] not in (1, geometry.batch) or mask.shape[1] not in (1, num_heads):
        lead = lambda n: "1" if n == 1 else f"1 or {n}"  # noqa: E731
        raise ValueError(
            f"pattern 'mask': block_mask has shape {tuple(block_mask.shape)}, expected ({lead(geometry.batch)}, "
            f"{lead(num_heads)}, {nb}, {nb}) for seq_len={S} and block_size={block_size}"
        )
    mask = mask.expand(mask.shape[0], num_heads, nb, nb).to(device)
    return Layout.from_block_mask(mask, block_size, seq_len=S)
