"""Slices of a volume, and the mapping of RAS prompts onto them.

A prompt lives on one *slice plane*: all voxels whose index along one IJK axis
equals a given value. Which IJK axis is chosen depends on the view the user
clicked in: the axis whose direction is closest to that view's normal. The 2D
image of a plane has rows along the higher-numbered remaining IJK axis and
columns along the lower one, e.g. an axial plane of an axis-aligned volume is
``array[k]`` with rows along J and columns along I.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PromptError
from .volume import Volume

VIEW_NORMALS_RAS: dict[str, tuple[float, float, float]] = {
    "axial": (0.0, 0.0, 1.0),
    "coronal": (0.0, 1.0, 0.0),
    "sagittal": (1.0, 0.0, 0.0),
}

ViewLike = str | int | Sequence[float] | np.ndarray


def _axis_directions(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unit RAS directions of the I, J and K axes, as the columns of a 3×3 matrix."""
    directions = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    return directions / np.linalg.norm(directions, axis=0)


def view_axes(ijk_to_ras: np.ndarray) -> dict[str, int]:
    """Map axial, coronal and sagittal to three distinct IJK axes.

    The assignment maximises the total alignment, so that on a strongly oblique
    volume two views can never fall onto the same IJK axis.
    """
    alignment = np.abs(_axis_directions(ijk_to_ras))  # [ras_axis, ijk_axis]
    views = ("sagittal", "coronal", "axial")  # RAS axes R, A, S
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(alignment[ras_axis, perm[ras_axis]] for ras_axis in range(3)),
    )
    return {views[ras_axis]: best[ras_axis] for ras_axis in range(3)}


def axis_for_normal(ijk_to_ras: np.ndarray, normal_ras: Sequence[float]) -> int:
    """The IJK axis closest to a slice view's normal (given in RAS)."""
    normal = np.asarray(normal_ras, dtype=np.float64)
    if normal.shape != (3,) or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) == 0:
        raise PromptError(f"A view normal must be three finite numbers, not {normal_ras!r}.")
    cosines = np.abs(_axis_directions(ijk_to_ras).T @ (normal / np.linalg.norm(normal)))
    return int(np.argmax(cosines))


def resolve_axis(ijk_to_ras: np.ndarray, view: ViewLike) -> int:
    """IJK axis for a view name, an explicit axis number, or a view normal."""
    if isinstance(view, str):
        name = view.lower()
        if name not in VIEW_NORMALS_RAS:
            raise PromptError(f"Unknown view '{view}': use axial, coronal or sagittal.")
        return view_axes(ijk_to_ras)[name]
    if isinstance(view, (int, np.integer)):
        if not 0 <= int(view) <= 2:
            raise PromptError(f"Slice axis must be 0, 1 or 2 (I, J, K), not {view}.")
        return int(view)
    return axis_for_normal(ijk_to_ras, view)


@dataclass(frozen=True)
class SlicePlane:
    """One slice of a volume: the voxels whose ``axis`` index equals ``index``."""

    axis: int
    index: int

    @property
    def row_axis(self) -> int:
        return max(a for a in range(3) if a != self.axis)

    @property
    def col_axis(self) -> int:
        return min(a for a in range(3) if a != self.axis)

    def array_index(self) -> tuple:
        """numpy index into a (K, J, I) array that selects this plane as (rows, cols)."""
        selector: list = [slice(None)] * 3
        selector[2 - self.axis] = self.index
        return tuple(selector)

    def shape(self, volume: Volume) -> tuple[int, int]:
        dims = volume.dimensions
        return dims[self.row_axis], dims[self.col_axis]

    def pixel_spacing(self, volume: Volume) -> tuple[float, float]:
        """Millimetres between rows and between columns of the slice image."""
        spacing = volume.spacing
        return float(spacing[self.row_axis]), float(spacing[self.col_axis])

    def ijk_to_xy(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous slice pixel coordinates (x = column, y = row) of IJK points."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return np.stack([ijk[:, self.col_axis], ijk[:, self.row_axis]], axis=1)


def extract_slice(array: np.ndarray, plane: SlicePlane) -> np.ndarray:
    """The 2D (rows, cols) image of a plane from a (K, J, I) array (a view, not a copy)."""
    return array[plane.array_index()]


def write_slice(array: np.ndarray, plane: SlicePlane, image: np.ndarray) -> None:
    """Write a 2D (rows, cols) image into a plane of a (K, J, I) array."""
    target = array[plane.array_index()]
    if target.shape != image.shape:
        raise ValueError(f"slice shape {image.shape} does not match plane shape {target.shape}")
    array[plane.array_index()] = image


def plane_through(volume: Volume, ras: Sequence[float], view: ViewLike, what: str = "point") -> SlicePlane:
    """The slice plane of the given view that contains a RAS point."""
    ijk = volume.require_inside(ras, what)
    axis = resolve_axis(volume.ijk_to_ras, view)
    return SlicePlane(axis=axis, index=int(np.clip(np.rint(ijk[axis]), 0, volume.dimensions[axis] - 1)))


def point_on_plane(volume: Volume, plane: SlicePlane, ras: Sequence[float], what: str = "point") -> np.ndarray:
    """Slice pixel coordinates (x, y) of a RAS point that must lie on the given plane."""
    ijk = volume.require_inside(ras, what)
    if int(np.rint(ijk[plane.axis])) != plane.index:
        raise PromptError(
            f"The {what} lies on slice {int(np.rint(ijk[plane.axis]))}, not on slice {plane.index} "
            f"of IJK axis {'IJK'[plane.axis]}; place all prompts of one slice on that slice."
        )
    return plane.ijk_to_xy(ijk)[0]


def box_on_plane(
    volume: Volume, corner_a: Sequence[float], corner_b: Sequence[float], view: ViewLike
) -> tuple[SlicePlane, np.ndarray]:
    """A 2D box from two RAS corners on one slice: its plane and (x0, y0, x1, y1)."""
    plane = plane_through(volume, corner_a, view, what="box corner")
    ijk_b = volume.require_inside(corner_b, what="box corner")
    if int(np.rint(ijk_b[plane.axis])) != plane.index:
        raise PromptError(
            f"The box corners lie on different slices ({plane.index} and {int(np.rint(ijk_b[plane.axis]))} "
            f"along IJK axis {'IJK'[plane.axis]}); a 2D box needs both corners on one slice."
        )
    xy = plane.ijk_to_xy(np.stack([volume.ras_to_ijk_points(corner_a), ijk_b]))
    box = np.concatenate([xy.min(axis=0), xy.max(axis=0)])
    return plane, box


# --------------------------------------------------------------------------- 3D boxes (ROIs)
# Corners are ordered as itertools.product((0, 1), repeat=3) over the box's own
# three edge directions, as a markups ROI's corners are; two corners are joined
# by an edge when their indices differ in exactly one bit.
_BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def box_corners(corner_a: Sequence[float], corner_b: Sequence[float]) -> np.ndarray:
    """The eight RAS corners (8, 3) of the RAS-aligned box spanned by two opposite corners."""
    low = np.minimum(np.asarray(corner_a, dtype=np.float64), np.asarray(corner_b, dtype=np.float64))
    high = np.maximum(np.asarray(corner_a, dtype=np.float64), np.asarray(corner_b, dtype=np.float64))
    return np.array(
        [
            [(low, high)[bx][0], (low, high)[by][1], (low, high)[bz][2]]
            for bx, by, bz in itertools.product((0, 1), repeat=3)
        ]
    )


def _roi_ijk(volume: Volume, corners_ras: np.ndarray) -> np.ndarray:
    corners = np.asarray(corners_ras, dtype=np.float64)
    if corners.shape != (8, 3) or not np.all(np.isfinite(corners)):
        raise PromptError("A 3D box needs eight finite RAS corners (or two opposite ones).")
    return volume.ras_to_ijk_points(corners)


def roi_slice_range(volume: Volume, corners_ras: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last slice index along ``axis`` that the 3D box reaches, within the volume."""
    ijk = _roi_ijk(volume, corners_ras)
    count = volume.dimensions[axis]
    first = int(np.ceil(ijk[:, axis].min() - 0.5))
    last = int(np.floor(ijk[:, axis].max() + 0.5))
    first, last = max(first, 0), min(last, count - 1)
    if first > last:
        raise PromptError(f"The 3D box lies outside the volume along IJK axis {'IJK'[axis]}; draw it over the image.")
    return first, last


def roi_footprint(volume: Volume, corners_ras: np.ndarray, plane: SlicePlane) -> np.ndarray | None:
    """The 2D box (x0, y0, x1, y1) that a 3D box covers on one slice, cut to the image; None if it misses.

    The box may be rotated against the volume: its section with the slice is the
    polygon where its edges cross the plane, and the footprint is that polygon's
    bounding box in the slice's pixel axes.
    """
    ijk = _roi_ijk(volume, corners_ras)
    values = ijk[:, plane.axis]
    # A slice within half a voxel of the box's face still belongs to it (see roi_slice_range).
    level = float(np.clip(plane.index, values.min(), values.max()))
    if abs(level - plane.index) > 0.5:
        return None
    crossings = [ijk[i] for i in range(8) if abs(values[i] - level) < 1e-9]
    for a, b in _BOX_EDGES:
        if (values[a] - level) * (values[b] - level) < 0:
            t = (level - values[a]) / (values[b] - values[a])
            crossings.append(ijk[a] + t * (ijk[b] - ijk[a]))
    if not crossings:
        return None
    xy = plane.ijk_to_xy(np.array(crossings))
    rows, cols = plane.shape(volume)
    low = np.clip(xy.min(axis=0), 0.0, [cols - 1, rows - 1])
    high = np.clip(xy.max(axis=0), 0.0, [cols - 1, rows - 1])
    if np.any(xy.max(axis=0) < 0) or np.any(xy.min(axis=0) > [cols - 1, rows - 1]):
        return None
    return np.concatenate([low, high]).astype(np.float32)


def box_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The pixels a 2D box (x0, y0, x1, y1) covers: those whose centre lies within half a pixel of it."""
    rows, cols = shape
    keep = np.zeros(shape, dtype=bool)
    x0, y0 = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    x1, y1 = int(np.ceil(box[2] - 0.5)), int(np.ceil(box[3] - 0.5))
    keep[max(0, y0) : min(rows, y1 + 1), max(0, x0) : min(cols, x1 + 1)] = True
    return keep
