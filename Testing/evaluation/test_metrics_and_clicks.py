"""The evaluation's instruments: MONAI's metrics against shapes whose answers are known exactly, and the
simulated user's box and clicks on shapes where the right box and click are known."""

from __future__ import annotations

import numpy as np
import pytest

from MedFMLib.evaluation.metrics import area_under_steps, dice, dsc_and_nsd, surface_dice
from MedFMLib.evaluation.simulator import Box3D, challenge_box, next_click


def cube(shape=(40, 40, 50), low=(10, 10, 10), size=(20, 20, 20)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[low[0] : low[0] + size[0], low[1] : low[1] + size[1], low[2] : low[2] + size[2]] = True
    return mask


def test_dice_of_cubes_worked_out_by_hand():
    a = cube()
    b = cube(size=(20, 20, 25))  # 8000 and 10000 voxels, overlapping in 8000
    assert dice(a, b) == pytest.approx(16000 / 18000)
    assert dice(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_surface_dice_of_cubes_worked_out_by_hand():
    a, spacing = cube(), (1.0, 1.0, 1.0)
    assert surface_dice(a, a, spacing) == pytest.approx(1.0)
    # One voxel larger all round: every surface element within 1 mm of the other surface.
    assert surface_dice(a, cube(low=(9, 9, 9), size=(22, 22, 22)), spacing) == pytest.approx(1.0)
    # Five voxels larger all round: every element 5 mm or more from the other surface, beyond 2 mm.
    assert surface_dice(a, cube(low=(5, 5, 5), size=(30, 30, 30)), spacing) == pytest.approx(0.0)
    # Two cubes, one matched exactly and one answered by a cube 5 voxels larger all round: the surfaces of the
    # first pair (2 x 2400 mm²) are within, those of the second (2400 and 5400 mm²) are not: 4800 / 12600
    # (to 0.5 %: the surface-element method bevels the cubes' edges and corners, which shifts their areas).
    shape = (40, 40, 100)
    reference = cube(shape, (10, 10, 10)) | cube(shape, (10, 10, 60))
    prediction = cube(shape, (10, 10, 10)) | cube(shape, (5, 5, 55), (30, 30, 30))
    assert surface_dice(prediction, reference, spacing) == pytest.approx(4800 / 12600, rel=5e-3)
    # Spacing counts: at 0.2 mm voxels the second pair is 1 mm apart (corner to corner 1.7 mm), within 2 mm.
    assert surface_dice(prediction, reference, (0.2, 0.2, 0.2)) == pytest.approx(1.0)


def test_nsd_is_zero_below_the_dice_floor_and_the_area_is_a_trapezoid():
    a = cube()
    sliver = cube(size=(20, 20, 2))  # Dice 2 x 800 / 8800 = 0.18
    assert dsc_and_nsd(sliver, a, (1, 1, 1)) == (pytest.approx(1600 / 8800), 0.0)
    assert area_under_steps([0.5, 0.7, 0.8, 0.8, 0.9]) == pytest.approx(0.6 + 0.75 + 0.8 + 0.85)


def test_the_box_spans_the_objects_slices_and_its_bounding_box_on_the_median_slice():
    reference = np.zeros((30, 256, 256), bool)
    reference[5:10, 100:150, 60:90] = True  # slices 5 to 9
    reference[12:16, 20:30, 20:30] = True  # slices 12 to 15: a second part (the median slice is 9)
    box = challenge_box(reference)
    assert (box.k0, box.k1) == (5, 15) and box.middle == 10
    # On slice 9 the object spans rows 100-149 and columns 60-89; each side grows by 0 to 6 pixels.
    assert 94 <= box.j0 <= 100 and 149 <= box.j1 <= 155 and 54 <= box.i0 <= 60 and 89 <= box.i1 <= 95
    assert challenge_box(reference) == box  # seeded: the same box every time
    assert isinstance(box, Box3D)


def test_a_click_goes_to_the_deepest_point_of_the_largest_error():
    reference = cube()
    prediction = np.zeros_like(reference)
    click = next_click(prediction, reference)
    # The whole cube is missed: the deepest point is its centre (a 2 x 2 x 2 tie at 19-20, broken by a seed).
    assert click.positive and all(19 <= v <= 20 for v in click.kji)
    # A false positive larger than the miss: a negative click in its middle.
    prediction = reference.copy()
    prediction[0:6, 0:40, 0:50] = True  # 6 x 40 x 50 wrongly marked (12000 voxels, larger than anything else)
    prediction[12:14, 12:14, 12:14] = False  # a small miss inside the cube
    click = next_click(prediction, reference)
    assert not click.positive and click.kji[0] in (2, 3)  # the middle of the 6-slice-thick slab
    assert next_click(reference, reference) is None
