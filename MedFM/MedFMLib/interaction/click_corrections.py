"""Clicks on a box-only model's mask (MedSAM, LiteMedSAM): a click the model leaves unanswered corrects the
mask around it, by the image.

Such a model was trained on boxes and reads no click, so a click can only move its box (``box_prompts.py``).
On real scans that often changes nothing: a negative click in the middle of a leak, or a positive one in a
missed part inside the box, leaves the box and the answer as they were. Under the CVPR 2025 protocol, brain2
got five negative clicks on the same voxel, and the mask never changed.

So after the model has answered, each click whose pixel still has the wrong value edits the mask near it.
A random walker (scikit-image) decides those pixels between two kinds of seed:

* the object: positive clicks, and the model's mask a little inside its border, but not near a negative
  click (there the mask is what the click says is wrong);
* the background: negative clicks, and the tissue a little outside the mask, but not near a positive click
  (there the object reaches further than the mask).

"Near" scales with the click's depth: its distance to the mask's border, inside for a negative click and
outside for a positive one. Pixels farther from every contradicted click keep the model's answer, so a click
corrects its neighbourhood and not the whole outline. It needs no weights and is deterministic.

Measured under ``medfm evaluate --protocol cvpr25`` with LiteMedSAM, final DSC before → after: brain1
0.763 → 0.735, breast1 0.575 → 0.702, and on three cases held out of the repository brain2 0.612 → 0.670,
lung1 0.861 → 0.870, lung2 0.805 → 0.878.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..imaging.geometry import SlicePlane, point_on_plane
from ..imaging.volume import Volume

#: a contradicted click corrects the pixels within this many times its depth
REACH = 3.0
#: near a contradicted click (this many times its depth) the mask is not a seed of its own side
DISTRUST = 2.0
#: depths below this (pixels) count as this: a click on the mask's border still speaks for a neighbourhood
MIN_DEPTH = 2.0
#: seeds keep this far (pixels) from the mask's border, where partial volume blurs the edge
BORDER = 2.0
#: a click seeds a disc this wide (pixels)
CLICK_RADIUS = 1.0
#: the walker runs on the pixels it decides and this many more on every side
WINDOW_MARGIN = 4
#: a larger window is walked on a grid coarsened to about this many pixels (a 512×512 leak took 0.6-0.8 s)
MAX_WALKER_PIXELS = 40_000

Click = tuple[int, int, bool]  # (row, column, positive) on a slice's own pixel grid


def clicks_on_slice(volume: Volume, plane: SlicePlane, points: Sequence) -> list[Click]:
    """The user's points (``PointPrompt``, RAS) as pixels of the plane's slice, clipped onto it."""
    rows, cols = plane.shape(volume)
    clicks = []
    for point in points:
        x, y = point_on_plane(volume, plane, point.ras)
        clicks.append((int(np.clip(round(y), 0, rows - 1)), int(np.clip(round(x), 0, cols - 1)), bool(point.positive)))
    return clicks


def correction_available() -> bool:
    """Whether SciPy and scikit-image are installed (the ``sam`` extra brings them); without them clicks only
    move the box, and the note on an unanswered click says what to install."""
    try:
        from scipy import ndimage  # noqa: F401
        from skimage.segmentation import random_walker  # noqa: F401
    except ImportError:
        return False
    return True


def contradicted(mask: np.ndarray, clicks: Sequence[Click]) -> list[Click]:
    """The clicks whose pixel the mask gets wrong: a positive one outside it, a negative one inside it."""
    return [(row, col, positive) for row, col, positive in clicks if bool(mask[row, col]) != positive]


def _disc(shape: tuple[int, int], row: int, col: int, radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - row) ** 2 + (cols - col) ** 2 <= radius**2


def corrected_by_clicks(image: np.ndarray, mask: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """``mask`` corrected near each click it contradicts (see the module's docstring); the mask itself when no
    click contradicts it, when it is empty (there is no object to learn from), when a side has no seed, or
    when scikit-image is not installed."""
    mask = np.asarray(mask, dtype=bool)
    wrong = contradicted(mask, clicks)
    if not wrong or not mask.any() or not correction_available():
        return mask
    from scipy import ndimage

    depth_inside = ndimage.distance_transform_edt(mask)
    depth_outside = ndimage.distance_transform_edt(~mask)
    near = np.zeros_like(mask)
    object_seeds = mask & (depth_inside >= BORDER)
    background_seeds = ~mask & (depth_outside >= BORDER)
    for row, col, positive in wrong:
        depth = max(MIN_DEPTH, float((depth_outside if positive else depth_inside)[row, col]))
        near |= _disc(mask.shape, row, col, REACH * depth)
        distrusted = _disc(mask.shape, row, col, DISTRUST * depth)
        if positive:
            background_seeds &= ~distrusted
        else:
            object_seeds &= ~distrusted
    for row, col, positive in clicks:  # every click of the slice seeds its side, answered or not
        seed = _disc(mask.shape, row, col, CLICK_RADIUS)
        object_seeds, background_seeds = (object_seeds | seed, background_seeds & ~seed) if positive else (
            object_seeds & ~seed, background_seeds | seed)  # fmt: skip
    # The walker needs only the pixels it decides, and a margin of seeds around them.
    rows, cols = np.nonzero(near)
    top, left = max(0, rows.min() - WINDOW_MARGIN), max(0, cols.min() - WINDOW_MARGIN)
    window = (slice(top, rows.max() + WINDOW_MARGIN + 1), slice(left, cols.max() + WINDOW_MARGIN + 1))
    markers = np.zeros(mask[window].shape, np.int32)
    markers[background_seeds[window]] = 2
    markers[object_seeds[window]] = 1
    crop = np.asarray(image[window], np.float64)
    if not (markers == 1).any() or not (markers == 2).any() or np.ptp(crop) == 0:
        return mask  # a side without a seed, or a flat image: nothing to decide by
    corrected = mask.copy()
    decided = near[window]
    corrected[window][decided] = _object_side(crop, markers)[decided]
    return corrected


def _object_side(image: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """The random walker's answer (True: the object's side), on a coarser grid when the window is large."""
    from skimage.segmentation import random_walker

    step = int(np.ceil(np.sqrt(image.size / MAX_WALKER_PIXELS)))
    with warnings.catch_warnings():
        # It warns about pixels no seed reaches (they keep the model's answer here) and about slow convergence.
        warnings.simplefilter("ignore")
        if step == 1:
            return random_walker(image, markers) == 1
        from skimage.measure import block_reduce
        from skimage.transform import resize

        # A coarse pixel is a seed where all of its fine pixels are seeds of that side.
        coarse = np.zeros(block_reduce(image, (step, step), np.mean).shape, np.int32)
        coarse[block_reduce(markers == 2, (step, step), np.min, cval=False)] = 2
        coarse[block_reduce(markers == 1, (step, step), np.min, cval=False)] = 1
        if not (coarse == 1).any() or not (coarse == 2).any():
            return markers == 1
        chance = random_walker(block_reduce(image, (step, step), np.mean), coarse, return_full_prob=True)[0]
    side = resize(chance, image.shape, order=1, mode="edge") > 0.5
    return (side | (markers == 1)) & (markers != 2)
