"""Image/video fidelity metrics used by the harness, the demo and the examples.

Both take two uint8 arrays of one shape, (T, H, W, 3) clips or (H, W, 3) images, values 0..255.

- ``psnr``: 10 log10(255^2 / MSE), the MSE over every pixel and channel of the whole clip; ``inf`` for
  identical inputs.
- ``ssim``: scikit-image's ``structural_similarity`` per frame (data range 255, the 3 colour channels
  averaged with ``channel_axis=-1``, its default 7x7 uniform window), averaged over frames; 1.0 for
  identical inputs.
"""

from __future__ import annotations

import math

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare clips of shapes {a.shape} and {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise TypeError(f"metrics take uint8 frames (0..255); got {a.dtype} and {b.dtype}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) or (H, W, 3) frames; got {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole clip (inf when identical)."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity over frames (1.0 when identical)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b)
    if np.array_equal(a, b):
        return 1.0
    win = min(7, a.shape[1], a.shape[2])
    win -= 1 - win % 2  # odd window that fits tiny frames
    values = [structural_similarity(x, y, data_range=255, channel_axis=-1, win_size=win) for x, y in zip(a, b)]
    return float(np.mean(values))
