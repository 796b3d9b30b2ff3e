"""The interactive session: prompts, refinement, undo and redo, several objects, several views."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from MedFMLib.engines import create_engine
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.errors import PromptError
from MedFMLib.imaging.geometry import extract_slice, plane_through
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.interaction.cache import EmbeddingCache
from MedFMLib.interaction.session import Session


class RecordingEngine(ClassicEngine):
    """The real classic engine, also recording what the session passes to it."""

    def __init__(self):
        super().__init__()
        self.encoded = 0
        self.decoded_with_logits: list[bool] = []

    def encode(self, image):
        self.encoded += 1
        return super().encode(image)

    def decode(self, embedding, prompts, previous_logits=None):
        self.decoded_with_logits.append(previous_logits is not None)
        prediction = super().decode(embedding, prompts, previous_logits)
        prediction.low_res_logits = np.zeros((1, 4, 4), np.float32)  # lets the test see the hand-over
        return prediction


def two_spheres():
    matrix = make_ijk_to_ras((0.9, 0.9, 2.0), (10.0, -20.0, 5.0), (10, 0, -20))
    a = matrix[:3, :3] @ np.array([14, 20, 8]) + matrix[:3, 3]
    b = matrix[:3, :3] @ np.array([34, 20, 8]) + matrix[:3, 3]
    volume, masks = render(
        (48, 40, 16), matrix, [Ellipsoid(tuple(a), (6, 6, 6), 300.0), Ellipsoid(tuple(b), (6, 6, 6), 300.0)]
    )
    return volume, masks, a, b


def test_each_click_refines_with_the_previous_logits_and_removal_starts_afresh():
    volume, masks, a, b = two_spheres()
    engine = RecordingEngine()
    session = Session(volume, engine)
    obj = session.add_object()
    first = session.add_point(obj, a)
    second = session.add_point(obj, b)
    assert engine.decoded_with_logits == [False, True]
    assert engine.encoded == 1  # the second click on the slice costs only the decoder
    plane = first.plane
    assert second.plane == plane
    both = extract_slice(masks[0] | masks[1], plane)
    np.testing.assert_array_equal(extract_slice(session.mask(obj), plane), both)
    # Removing a point decodes afresh from what is left.
    prompt_b = session.prompts(obj)[1]
    session.remove_prompt(obj, prompt_b.id)
    assert engine.decoded_with_logits[-1] is False
    np.testing.assert_array_equal(extract_slice(session.mask(obj), plane), extract_slice(masks[0], plane))


def test_undo_and_redo_restore_masks_exactly():
    volume, masks, a, b = two_spheres()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, a)
    after_one = session.mask(obj).copy()
    session.add_point(obj, b)
    after_two = session.mask(obj).copy()
    assert after_two.sum() > after_one.sum()

    session.undo()
    np.testing.assert_array_equal(session.mask(obj), after_one)
    assert len(session.prompts(obj)) == 1
    session.undo()
    assert not session.mask(obj).any() and session.prompts(obj) == [] and not session.can_undo
    session.redo()
    session.redo()
    np.testing.assert_array_equal(session.mask(obj), after_two)
    assert not session.can_redo
    # A new action after an undo drops the redo branch.
    session.undo()
    session.add_point(obj, b, positive=False)
    assert not session.can_redo


def test_move_a_point_within_and_across_slices():
    volume, masks, a, b = two_spheres()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, a)
    point_id = session.prompts(obj)[0].id
    session.move_prompt(obj, point_id, b)
    plane = plane_through(volume, b, "axial")
    np.testing.assert_array_equal(extract_slice(session.mask(obj), plane), extract_slice(masks[1], plane))
    assert not (session.mask(obj) & masks[0]).any()
    # Moving to another slice takes the point off its old slice.
    above = volume.ijk_to_ras_points(volume.ras_to_ijk_points(b) + np.array([0, 0, 2.0]))
    updates = session.move_prompt(obj, point_id, above)
    assert [u.plane.index for u in updates] == [plane.index, plane.index + 2]
    assert not extract_slice(session.mask(obj), plane).any()
    assert extract_slice(session.mask(obj), updates[1].plane).any()
    session.undo()
    np.testing.assert_array_equal(extract_slice(session.mask(obj), plane), extract_slice(masks[1], plane))


def test_one_box_per_object():
    volume, masks, a, b = two_spheres()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    ijk = volume.ras_to_ijk_points(a)
    corner1 = volume.ijk_to_ras_points(ijk + np.array([-8, -8, 0]))
    corner2 = volume.ijk_to_ras_points(ijk + np.array([8, 8, 0]))
    update = session.set_box(obj, corner1, corner2)
    np.testing.assert_array_equal(update.mask, extract_slice(masks[0], update.plane))
    # A box on another slice replaces the first one.
    other = volume.ijk_to_ras_points(ijk + np.array([[-8, -8, 1], [8, 8, 1]]))
    session.set_box(obj, other[0], other[1])
    boxes = [p for p in session.prompts(obj) if hasattr(p, "corner_a")]
    assert len(boxes) == 1
    assert not extract_slice(session.mask(obj), update.plane).any()
    with pytest.raises(PromptError, match="different slices"):
        session.set_box(obj, corner1, volume.ijk_to_ras_points(ijk + np.array([8, 8, 3])))
    # Dragging the whole box back onto the sphere's slice.
    moved = session.move_box(obj, corner1, corner2)
    np.testing.assert_array_equal(moved.mask, extract_slice(masks[0], update.plane))
    assert len(session.prompts(obj)) == 1
    # Clearing the object is one undoable step.
    session.clear_object(obj)
    assert not session.mask(obj).any() and session.prompts(obj) == []
    session.undo()
    np.testing.assert_array_equal(extract_slice(session.mask(obj), update.plane), extract_slice(masks[0], update.plane))


def test_objects_are_independent_and_form_a_labelmap():
    volume, masks, a, b = two_spheres()
    session = Session(volume, ClassicEngine())
    first, second = session.add_object("left"), session.add_object("right")
    session.add_point(first, a)
    session.add_point(second, b)
    assert not (session.mask(first) & session.mask(second)).any()
    labels = session.labelmap()
    assert set(np.unique(labels)) == {0, first, second}
    session.remove_object(first)
    assert not session.can_redo and session.can_undo
    session.undo()  # the remaining history belongs to the second object
    assert not session.mask(second).any()
    with pytest.raises(PromptError, match="no object"):
        session.add_point(first, a)


def test_clicks_in_three_views_unite_and_undo_per_view():
    volume, sphere, centre = sphere_volume("oblique_anisotropic")
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    planes = [session.add_point(obj, centre, view=view).plane for view in ("axial", "coronal", "sagittal")]
    mask = session.mask(obj)
    for plane in planes:
        np.testing.assert_array_equal(extract_slice(mask, plane), extract_slice(sphere, plane))
    session.undo()  # removes the sagittal plane's own mask, but keeps where the others cross it
    only_others = np.zeros_like(mask)
    for plane in planes[:2]:
        only_others[plane.array_index()] = extract_slice(sphere, plane)
    sagittal = extract_slice(session.mask(obj), planes[2])
    np.testing.assert_array_equal(sagittal, extract_slice(only_others, planes[2]))
    assert 0 < sagittal.sum() < extract_slice(sphere, planes[2]).sum()
    np.testing.assert_array_equal(extract_slice(session.mask(obj), planes[0]), extract_slice(sphere, planes[0]))


def test_failed_prompt_changes_nothing(tiny_sam):
    volume, _, centre = sphere_volume("ras_aligned")
    session = Session(volume, create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu"))
    obj = session.add_object()
    with pytest.raises(PromptError, match="box"):
        session.add_point(obj, centre)
    assert session.prompts(obj) == [] and not session.can_undo and not session.mask(obj).any()


def test_sam_session_end_to_end_with_cache(tiny_sam):
    volume, _, centre = sphere_volume("oblique_lps", noise_sd=3.0)
    cache = EmbeddingCache()
    session = Session(volume, create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu"), cache=cache)
    obj = session.add_object()
    first = session.add_point(obj, centre, view="coronal")
    assert first.mask.shape == first.plane.shape(volume)
    assert cache.stats.misses == 1
    session.add_point(obj, volume.ijk_to_ras_points(volume.ras_to_ijk_points(centre) + [2, 0, 0]), view="coronal")
    assert cache.stats.misses == 1 and cache.stats.hits == 1
    state = session.objects[obj].slices[first.plane]
    assert state.logits is not None and state.logits.shape == (1, 64, 64)
    # The 3D mask holds exactly the decoded slice.
    np.testing.assert_array_equal(extract_slice(session.mask(obj), first.plane), state.mask)
    assert session.mask(obj).sum() == state.mask.sum()
