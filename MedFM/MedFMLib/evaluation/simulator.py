"""The simulated user of the CVPR 2025 challenge: a box first, then clicks where the error is deepest.

- The box's slice range is exactly the object's; its 2D box is the object's bounding box on the median
  slice that contains it, each side widened by a random 0 to 6 pixels times dim/256 (seed 2025).
- Each click goes to the voxel of the largest 26-connected component of the error (prediction XOR
  reference) that lies deepest inside it (Euclidean distance in voxels); ties are broken with a fixed seed.
  It is positive where the reference holds the object, negative elsewhere.

Coordinates are array indices (k, j, i). SciPy does the connected components and the distance transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOX_SEED = 2025
CLICK_SEED = 42


@dataclass(frozen=True)
class Box3D:
    """Slices ``k0..k1`` (inclusive), and on them the box ``j0..j1`` x ``i0..i1`` (inclusive, array indices)."""

    k0: int
    k1: int
    j0: int
    j1: int
    i0: int
    i1: int
    #: the slice the 2D box was drawn on: the median of the object's slices (the challenge's z_mid)
    drawn_on: int | None = None

    @property
    def middle(self) -> int:
        return (self.k0 + self.k1) // 2


@dataclass(frozen=True)
class Click:
    kji: tuple[int, int, int]
    positive: bool


def challenge_box(reference: np.ndarray, rng: np.random.Generator | None = None) -> Box3D:
    """The step-1 box of an object (a non-empty (K, J, I) mask)."""
    rng = rng if rng is not None else np.random.default_rng(BOX_SEED)
    slices = np.flatnonzero(reference.any(axis=(1, 2)))
    median = int(slices[len(slices) // 2])
    rows, cols = np.nonzero(reference[median])
    _, height, width = reference.shape
    grow = [int(rng.integers(0, 7)) for _ in range(4)]
    j0 = max(0, int(rows.min()) - int(grow[0] * height / 256))
    j1 = min(height - 1, int(rows.max()) + int(grow[1] * height / 256))
    i0 = max(0, int(cols.min()) - int(grow[2] * width / 256))
    i1 = min(width - 1, int(cols.max()) + int(grow[3] * width / 256))
    return Box3D(int(slices[0]), int(slices[-1]), j0, j1, i0, i1, drawn_on=median)


def next_click(prediction: np.ndarray, reference: np.ndarray, rng: np.random.Generator | None = None) -> Click | None:
    """Where the simulated user clicks next; None when the prediction is already right."""
    from scipy import ndimage

    error = prediction != reference
    if not error.any():
        return None
    labels, count = ndimage.label(error, structure=np.ones((3, 3, 3), bool))  # 26-connected
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    # Distance to the nearest voxel outside the component, in voxels; padding makes the volume's edge count too.
    depth = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1, 1:-1]
    deepest = np.argwhere(depth == depth.max())
    rng = rng if rng is not None else np.random.default_rng(CLICK_SEED)
    k, j, i = (int(v) for v in deepest[rng.integers(len(deepest))])
    return Click((k, j, i), bool(reference[k, j, i]))
