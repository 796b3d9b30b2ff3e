"""Synthetic volumes with known answers, for the demo, the benchmark and tests.

Shapes are defined in RAS millimetres and sampled through the volume's own
IJK→RAS matrix, so an oblique, anisotropic phantom is exactly as "true" as an
axis-aligned one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .volume import Volume


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about R, then A, then S (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_ijk_to_ras(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    axis_signs: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """An IJK→RAS matrix from spacing, origin, a rotation and axis flips (e.g. (-1, -1, 1) for LPS-like storage)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(angles_deg) @ np.diag(np.asarray(axis_signs) * np.asarray(spacing))
    matrix[:3, 3] = origin
    return matrix


def voxel_centres_ras(dimensions: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS coordinates of every voxel centre, shape (K, J, I, 3)."""
    i_count, j_count, k_count = dimensions
    k, j, i = np.meshgrid(np.arange(k_count), np.arange(j_count), np.arange(i_count), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


@dataclass(frozen=True)
class Ellipsoid:
    centre_ras: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    value: float

    def mask(self, ras: np.ndarray) -> np.ndarray:
        offset = (ras - np.asarray(self.centre_ras)) / np.asarray(self.radii_mm)
        return np.sum(offset**2, axis=-1) <= 1.0


def render(
    dimensions: Sequence[int],
    ijk_to_ras: np.ndarray,
    shapes: Sequence[Ellipsoid],
    background: float = 0.0,
    noise_sd: float = 0.0,
    seed: int = 0,
    dtype=np.int16,
    name: str = "phantom",
) -> tuple[Volume, list[np.ndarray]]:
    """A volume with the shapes painted in order (later on top), and each shape's true mask."""
    ras = voxel_centres_ras(dimensions, ijk_to_ras)
    array = np.full(ras.shape[:3], background, dtype=np.float64)
    masks = []
    for shape in shapes:
        inside = shape.mask(ras)
        array[inside] = shape.value
        masks.append(inside)
    if noise_sd > 0:
        array += np.random.default_rng(seed).normal(0.0, noise_sd, array.shape)
    return Volume(array.astype(dtype), ijk_to_ras, name=name), masks


def demo_phantom() -> tuple[Volume, dict[str, np.ndarray], dict[str, tuple[float, float, float]]]:
    """A CT-like oblique, anisotropic volume: body, an organ, and a lesion inside it.

    Returns the volume, the true masks by name, and a RAS point inside each object.
    """
    matrix = make_ijk_to_ras(
        spacing=(0.9, 0.9, 2.5), origin=(80.0, 60.0, -40.0), angles_deg=(8, -6, 12), axis_signs=(-1, -1, 1)
    )
    centre = matrix[:3, :3] @ np.array([80, 80, 24]) + matrix[:3, 3]
    body = Ellipsoid(tuple(centre), (62.0, 48.0, 80.0), 40.0)
    organ_centre = centre + np.array([-18.0, 6.0, 0.0])
    organ = Ellipsoid(tuple(organ_centre), (26.0, 20.0, 24.0), 140.0)
    lesion_centre = centre + np.array([22.0, -10.0, 4.0])
    lesion = Ellipsoid(tuple(lesion_centre), (9.0, 9.0, 9.0), -60.0)
    volume, masks = render(
        (160, 160, 48), matrix, [body, organ, lesion], background=-1000.0, noise_sd=6.0, name="demo_phantom"
    )
    truth = {"organ": masks[1] & ~masks[2], "lesion": masks[2]}
    seeds = {"organ": tuple(organ_centre), "lesion": tuple(lesion_centre)}
    return volume, truth, seeds
