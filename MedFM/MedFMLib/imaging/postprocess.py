"""Clean-ups of a finished 3D mask: keep what the prompts touch, fill holes.

Both work on the (K, J, I) voxel grid. Connectivity is 3D with face
neighbours only (6-connectivity), so that two objects touching at an edge or a
corner, which happens between slices of an anisotropic volume, are not merged.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def keep_touching_components(mask: np.ndarray, seeds_kji: Iterable[tuple[int, int, int]] | np.ndarray) -> np.ndarray:
    """Keep the 3D connected components of ``mask`` that contain a seed voxel; the rest is removed.

    ``seeds_kji`` are voxel indices (k, j, i), or a boolean (K, J, I) array of
    seed voxels (for example the slices the user prompted). Without any seed
    inside the mask, the mask is returned unchanged: removing everything would
    only lose work.
    """
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    components = sitk.ConnectedComponentImageFilter()
    components.SetFullyConnected(False)
    labels = sitk.GetArrayFromImage(components.Execute(sitk.GetImageFromArray(mask.astype(np.uint8))))
    if isinstance(seeds_kji, np.ndarray) and seeds_kji.dtype == bool:
        touched = np.unique(labels[seeds_kji & mask])
    else:
        seeds = np.asarray(list(seeds_kji), dtype=np.int64).reshape(-1, 3)
        inside = np.all((seeds >= 0) & (seeds < mask.shape), axis=1)
        seeds = seeds[inside]
        touched = np.unique(labels[seeds[:, 0], seeds[:, 1], seeds[:, 2]]) if len(seeds) else np.array([], int)
    touched = touched[touched > 0]
    if len(touched) == 0:
        return mask.copy()
    return np.isin(labels, touched)


def fill_holes(mask: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Fill holes: enclosed background in each slice across IJK ``axis``, or in 3D when ``axis`` is None.

    Slice-wise filling is what a reader sees as a hole: a gap inside the
    object on the slice they look at, even where it opens to another slice.
    """
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)

    def filled(array: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        return sitk.GetArrayFromImage(sitk.BinaryFillhole(image, fullyConnected=False)).astype(bool)

    if axis is None:
        return filled(mask)
    result = mask.copy()
    array_axis = 2 - axis  # the array is (K, J, I)
    for index in range(mask.shape[array_axis]):
        selector = [slice(None)] * 3
        selector[array_axis] = index
        plane = mask[tuple(selector)]
        if plane.any():
            result[tuple(selector)] = filled(plane)
    return result
