"""A click a box-only model leaves unanswered corrects its mask around the click, by the image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.imaging.phantoms import make_ijk_to_ras
from MedFMLib.imaging.volume import Volume
from MedFMLib.interaction.click_corrections import MAX_WALKER_PIXELS, REACH, corrected_by_clicks
from MedFMLib.interaction.session import Session


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def _scene(scale: int = 1):
    """A bright object, a duller region touching it (what a model leaks into), and a small far blob."""
    rows, cols = np.mgrid[: 64 * scale, : 96 * scale] / scale
    obj = (rows - 32) ** 2 + (cols - 30) ** 2 <= 12**2
    leak = ((rows - 32) ** 2 + (cols - 48) ** 2 <= 8**2) & ~obj
    far = (rows - 8) ** 2 + (cols - 86) ** 2 <= 4**2
    image = np.where(obj | far, 0.8, np.where(leak, 0.45, 0.1))
    image = image + np.random.default_rng(0).normal(0.0, 0.02, image.shape)
    return image, obj, leak, far


@pytest.mark.parametrize("scale", [1, 6], ids=["walked-whole", "walked-on-a-coarser-grid"])
def test_a_negative_click_in_a_leak_removes_the_leak_and_keeps_the_object(scale):
    image, obj, leak, far = _scene(scale)
    mask = obj | leak | far
    click = (32 * scale, 50 * scale, False)
    if scale > 1:  # the window the walker decides is larger than it walks at full resolution
        depth = ndimage.distance_transform_edt(mask)[click[:2]]
        assert (2 * REACH * depth) ** 2 > MAX_WALKER_PIXELS
    corrected = corrected_by_clicks(image, mask, [click])
    assert not corrected[click[:2]]
    assert (corrected & leak).sum() <= 0.1 * leak.sum(), (corrected & leak).sum()
    assert dice(corrected & ~far, obj) >= 0.97
    # The click corrects its neighbourhood only: the far blob, beyond its reach, keeps the model's answer.
    np.testing.assert_array_equal(corrected[far], True)


def test_a_positive_click_in_a_missed_part_adds_that_part():
    image, obj, leak, _ = _scene()
    image = np.where(leak, 0.8, image)  # now the part the model missed looks like the object
    truth = obj | leak
    corrected = corrected_by_clicks(image, obj, [(32, 52, True)])
    assert corrected[32, 52]
    assert dice(corrected, truth) >= 0.95, dice(corrected, truth)
    assert dice(obj, truth) < 0.85  # what the model gave


def test_only_pixels_near_a_contradicted_click_change():
    """A model's outline a pixel too wide all round: the click corrects its neighbourhood, and leaves the rest."""
    image, obj, leak, far = _scene()
    mask = ndimage.binary_dilation(obj | leak | far)
    rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
    depth = ndimage.distance_transform_edt(mask)[32, 50]  # the click's distance to the mask's border
    corrected = corrected_by_clicks(image, mask, [(32, 50, False)])
    beyond = (rows - 32) ** 2 + (cols - 50) ** 2 > (REACH * depth + 1) ** 2
    np.testing.assert_array_equal(corrected[beyond], mask[beyond])
    assert (corrected != mask).any()


def test_a_mask_no_click_contradicts_or_nothing_to_go_by_is_kept():
    image, obj, leak, _ = _scene()
    # Clicks the mask already agrees with: nothing to correct.
    np.testing.assert_array_equal(corrected_by_clicks(image, obj, [(32, 30, True), (32, 50, False)]), obj)
    # No mask: there is no object to learn from.
    empty = np.zeros_like(obj)
    np.testing.assert_array_equal(corrected_by_clicks(image, empty, [(32, 30, True)]), empty)
    # A flat image has no edge to decide by.
    flat = np.full(image.shape, 0.5)
    np.testing.assert_array_equal(corrected_by_clicks(flat, obj | leak, [(32, 50, False)]), obj | leak)


class BoxOnlyClassic(ClassicEngine):
    """The weight-free engine read as a box-only model (as MedSAM is): it is given the box alone, and fills it."""

    prompt_types = ("box",)
    box_is_extent = True


def _boxed_session(image: np.ndarray):
    """A session on three copies of ``image``, with a box around the scene's object and leak on the middle one."""
    volume = Volume(np.repeat(image[None] * 1000.0, 3, axis=0), make_ijk_to_ras((1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    session = Session(volume, BoxOnlyClassic())
    obj = session.add_object()
    corners = volume.ijk_to_ras_points(np.array([[14.0, 16.0, 1.0], [60.0, 48.0, 1.0]]))  # (i, j, k)
    session.set_box(obj, corners[0], corners[1], view="axial")
    plane, boxed = next(iter(session.objects[obj].slices.items()))
    return session, obj, plane, boxed


def _click(session, obj, row: int, col: int, positive: bool):
    return session.add_point(obj, session.volume.ijk_to_ras_points(np.array([[col, row, 1.0]]))[0], positive=positive,
                             view="axial")  # fmt: skip


def test_a_box_only_model_session_corrects_its_mask_around_a_negative_click():
    """Through the session: the model's answer leaks, and a negative click in the leak removes it. No side of
    the box moves past the click (that would cut a quarter of the mask), so the model alone gives the same leak."""
    image, obj_truth, leak, _ = _scene()
    session, obj, plane, boxed = _boxed_session(image)
    assert dice(boxed.mask, obj_truth | leak) > 0.97  # the model filled the object and the leak
    update = _click(session, obj, 32, 44, positive=False)
    clicked = session.objects[obj].slices[plane]
    assert dice(clicked.mask, obj_truth) >= 0.95, dice(clicked.mask, obj_truth)
    assert update.note == ""  # the click was answered
    np.testing.assert_array_equal(session.objects[obj].mask[1], clicked.mask)  # and written into the object


def test_a_click_that_nothing_can_answer_is_said_so():
    """On a flat image there is no edge to correct by: the mask stays, and the user is told why and what to do."""
    image, obj_truth, leak, _ = _scene()
    session, obj, plane, boxed = _boxed_session(np.full(image.shape, 0.5))
    update = _click(session, obj, 32, 37, positive=False)  # the box's middle: no side moves past it
    np.testing.assert_array_equal(session.objects[obj].slices[plane].mask, boxed.mask)
    assert boxed.mask[32, 37]
    assert "reads boxes only" in update.note and "redraw the box" in update.note


def test_without_scikit_image_a_click_only_moves_the_box_and_the_note_says_what_to_install(monkeypatch):
    """An install from before scikit-image joined the ``sam`` extra: no traceback, the mask kept, one clear line."""
    import sys

    image, obj_truth, leak, _ = _scene()
    session, obj, plane, boxed = _boxed_session(image)
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)  # what Python does for a missing package
    update = _click(session, obj, 32, 44, positive=False)
    np.testing.assert_array_equal(session.objects[obj].slices[plane].mask, boxed.mask)
    assert "install scikit-image" in update.note
