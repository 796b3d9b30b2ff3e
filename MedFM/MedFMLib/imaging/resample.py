"""Small numpy resampling helpers (no scipy: Slicer may not ship it)."""

from __future__ import annotations

import numpy as np


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Pixel-centre aligned mapping, as align_corners=False in torch.
    position = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    position = np.clip(position, 0, n_in - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (position - lower).astype(np.float32)


def resize_linear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D image to (rows, cols), as float32."""
    image = np.asarray(image, dtype=np.float32)
    rows, cols = shape
    if image.shape == (rows, cols):
        return image.copy()
    lo, hi, w = _linear_weights(image.shape[0], rows)
    image = image[lo] * (1 - w)[:, None] + image[hi] * w[:, None]
    lo, hi, w = _linear_weights(image.shape[1], cols)
    return image[:, lo] * (1 - w)[None, :] + image[:, hi] * w[None, :]


def isotropic_shape(
    shape: tuple[int, int], pixel_spacing: tuple[float, float], max_side: int = 2048
) -> tuple[int, int]:
    """Image size at which rows and columns have the same physical spacing.

    The coarser axis is upsampled (never downsampled, to keep in-plane detail),
    and the result is capped at ``max_side`` on its long side.
    """
    rows, cols = shape
    row_mm, col_mm = pixel_spacing
    finest = min(row_mm, col_mm)
    new_rows, new_cols = rows * row_mm / finest, cols * col_mm / finest
    cap = max(new_rows, new_cols) / max_side
    if cap > 1:
        new_rows, new_cols = new_rows / cap, new_cols / cap
    return max(1, int(round(new_rows))), max(1, int(round(new_cols)))
