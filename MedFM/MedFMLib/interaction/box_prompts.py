"""How a box-prompted model (MedSAM, LiteMedSAM) takes clicks: through its box, its only lever.

Such a model was trained on boxes alone, so a click changes the box: a positive click outside it grows
the box to hold it (see ``Session.slice_prompts``), a negative click inside it moves the box's nearest
side past it, and a click on a slice without a box borrows the nearest segmented slice's box. A click the
model's answer still contradicts then corrects the mask around it (``click_corrections.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..engines.base import Prompts2D
from ..imaging.geometry import SlicePlane
from .click_corrections import contradicted, correction_available
from .objects import SliceState

#: a negative click moves a side only past a fringe of the mask: at most this share of it left outside
MAX_CUT_SHARE = 0.1


def unanswered_click_note(model_name: str, after: SliceState | None, click: tuple[int, int, bool]) -> str:
    """What to tell a user whose click the mask still contradicts ("" when it agrees with the click).

    A click moves the box where it can, and corrects the mask around it (``click_corrections.py``); when
    neither could (a flat image, or a click in the middle of the only object there is), the mask stays as
    it was, and a silent click reads as a broken tool. ``click``: (row, column, positive) on the slice.
    """
    if after is None or after.mask is None or not contradicted(after.mask, [click]):
        return ""
    if not correction_available():
        return (f"{model_name} reads boxes only, and this click moved no side of the box: install scikit-image "
                f"(pip install scikit-image) so that clicks correct the mask, or redraw the box.")  # fmt: skip
    return (f"{model_name} reads boxes only, and neither its box nor the image around this click could "
            f"change the mask there: redraw the box, or use a model that reads clicks (SAM, classic).")  # fmt: skip


def _share_outside(mask: np.ndarray, box: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return 0.0
    inside = (cols >= box[0]) & (cols <= box[2]) & (rows >= box[1]) & (rows <= box[3])
    return 1.0 - float(inside.mean())


def box_without_negatives(
    box: np.ndarray, points: Sequence, labels: Sequence[int], mask: np.ndarray | None = None
) -> np.ndarray:
    """Each negative click inside the box moves the box's nearest side past it, unless that would leave out a
    positive click, make the box thinner than 2 pixels, or (given the slice's ``mask``) leave more than
    ``MAX_CUT_SHARE`` of the mask outside (then the next nearest side moves; none may: the box stays)."""
    box = np.asarray(box, np.float32).copy()
    positives = [np.asarray(xy, np.float32) for xy, label in zip(points, labels) if label == 1]
    fringe_only = mask is not None and np.any(mask)
    for (x, y), label in zip(points, labels):
        if label == 1 or not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
            continue
        for side in sorted(range(4), key=lambda side: abs(box[side] - (x, y)[side % 2])):
            moved = box.copy()
            moved[side] = (x, y)[side % 2] + (1.0 if side < 2 else -1.0)
            keeps_positives = all(moved[0] <= px <= moved[2] and moved[1] <= py <= moved[3] for px, py in positives)
            # A click deep inside the object: the side would cut the object itself, and the model follows its box.
            keeps_object = not fringe_only or _share_outside(mask, moved) <= MAX_CUT_SHARE
            if moved[2] - moved[0] >= 2 and moved[3] - moved[1] >= 2 and keeps_positives and keeps_object:
                box = moved
                break
    return box


def box_from_neighbour(slices: Mapping[SlicePlane, SliceState], plane: SlicePlane) -> Prompts2D | None:
    """The box of the nearest segmented slice along the plane's axis, as carried prompts; None if there is none."""
    neighbours = [(abs(p.index - plane.index), p.index, p) for p, s in slices.items()
                  if p.axis == plane.axis and p != plane and s.mask is not None and s.mask.any()]  # fmt: skip
    if not neighbours:
        return None
    rows, cols = np.nonzero(slices[min(neighbours)[2]].mask)
    return Prompts2D(box=np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32))
