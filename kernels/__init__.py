"""Attention backends over a `Layout`: the fused Triton kernel on supported GPUs, the PyTorch reference elsewhere."""

from __future__ import annotations

import warnings

import torch

from sparse_dit.layout import Layout

from .reference import check_qkv, reference_attention

__all__ = ["block_sparse_attention", "reference_attention", "check_qkv", "triton_supported"]


def triton_supported(q: torch.Tensor) -> bool:
    """True when the fused Triton kernel can run on q's device (a CUDA GPU of compute capability >= 8.0)."""
    if q.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 0)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of q (B, S, H, D) against k, v (B, S, H, D) restricted to ``layout``.

    Returns out (B, S, H, D) and, with ``return_lse``, lse (B, H, S) float32. Runs the Triton kernel on a
    supported GPU; anywhere else the PyTorch reference, with one warning when a CUDA tensor had to fall back.
    Shapes and the layout's bounds (`Layout.check_bounds`) are checked before anything runs. The Triton kernel has
    no backward: for gradients use the reference (``sparse_dit.patch`` does so by itself).
    """
    check_qkv(q, k, v, layout)
    layout.check_bounds()  # before any kernel reads through the layout's indices (cached per layout object)
    if triton_supported(q):
        from .triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
    if q.device.type == "cuda":
        warnings.warn(
            "sparse-dit: no supported GPU for the Triton kernel (needs triton and compute capability >= 8.0); "
            "using the slow PyTorch reference backend",
            RuntimeWarning,
            stacklevel=2,
        )
    return reference_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
