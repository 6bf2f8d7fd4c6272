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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
    no backward: when q, k or v require grad (and grad is enabled) the differentiable reference runs instead, with one
    warning, so gradients are never silently missing.
    """
    check_qkv(q, k, v, layout)
    layout.check_bounds()  # before any kernel reads through the layout's indices (cached per layout object)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if triton_supported(q):
        if not needs_grad:
            from .triton_attention import triton_block_sparse_attention

            return triton_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
        _warn_once(
            "sparse-dit: gradients are needed but the Triton kernel is forward-only; using the differentiable PyTorch "
            "reference (slower). Call under torch.no_grad() for inference."
        )
    elif q.device.type == "cuda":
        warnings.warn(
            "sparse-dit: no supported GPU for the Triton kernel (needs triton and compute capability >= 8.0); "
            "using the slow PyTorch reference backend",
            RuntimeWarning,
            stacklevel=2,
        )
    return reference_attention(q, k, v, layout, scale=scale, return_lse=return_lse)
