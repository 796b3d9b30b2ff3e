"""Sessions with a native 3D model: RAS prompts become voxel interactions, answers are 3D, undo restores them.

Run on a real nnInteractive inference session with a tiny random-weight model folder in the official
layout (its masks mean nothing; where prompts land, what is kept and restored does).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from MedFMLib.engines.volumetric import BOX, LASSO, POINT, SCRIBBLE
from MedFMLib.errors import PromptError
from MedFMLib.imaging.drawing import lasso_mask, stroke_mask
from MedFMLib.interaction.volume_session import VolumeSession


@pytest.fixture(scope="module")
def engine(tiny_volume_catalog):
    from MedFMLib.engines.nninteractive import NNInteractiveEngine

    return NNInteractiveEngine.from_folder(tiny_volume_catalog.parent / "nninteractive_tiny", autozoom=False)


@pytest.fixture(scope="module")
def phantom():
    volume, truth, centre = sphere_volume("oblique_lps", dims=(40, 36, 20), radius_mm=8.0, noise_sd=5.0)
    return volume, truth, centre


def ras_of(volume, k, j, i):
    return volume.ijk_to_ras_points(np.array([i, j, k], dtype=float))


def test_prompts_become_voxels_of_the_array_on_the_slice_drawn(engine, phantom):
    volume, _, _ = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    session.add_point(object_id, ras_of(volume, 10, 17, 21))
    point = session._interaction(session.volume_prompts(object_id)[0])
    assert point.kind == POINT and point.points.tolist() == [[10, 17, 21]]
    # A stroke drawn in a view stays on the slice of its first point, however the hand wobbles.
    wobbly = [ras_of(volume, 10.3, 12, 14), ras_of(volume, 9.8, 15, 18), ras_of(volume, 10.2, 18, 20)]
    session.add_scribble(object_id, wobbly, view=2)
    stroke = session._interaction(session.volume_prompts(object_id)[-1])
    assert stroke.kind == SCRIBBLE and set(stroke.points[:, 0]) == {10.0}
    np.testing.assert_allclose(stroke.points[:, 1:], [[12, 14], [15, 18], [18, 20]], atol=1e-6)
    session.set_box(object_id, ras_of(volume, 10, 8, 9), ras_of(volume, 10, 25, 30), view=2)
    box = session._interaction(session.volume_prompts(object_id)[-1])
    assert box.kind == BOX and box.is_2d_box and box.points.tolist() == [[10, 8, 9], [10, 25, 30]]


def test_each_answer_is_3d_and_the_session_mask_is_the_models(engine, phantom):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object("lesion")
    update = session.add_point(object_id, centre)
    assert update.object_id == object_id and update.mask.ndim == 3
    np.testing.assert_array_equal(session.mask(object_id), engine.mask)
    np.testing.assert_array_equal(session.mask(object_id)[update.region], update.mask)
    session.add_point(object_id, ras_of(volume, 2, 3, 3), positive=False)
    k, j, i = np.rint(volume.ras_to_ijk_points(centre)[::-1]).astype(int)
    around = [ras_of(volume, k, j + dj, i + di) for dj, di in ((-5, -5), (-5, 5), (5, 5), (5, -5))]
    session.add_lasso(object_id, around, view=2)
    np.testing.assert_array_equal(session.mask(object_id), engine.mask)
    assert [p.kind for p in session.volume_prompts(object_id)] == [POINT, POINT, LASSO]
    assert [p.positive for p in session.prompts(object_id)] == [True, False]  # what markups show


def test_undo_and_redo_restore_masks_and_prompts_and_the_model_resumes(engine, phantom):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    session.add_point(object_id, centre)
    first = session.mask(object_id).copy()
    session.add_point(object_id, ras_of(volume, 12, 20, 12))
    second = session.mask(object_id).copy()
    assert session.undo() and np.array_equal(session.mask(object_id), first)
    assert len(session.volume_prompts(object_id)) == 1
    assert session.redo() and np.array_equal(session.mask(object_id), second)
    session.undo()
    # After an undo the model starts again from the mask the user sees, not from the undone click.
    session.add_point(object_id, ras_of(volume, 8, 14, 25), positive=False)
    assert len(session.volume_prompts(object_id)) == 2 and not session.can_redo
    np.testing.assert_array_equal(session.mask(object_id), engine.mask)


def test_removing_or_moving_a_prompt_segments_again_from_the_others(engine, phantom):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    session.add_point(object_id, centre)
    only = session.mask(object_id).copy()
    session.add_point(object_id, ras_of(volume, 12, 20, 12), positive=False)
    negative_id = session.volume_prompts(object_id)[-1].id
    session.remove_prompt(object_id, negative_id)
    np.testing.assert_array_equal(session.mask(object_id), only)  # replayed from the first click alone
    first_id = session.volume_prompts(object_id)[0].id
    session.move_prompt(object_id, first_id, ras_of(volume, 9, 11, 11))
    assert session.volume_prompts(object_id)[0].ras[0] == pytest.approx(tuple(ras_of(volume, 9, 11, 11)))
    session.remove_prompt(object_id, first_id)
    assert not session.mask(object_id).any() and not session.has_prompts(object_id)
    session.undo()
    assert session.has_prompts(object_id)


def test_objects_keep_their_masks_when_the_user_turns_between_them(engine, phantom):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    first, second = session.add_object(), session.add_object()
    session.add_point(first, centre)
    kept = session.mask(first).copy()
    session.add_point(second, ras_of(volume, 5, 8, 8))
    session.add_point(second, ras_of(volume, 6, 9, 9), positive=False)
    np.testing.assert_array_equal(session.mask(first), kept)
    session.add_point(first, ras_of(volume, 11, 20, 20), positive=False)  # resumes the first object from its mask
    assert session.labelmap().max() <= 2
    session.remove_object(second)
    assert list(session.objects) == [first]


def test_two_sessions_take_turns_on_one_loaded_model(engine, phantom):
    volume, _, centre = phantom
    other_volume, _, other_centre = sphere_volume("ras_aligned", dims=(32, 30, 24), radius_mm=6.0)
    a, b = VolumeSession(volume, engine), VolumeSession(other_volume, engine)
    a_object, b_object = a.add_object(), b.add_object()
    a.add_point(a_object, centre)
    b.add_point(b_object, other_centre)
    assert engine.mask.shape == other_volume.array.shape
    a_mask, b_mask = a.mask(a_object).copy(), b.mask(b_object).copy()
    a.add_point(a_object, ras_of(volume, 10, 10, 10), positive=False)
    assert engine.mask.shape == volume.array.shape  # the model took session a's volume back
    np.testing.assert_array_equal(b.mask(b_object), b_mask)
    assert a.mask(a_object).shape == a_mask.shape
    a.close()
    assert engine.owner is None


def test_what_a_3d_model_cannot_take_is_one_clear_line(engine, phantom):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    with pytest.raises(PromptError, match="one slice"):
        session.set_roi(object_id, [ras_of(volume, 4, 4, 4), ras_of(volume, 14, 20, 20)])
    with pytest.raises(PromptError, match="answers in 3D already"):
        session.propagate(object_id)
    with pytest.raises(PromptError, match="outside the volume"):
        session.add_point(object_id, ras_of(volume, 10, 10, 500))
    with pytest.raises(PromptError, match="class"):
        session.set_class(object_id, "liver")
    with pytest.raises(PromptError, match="three points"):
        session.add_lasso(object_id, [centre, centre])
    assert not session.has_prompts(object_id) and not session.can_undo  # nothing half-done was kept


def test_strokes_and_lassos_as_voxels():
    shape = (6, 20, 20)
    line = stroke_mask(np.array([[2, 2, 2], [2, 2, 12], [2, 12, 12]]), shape)
    assert line[2].sum() == 21 and line.sum() == 21  # both legs, no gaps, one slice
    square = lasso_mask(np.array([[3, 4, 4], [3, 4, 13], [3, 13, 13], [3, 13, 4]]), shape)
    assert square[3, 4:14, 4:14].all() and square.sum() == 100
    triangle = lasso_mask(np.array([[1, 0, 0], [1, 0, 10], [1, 10, 0]]), shape)
    assert triangle[1, 2, 2] and not triangle[1, 8, 8] and triangle[[0, 2, 3, 4, 5]].sum() == 0
    with pytest.raises(PromptError, match="one slice"):
        lasso_mask(np.array([[1, 0, 0], [2, 0, 10], [3, 10, 0]]), shape)


def test_after_an_undo_the_model_starts_again_from_the_mask_the_user_sees(engine, phantom, monkeypatch):
    volume, _, centre = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    starts = []
    start = engine.start_object
    monkeypatch.setattr(engine, "start_object", lambda mask=None: (starts.append(mask), start(mask))[1])
    session.add_point(object_id, centre)
    session.add_point(object_id, ras_of(volume, 12, 20, 12))
    assert len(starts) == 1 and starts[0] is None  # one object, begun once, from nothing
    session.undo()
    shown = session.mask(object_id).copy()
    session.add_point(object_id, ras_of(volume, 8, 14, 25), positive=False)
    assert len(starts) == 2 and np.array_equal(starts[1], shown)  # not the engine's memory of the undone click


def test_a_new_box_replaces_the_box_the_viewers_show_unless_boxes_are_kept(engine, phantom):
    volume, _, _ = phantom
    session = VolumeSession(volume, engine)
    object_id = session.add_object()
    session.set_box(object_id, ras_of(volume, 10, 8, 9), ras_of(volume, 10, 25, 30), view=2)
    session.set_box(object_id, ras_of(volume, 10, 10, 12), ras_of(volume, 10, 22, 26), view=2)
    (box,) = session.volume_prompts(object_id)
    assert session._interaction(box).points.tolist() == [[10, 10, 12], [10, 22, 26]]
    session.set_box(object_id, ras_of(volume, 12, 10, 12), ras_of(volume, 12, 22, 26), view=2, keep_other_slices=True)
    assert [p.kind for p in session.volume_prompts(object_id)] == ["box", "box"]
