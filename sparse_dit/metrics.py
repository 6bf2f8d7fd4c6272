"""Clip fidelity metrics shared by the harness, the demo and the examples.

Both take two clips (T, H, W, 3) or frames (H, W, 3), uint8 or float in [0, 1], compared as float64 in
[0, 1] (data range 1.0):

- PSNR: ``10 * log10(1 / MSE)`` with MSE the mean squared difference over every frame, row, column and
  RGB channel of the clip (one MSE per clip, not a mean of per-frame PSNRs). Identical clips: ``inf``.
- SSIM: Wang et al. (2004) with their constants: an 11 x 11 Gaussian window of sigma 1.5 (the window
  truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, C1 = (K1 * 1)^2, C2 = (K2 * 1)^2, population
  (not sample) covariances. The SSIM map is computed per frame and per RGB channel over the "valid"
  window positions only (no padding; equal to scikit-image's
  ``structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``, which crops the padded border), averaged over positions, then over the
  three channels, then over frames. Identical clips: 1.0. Frames need at least 11 x 11 pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # 5: an 11 x 11 window, as scikit-image's truncate=3.5


def _as_float(video: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """(T, H, W, 3) uint8 or float in [0, 1] -> float64 torch tensor in [0, 1]."""
    t = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if t.dtype == torch.uint8:
        return t.to(torch.float64) / 255.0
    return t.to(torch.float64)


def psnr(a: "np.ndarray | torch.Tensor", b: "np.ndarray | torch.Tensor") -> float:
    """PSNR in dB of two clips (T, H, W, 3) (uint8, or float in [0, 1]); ``inf`` when identical."""
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"clips differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: "np.ndarray | torch.Tensor", b: "np.ndarray | torch.Tensor") -> float:
    """Mean SSIM of two clips (T, H, W, C) (uint8, or float in [0, 1]); see the module docstring."""
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"clips differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x[None], y[None]
    T, H, W, C = x.shape
    size = 2 * _SSIM_RADIUS + 1
    if H < size or W < size:
        raise ValueError(f"SSIM needs frames of at least {size}x{size} pixels; got {H}x{W}")
    g = torch.exp(-0.5 * (torch.arange(size, dtype=torch.float64) - _SSIM_RADIUS) ** 2 / _SSIM_SIGMA**2)
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]  # (1, 1, 11, 11)
    # frames and channels become the batch of a single-channel 'valid' convolution
    xs = x.permute(0, 3, 1, 2).reshape(T * C, 1, H, W)
    ys = y.permute(0, 3, 1, 2).reshape(T * C, 1, H, W)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window)

    mx, my = blur(xs), blur(ys)
    vx = blur(xs * xs) - mx * mx
    vy = blur(ys * ys) - my * my
    cxy = blur(xs * ys) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_plane = smap.mean(dim=(1, 2, 3)).reshape(T, C)
    return float(per_plane.mean(dim=1).mean())


__all__ = ["psnr", "ssim"]
