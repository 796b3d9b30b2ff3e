"""The protocols: how a simulated user prompts a MedFM session, step by step, and what each step scores.

``cvpr25`` (3D): a box, then clicks. Slice engines get them as a user gives them: the box becomes a 3D box
(segmented from its middle slice outwards, within its slice range), and each click a point on its slice in
the box's view; that slice becomes an anchor, and propagation runs again from it.

A 3D model (nnInteractive, VISTA3D) gets them directly, as the challenge gave them: the box as a 2D box on
the object's median slice (VISTA3D takes boxes as clicks), then each click as a 3D point; its answer is
already 3D, so nothing propagates.

``ritm`` (2D, per labelled slice): up to 20 clicks, each at the deepest point of the larger of the missed
and the wrongly added regions (the first one deep inside the object); scored by the clicks needed to reach
IoU 0.85 and 0.90 (20 when never reached) and the mean IoU after k clicks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..imaging.geometry import SlicePlane
from ..imaging.volume import Volume
from ..interaction.propagation import PropagationOptions, StopCriteria
from .metrics import area_under_steps, dsc_and_nsd
from .simulator import BOX_SEED, CLICK_SEED, challenge_box, next_click

PROTOCOLS = ("cvpr25", "ritm")
#: the IJK axis the boxes and clicks are on: K, the slices of the stored volume
SLICE_AXIS = 2
#: The challenge draws its box on the object's median slice and gives it exactly the object's slice range: the
#: box's outline holds on that slice only, the other slices are bounded by the range, and as the object is on
#: every slice of it, a walk goes on to the range's end unless the model finds nothing at all.
CHALLENGE_BOX = PropagationOptions(
    roi_bounds_footprint=False,
    # Finite values: the options also travel to a MedFM server as JSON.
    criteria=StopCriteria(min_area_pixels=1, min_area_ratio=0.0, min_score=-1e9, min_overlap=0.0,
                          max_area_ratio=1000.0, growth_allowance_pixels=0, min_object_fraction=0.0),
)  # fmt: skip


@dataclass
class ObjectResult:
    label: int
    steps: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def array_spacing(volume: Volume) -> tuple[float, float, float]:
    """Millimetres along the array's axes (K, J, I): the lengths of the IJK→RAS matrix's columns, reversed."""
    return tuple(float(v) for v in np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)[::-1])


def _ras(volume: Volume, k: float, j: float, i: float) -> np.ndarray:
    return volume.ijk_to_ras_points(np.array([i, j, k], dtype=np.float64))


def run_cvpr25(
    session, volume: Volume, labels: np.ndarray, clicks: int = 5, tolerance_mm: float = 2.0,
    on_step: Callable[[], None] | None = None,
) -> tuple[list[ObjectResult], np.ndarray]:  # fmt: skip
    """A box, then ``clicks`` clicks, for every object of a label map; (results, final label map)."""
    spacing = array_spacing(volume)
    box_rng, click_rng = np.random.default_rng(BOX_SEED), np.random.default_rng(CLICK_SEED)
    results, final = [], np.zeros(labels.shape, np.int32)
    for value in sorted(int(v) for v in np.unique(labels) if v > 0):
        reference = labels == value
        result = ObjectResult(value)
        object_id = session.add_object(f"label {value}")
        started = time.perf_counter()
        box = challenge_box(reference, box_rng)
        volumetric = getattr(session, "volumetric", False)
        if volumetric:
            k = box.drawn_on if box.drawn_on is not None else box.middle
            corner_a, corner_b = _ras(volume, k, box.j0, box.i0), _ras(volume, k, box.j1, box.i1)
            session.set_box(object_id, corner_a, corner_b, view=SLICE_AXIS)
        else:
            corners = [_ras(volume, k, j, i) for k in (box.k0, box.k1) for j in (box.j0, box.j1)
                       for i in (box.i0, box.i1)]  # fmt: skip
            session.set_roi(object_id, corners, view=SLICE_AXIS, options=CHALLENGE_BOX)
        prediction = session.mask(object_id).copy()
        result.steps.append(_score("box", None, prediction, reference, spacing, tolerance_mm, started))
        if on_step is not None:
            on_step()
        for _ in range(clicks):
            click = next_click(prediction, reference, click_rng)
            started = time.perf_counter()  # the simulated user's choice is not the session's time
            if click is not None:
                k, j, i = click.kji
                session.add_point(object_id, _ras(volume, k, j, i), positive=click.positive, view=SLICE_AXIS)
                if not volumetric:
                    session.repropagate(object_id, SlicePlane(SLICE_AXIS, k), options=CHALLENGE_BOX)
                prediction = session.mask(object_id).copy()
            result.steps.append(_score("click", click, prediction, reference, spacing, tolerance_mm, started))
            if on_step is not None:
                on_step()
        clicked = result.steps[1:]
        result.summary = {
            "dsc_auc": area_under_steps([s["dsc"] for s in clicked]),
            "nsd_auc": area_under_steps([s["nsd"] for s in clicked]),
            "dsc_final": result.steps[-1]["dsc"],
            "nsd_final": result.steps[-1]["nsd"],
        }
        final[prediction] = value
        results.append(result)
    return results, final


def _score(kind, click, prediction, reference, spacing, tolerance_mm, started) -> dict:
    seconds = round(time.perf_counter() - started, 4)  # the session's time: scoring is not the user's wait
    dsc, nsd = dsc_and_nsd(prediction, reference, spacing, tolerance_mm)
    step = {"prompt": kind, "dsc": round(dsc, 6), "nsd": round(nsd, 6), "seconds": seconds}
    if click is not None:
        step["click"] = {"kji": list(click.kji), "positive": click.positive}
    return step


# ---------------------------------------------------------------------------------------------- ritm
RITM_CLICKS = 20


def ritm_click(prediction: np.ndarray, reference: np.ndarray, clicked: np.ndarray) -> tuple[tuple[int, int], bool]:
    """(row, col), positive: the deepest point of the larger error, missed or added (clicked pixels excluded)."""
    from scipy import ndimage

    def depth(region: np.ndarray) -> np.ndarray:
        inside = np.pad(region & ~clicked, 1)
        return ndimage.distance_transform_edt(inside)[1:-1, 1:-1]

    missed, added = depth(reference & ~prediction), depth(prediction & ~reference)
    positive = missed.max() > added.max()
    chosen = missed if positive else added
    row, col = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
    return (int(row), int(col)), bool(positive)


def run_ritm(
    session, volume: Volume, labels: np.ndarray, clicks: int = RITM_CLICKS, on_step: Callable[[], None] | None = None
) -> tuple[list[ObjectResult], np.ndarray]:
    """Per object, per labelled slice: clicks until IoU 0.90 or ``clicks``; NoC@85/90, NoF and mIoU@k."""
    results, final = [], np.zeros(labels.shape, np.int32)
    for value in sorted(int(v) for v in np.unique(labels) if v > 0):
        reference3d = labels == value
        result = ObjectResult(value)
        curves = []
        for k in np.flatnonzero(reference3d.any(axis=(1, 2))):
            object_id = session.add_object(f"label {value} slice {k}")
            reference = reference3d[k]
            prediction = np.zeros_like(reference)
            clicked = np.zeros_like(reference)
            curve = []
            for _ in range(clicks):
                (row, col), positive = ritm_click(prediction, reference, clicked)
                started = time.perf_counter()
                clicked[row, col] = True
                session.add_point(object_id, _ras(volume, k, row, col), positive=positive, view=SLICE_AXIS)
                prediction = session.mask(object_id)[k]
                iou = float((prediction & reference).sum()) / max(1, int((prediction | reference).sum()))
                curve.append(iou)
                seconds = round(time.perf_counter() - started, 4)
                result.steps.append({"slice": int(k), "click": [int(row), int(col)], "positive": positive,
                                     "iou": round(iou, 6), "seconds": seconds})  # fmt: skip
                if on_step is not None:
                    on_step()
                if iou >= 0.90:
                    break
            final[k][prediction] = value
            session.remove_object(object_id)  # each slice is its own object; keep the session small
            curves.append(curve)
        result.summary = ritm_summary(curves, clicks)
        results.append(result)
    return results, final


def ritm_summary(curves: list[list[float]], clicks: int = RITM_CLICKS) -> dict:
    """NoC@85 and NoC@90 (clicks to reach the IoU, ``clicks`` when never), NoF (never reached 0.90), mIoU@k."""

    def noc(curve, threshold):
        return next((n + 1 for n, iou in enumerate(curve) if iou >= threshold), clicks)

    padded = [curve + [curve[-1]] * (clicks - len(curve)) for curve in curves]  # reached: it stays there
    return {
        "noc85": float(np.mean([noc(c, 0.85) for c in curves])),
        "noc90": float(np.mean([noc(c, 0.90) for c in curves])),
        "nof90": int(sum(noc(c, 0.90) == clicks and c[-1] < 0.90 for c in curves)),
        "miou_at": {str(k): float(np.mean([c[k - 1] for c in padded])) for k in (1, 3, 5, 10, clicks)},
        "slices": len(curves),
    }
