"""Intensity windows: what the model sees of the voxel values.

A window is given as width/level, as Slicer's display node uses it. Models get
float32 values in [0, 1]; nothing is ever quantised to 8 bits on the way, so a
subtle contrast inside the window reaches the model intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MedFMError

# Width/level in Hounsfield units, as in common radiology practice.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}

# Robust range for MR and anything else without calibrated units.
DEFAULT_PERCENTILES = (0.5, 99.5)
_MAX_SAMPLES = 2_000_000


@dataclass(frozen=True)
class Window:
    """A display window: values in [level - width/2, level + width/2] map onto [0, 1]."""

    width: float
    level: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.width) and np.isfinite(self.level)) or self.width <= 0:
            raise MedFMError(f"Window width must be a positive number, got W={self.width}, L={self.level}.")

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map voxel values to float32 in [0, 1], clipping outside the window."""
        scaled = (np.asarray(values, dtype=np.float32) - np.float32(self.low)) / np.float32(self.width)
        return np.clip(scaled, 0.0, 1.0, out=scaled)

    def key(self) -> tuple[float, float]:
        """A hashable, rounding-stable identity for cache keys."""
        return (round(float(self.width), 4), round(float(self.level), 4))


def preset_window(name: str) -> Window:
    try:
        width, level = CT_PRESETS[name.lower().replace("-", "_")]
    except KeyError:
        raise MedFMError(f"Unknown intensity preset '{name}': choose one of {', '.join(CT_PRESETS)}.") from None
    return Window(width, level)


def percentile_window(array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> Window:
    """A window spanning robust percentiles of the voxel values (for MR or unknown units).

    Computed over the whole volume, not per slice, so that every slice of a
    volume is normalised the same way.
    """
    flat = np.asarray(array).reshape(-1)
    if flat.size > _MAX_SAMPLES:
        # A strided sample keeps this fast on large volumes and is deterministic.
        flat = flat[:: flat.size // _MAX_SAMPLES + 1]
    low, high = np.percentile(flat.astype(np.float64), percentiles)
    if not high > low:
        # A constant image: any positive width gives the same (all-zero) picture.
        return Window(1.0, float(low) + 0.5)
    return Window(float(high - low), float((high + low) / 2.0))


def parse_window(text: str) -> Window:
    """Parse 'W,L' as typed on the command line."""
    try:
        width, level = (float(part) for part in text.split(","))
    except ValueError:
        raise MedFMError(f"Cannot read window '{text}': write it as WIDTH,LEVEL, e.g. 400,40.") from None
    return Window(width, level)


def resolve_window(array: np.ndarray, window: Window | None = None, preset: str | None = None) -> Window:
    """The window to use: an explicit one, else a preset, else robust percentiles."""
    if window is not None and preset is not None:
        raise MedFMError("Give either a window or a preset, not both.")
    if window is not None:
        return window
    if preset is not None:
        return preset_window(preset)
    return percentile_window(array)
