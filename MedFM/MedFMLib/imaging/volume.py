"""The `Volume`: a scalar 3D image and its IJK→RAS matrix.

The 4×4 IJK→RAS matrix is the only source of truth for geometry. Nothing in
MedFM assumes a volume is axis-aligned, isotropic, or stored in RAS or LPS.
The voxel array is kept in numpy's (K, J, I) order, the order in which
SimpleITK and Slicer's ``arrayFromVolume`` hand it over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import PromptError, VolumeError


@dataclass(eq=False)
class Volume:
    """A scalar 3D image: ``array[k, j, i]`` plus the ``ijk_to_ras`` 4×4 matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "volume"
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.array.ndim != 3:
            raise VolumeError(f"{self.name}: expected a 3D scalar volume, got an array of shape {self.array.shape}.")
        if self.array.size == 0:
            raise VolumeError(f"{self.name}: the volume is empty (shape {self.array.shape}).")
        if not (np.issubdtype(self.array.dtype, np.number) or self.array.dtype == np.bool_):
            raise VolumeError(f"{self.name}: voxel type {self.array.dtype} is not numeric.")
        if np.iscomplexobj(self.array):
            raise VolumeError(f"{self.name}: complex-valued voxels are not supported.")
        if self.ijk_to_ras.shape != (4, 4) or not np.all(np.isfinite(self.ijk_to_ras)):
            raise VolumeError(f"{self.name}: the IJK→RAS matrix must be a finite 4×4 matrix.")
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise VolumeError(f"{self.name}: the IJK→RAS matrix is singular (zero spacing?).")

    @property
    def dimensions(self) -> tuple[int, int, int]:
        """Number of voxels along I, J, K."""
        k, j, i = self.array.shape
        return i, j, k

    @cached_property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in millimetres along I, J, K (the IJK→RAS column norms)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def fingerprint(self) -> str:
        """A content hash: the same voxels and geometry give the same key in any process."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(str((self.array.shape, self.array.dtype.str)).encode())
            digest.update(np.ascontiguousarray(self.ijk_to_ras).tobytes())
            digest.update(np.ascontiguousarray(self.array).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Continuous IJK coordinates of RAS points, shape (N, 3) or (3,)."""
        ras = np.asarray(ras, dtype=np.float64)
        homogeneous = np.concatenate([np.atleast_2d(ras), np.ones((np.atleast_2d(ras).shape[0], 1))], axis=1)
        ijk = (self.ras_to_ijk @ homogeneous.T).T[:, :3]
        return ijk.reshape(ras.shape)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        homogeneous = np.concatenate([np.atleast_2d(ijk), np.ones((np.atleast_2d(ijk).shape[0], 1))], axis=1)
        ras = (self.ijk_to_ras @ homogeneous.T).T[:, :3]
        return ras.reshape(ijk.shape)

    def contains_ijk(self, ijk: np.ndarray) -> bool:
        """True if the continuous IJK point lies within the voxel grid (half a voxel margin)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        upper = np.asarray(self.dimensions, dtype=np.float64) - 0.5
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= upper))

    def require_inside(self, ras: np.ndarray, what: str = "point") -> np.ndarray:
        """IJK of a RAS point, or a PromptError that says the point is outside."""
        ijk = self.ras_to_ijk_points(ras)
        if not self.contains_ijk(ijk):
            r, a, s = np.asarray(ras, dtype=float)
            raise PromptError(
                f"The {what} at R={r:.1f}, A={a:.1f}, S={s:.1f} mm lies outside the volume "
                f"'{self.name}' (voxel {np.round(ijk, 1).tolist()}, size {list(self.dimensions)}); "
                "place it on the image."
            )
        return ijk


def ras_to_lps_matrix(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4×4 IJK→RAS matrix to IJK→LPS (or back: the flip is its own inverse)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(matrix, dtype=np.float64)
