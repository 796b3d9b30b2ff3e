"""Segmentation metrics, from MONAI: Dice, and normalised surface Dice by the surface-element method.

NSD uses ``use_subvoxels=True``: MONAI then measures the surface by its elements, as the CVPR challenges do
(the default counts edge voxels, which is not comparable). As in those challenges, NSD is 0 where DSC is
0.2 or less, and the area under the curve is the trapezoid over the click steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

#: below this Dice the surfaces are not compared (NSD counts as 0), as in the CVPR 2025 evaluation
NSD_MIN_DSC = 0.2


def _one_hot(mask: np.ndarray):
    import torch

    foreground = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    return torch.stack([1.0 - foreground, foreground])[None]  # (batch, [background, object], *spatial)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean arrays (MONAI's); 1.0 when both are empty."""
    from monai.metrics import compute_dice

    if not prediction.any() and not reference.any():
        return 1.0
    value = compute_dice(_one_hot(prediction), _one_hot(reference), include_background=False, ignore_empty=False)
    return float(value[0, 0])


def surface_dice(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice at ``tolerance_mm``; ``spacing`` in millimetres along the array's axes."""
    from monai.metrics import compute_surface_dice

    if not prediction.any() or not reference.any():
        return float(prediction.any() == reference.any())
    with warnings.catch_warnings():  # MONAI's notes on its own deprecated internals
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            _one_hot(prediction), _one_hot(reference), class_thresholds=[float(tolerance_mm)],
            include_background=False, spacing=[float(s) for s in spacing], use_subvoxels=True,
        )  # fmt: skip
    return float(value[0, 0])


def dsc_and_nsd(prediction, reference, spacing, tolerance_mm: float = 2.0) -> tuple[float, float]:
    score = dice(prediction, reference)
    return score, surface_dice(prediction, reference, spacing, tolerance_mm) if score > NSD_MIN_DSC else 0.0


def area_under_steps(values: Sequence[float]) -> float:
    """The trapezoid over the click steps at x = 0, 1, 2, …: 5 clicks span 0 to 4."""
    values = [float(v) for v in values]
    return float(sum((a + b) / 2.0 for a, b in zip(values, values[1:])))
