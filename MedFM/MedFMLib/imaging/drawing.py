"""Scribbles and lassos as voxels: a drawn stroke's line, and a polygon's inside on its slice.

Coordinates are continuous voxel indices in the array's own (K, J, I) order.
"""

from __future__ import annotations

import numpy as np

from ..errors import PromptError


def polyline_voxels(points: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels (M, 3) int a polyline passes through, sampled finer than a voxel so that no gap is left."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    samples = [points[:1]]
    for start, end in zip(points[:-1], points[1:]):
        steps = max(1, int(np.ceil(np.abs(end - start).max() * 2)))
        fractions = np.arange(1, steps + 1)[:, None] / steps
        samples.append(start + fractions * (end - start))
    voxels = np.rint(np.concatenate(samples)).astype(np.int64)
    voxels = np.clip(voxels, 0, np.asarray(shape) - 1)
    return np.unique(voxels, axis=0)


def stroke_mask(points: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A (K, J, I) bool volume with the stroke's voxels set."""
    mask = np.zeros(shape, dtype=bool)
    voxels = polyline_voxels(points, shape)
    mask[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = True
    return mask


def lasso_axis(points: np.ndarray) -> int:
    """The array axis along which all of a lasso's points lie on one slice."""
    spread = np.ptp(np.asarray(points, dtype=np.float64).reshape(-1, 3), axis=0)
    flat = np.flatnonzero(spread < 0.5)
    if len(flat) == 0:
        raise PromptError("A lasso must be drawn on one slice; draw it again in one view.")
    return int(flat[np.argmin(spread[flat])])


def lasso_mask(points: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A (K, J, I) bool volume with the polygon's inside (its outline included) set on its slice."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    axis = lasso_axis(points)
    index = int(np.clip(np.rint(points[:, axis].mean()), 0, shape[axis] - 1))
    in_plane = [a for a in range(3) if a != axis]
    polygon = points[:, in_plane]
    rows_shape, cols_shape = shape[in_plane[0]], shape[in_plane[1]]
    low = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, None)
    high = np.minimum(np.ceil(polygon.max(axis=0)).astype(int), [rows_shape - 1, cols_shape - 1])
    rows, cols = np.mgrid[low[0] : high[0] + 1, low[1] : high[1] + 1]
    inside = _even_odd(rows.astype(np.float64), cols.astype(np.float64), polygon)
    plane = np.zeros((rows_shape, cols_shape), dtype=bool)
    plane[low[0] : high[0] + 1, low[1] : high[1] + 1] = inside
    closed = np.concatenate([points, points[:1]])
    outline = polyline_voxels(closed, shape)
    plane[outline[:, in_plane[0]], outline[:, in_plane[1]]] = True
    mask = np.zeros(shape, dtype=bool)
    index_slices = [slice(None)] * 3
    index_slices[axis] = index
    mask[tuple(index_slices)] = plane
    return mask


def _even_odd(rows: np.ndarray, cols: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Whether each (row, col) lies inside the polygon, by the even-odd rule (a ray along the columns)."""
    inside = np.zeros(rows.shape, dtype=bool)
    count = len(polygon)
    for n in range(count):
        (r0, c0), (r1, c1) = polygon[n], polygon[(n + 1) % count]
        crosses = (r0 > rows) != (r1 > rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = c0 + (rows - r0) * (c1 - c0) / (r1 - r0)
        inside ^= crosses & (cols < at)
    return inside
