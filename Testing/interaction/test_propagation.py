"""Propagation through the volume, 3D boxes, anchors and post-processing, on real engines and phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from MedFMLib.engines import create_engine
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.errors import PromptError
from MedFMLib.imaging.geometry import SlicePlane, extract_slice, plane_through, resolve_axis
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render, rotation_matrix
from MedFMLib.imaging.postprocess import fill_holes, keep_touching_components
from MedFMLib.interaction.propagation import (
    PropagationOptions,
    Propagator,
    StopCriteria,
    dice,
    stop_reason,
    widened_box,
)
from MedFMLib.interaction.session import Session

# Two oblique, anisotropic geometries (one LPS-like): the phantom is defined in RAS.
OBLIQUE = {
    "oblique": dict(spacing=(0.8, 0.9, 2.0), origin=(10.0, -20.0, 30.0), angles_deg=(10, -8, 15)),
    "oblique_lps": dict(
        spacing=(1.1, 0.9, 1.8), origin=(60.0, 40.0, -10.0), angles_deg=(-14, 9, -20), axis_signs=(-1, -1, 1)
    ),
}
# Never stop for the object's sake: walks end only at limits (for mechanics tests on random-weight models).
NEVER_STOP = PropagationOptions(criteria=StopCriteria(0, 0.0, -np.inf, 0.0, np.inf, 0, min_object_fraction=0.0))


def tapering_phantom(name: str = "oblique", dims=(80, 72, 36), radii=(18.0, 13.0, 26.0)):
    """An ellipsoid that tapers to points at both ends along the slice axis, in noise, on an oblique grid."""
    matrix = make_ijk_to_ras(**OBLIQUE[name])
    centre = matrix[:3, :3] @ (np.array(dims) / 2.0 + 0.3) + matrix[:3, 3]
    volume, masks = render(dims, matrix, [Ellipsoid(tuple(centre), radii, 200.0)], noise_sd=4.0, name=name)
    return volume, masks[0], centre


def slices_between(volume, axis: int, first: int, last: int) -> np.ndarray:
    """True on slices first..last along an IJK axis (the array is (K, J, I))."""
    keep = np.zeros(volume.array.shape, bool)
    index = [slice(None)] * 3
    index[2 - axis] = slice(first, last + 1)
    keep[tuple(index)] = True
    return keep


def last_written(result, direction):
    return next(last for _, d, _, last in result.stops if d == direction)


def reasons(result):
    return {direction: reason for _, direction, reason, _ in result.stops}


@pytest.mark.parametrize("name", sorted(OBLIQUE))
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_a_click_on_the_middle_slice_gives_the_3d_ellipsoid(name, view):
    volume, truth, centre = tapering_phantom(name)
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, centre, view=view)
    single = session.mask(obj).copy()
    result = session.propagate(obj)
    assert result.axis == resolve_axis(volume.ijk_to_ras, view)
    assert dice(single, truth) < 0.3  # one slice alone is far from the object
    assert dice(session.mask(obj), truth) >= 0.9, result.describe()
    # Every slice the propagation wrote lies within the object's true slice range.
    axis = result.axis
    true_slices = {i for i in range(volume.dimensions[axis]) if extract_slice(truth, SlicePlane(axis, i)).any()}
    written = {p.index for p, s in result.states.items() if s is not None}
    assert written <= true_slices and len(written) >= len(true_slices) - 4


def test_propagation_stops_where_the_object_ends_and_undo_takes_it_back_whole():
    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, centre)
    before = session.mask(obj).copy()
    result = session.propagate(obj)
    axis = result.axis
    occupied = [i for i in range(volume.dimensions[axis]) if extract_slice(truth, SlicePlane(axis, i)).any()]
    assert abs(last_written(result, "forward") - occupied[-1]) <= 2
    assert abs(last_written(result, "backward") - occupied[0]) <= 2
    assert set(reasons(result).values()) <= {"end", "collapse", "growth", "overlap"}
    assert not session.mask(obj)[: max(0, occupied[0] - 3)].any()  # nothing beyond the object's end
    session.undo()
    assert np.array_equal(session.mask(obj), before)
    session.redo()
    assert dice(session.mask(obj), truth) >= 0.9


def test_forward_and_backward_go_one_way_only():
    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    update = session.add_point(obj, centre)
    start = update.plane.index
    result = session.propagate(obj, "forward")
    assert [d for _, d, _, _ in result.stops] == ["forward"]
    assert all(p.index > start for p in result.states)
    result = session.propagate(obj, "backward")
    assert all(p.index < start for p in result.states)
    with pytest.raises(PromptError, match="Use one of"):
        session.propagate(obj, "sideways")


def test_nothing_to_propagate_is_one_clear_error():
    volume, _, _ = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    with pytest.raises(PromptError, match="segment one slice first"):
        session.propagate(obj, view="axial")


def test_stop_criteria_each_reason():
    criteria = StopCriteria()
    previous = np.zeros((60, 60), bool)
    previous[10:30, 10:30] = True  # 400 pixels
    same = previous.copy()
    assert stop_reason(previous, same, 0.9, criteria) is None
    assert stop_reason(previous, np.zeros_like(previous), 0.9, criteria) == "end"
    tiny = np.zeros_like(previous)
    tiny[15:20, 15:20] = True  # 25 pixels, 6 % of the previous area
    assert stop_reason(previous, tiny, 0.9, criteria) == "collapse"
    assert stop_reason(previous, same, 0.2, criteria) == "quality"
    moved = np.zeros_like(previous)
    moved[30:48, 30:48] = True  # beside the previous mask, farther than half its radius (about 5 pixels)
    assert stop_reason(previous, moved, 0.9, criteria) == "overlap"
    shifted = np.zeros_like(previous)
    shifted[14:34, 14:34] = True  # the same section, 4 pixels along each axis: a thick slice's shift
    assert stop_reason(previous, shifted, 0.9, criteria) is None
    assert stop_reason(previous, same, 0.9, criteria, object_fraction=0.3) == "appearance"
    assert stop_reason(previous, same, 0.9, criteria, object_fraction=0.7) is None
    leak = np.ones_like(previous)
    assert stop_reason(previous, leak, 0.9, criteria) == "growth"
    # A tapering end (a subset that shrinks by half) is not a stop.
    half = np.zeros_like(previous)
    half[13:27, 13:27] = True
    assert stop_reason(previous, half, 0.9, criteria) is None


def test_a_3d_box_segments_every_slice_it_spans_and_no_other():
    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    full = session.add_object()
    session.set_roi(full, [centre - [24, 19, 30], centre + [24, 19, 30]])
    assert dice(session.mask(full), truth) >= 0.9
    # A box over the middle of the object, which goes on beyond it both ways, with faces along the slices:
    # exactly the slices it reaches (those whose centre lies within half a voxel of it), the middle one first.
    axis = resolve_axis(volume.ijk_to_ras, "axial")
    low, high = volume.ras_to_ijk_points(centre) - 30.0, volume.ras_to_ijk_points(centre) + 30.0
    low[axis], high[axis] = 11.7, 24.4  # by hand: slices 12 (11.7 <= 12 + 0.5) to 24 (24 - 0.5 <= 24.4)
    corners_ijk = np.array([[(low, high)[c][0], (low, high)[r][1], (low, high)[s][2]]
                            for c in (0, 1) for r in (0, 1) for s in (0, 1)])  # fmt: skip
    half = session.add_object()
    session.set_roi(half, volume.ijk_to_ras_points(corners_ijk))
    first, last = 12, 24
    filled = {i for i in range(volume.dimensions[axis]) if extract_slice(session.mask(half), SlicePlane(axis, i)).any()}
    assert sorted(filled) == list(range(first, last + 1))
    assert dice(session.mask(half), truth & (slices_between(volume, axis, first, last))) >= 0.9
    assert session.roi(half) is not None
    seed = [s for s in session.objects[half].slices.values() if s.origin == "roi"]
    assert len(seed) == 1 and seed[0].plane.index == (first + last) // 2
    # Undo removes the whole 3D box in one step.
    session.undo()
    assert not session.mask(half).any() and session.roi(half) is None


def test_a_3d_box_narrower_than_the_object_bounds_every_slice_of_it():
    """The object is wider than the box: each carried box stays inside the 3D box, on every slice it spans."""
    volume, sphere, centre = sphere_volume("ras_aligned", radius_mm=9.0)  # voxel (k, j, i) at (i, j, k) mm
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.set_roi(obj, [centre - [4, 12, 6], centre + [4, 12, 6]])
    k, j, i = np.nonzero(session.mask(obj))
    assert sorted(set(k)) == list(range(6, 19))  # S from 6.1 to 18.1 mm: slices 6 to 18, by hand
    assert np.abs(i - centre[0]).max() <= 4.5  # within the box (to half a voxel) on every slice
    for slice_index in range(7, 18):  # and it fills the box's width wherever the sphere is wider than the box
        assert np.abs(i[k == slice_index] - centre[0]).max() >= 3.5, slice_index
    assert not (session.mask(obj) & ~sphere).any()
    # What the model is shown stays inside the box too: each slice's carried box (x = R mm, y = A mm here).
    carried = [s.carried.box for s in session.objects[obj].slices.values() if s.origin == "propagated"]
    assert len(carried) == 12
    for x0, y0, x1, y1 in carried:
        assert centre[0] - 4 - 1e-4 <= x0 <= x1 <= centre[0] + 4 + 1e-4
        assert centre[1] - 12 - 1e-4 <= y0 <= y1 <= centre[1] + 12 + 1e-4


def test_a_rotated_roi_given_by_eight_corners():
    volume, truth, centre = tapering_phantom()
    rotation = rotation_matrix((0, 0, 25))
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners = centre + (signs * [26, 22, 30]) @ rotation.T
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.set_roi(obj, corners)
    assert dice(session.mask(obj), truth) >= 0.9


def test_a_3d_box_outside_the_volume_is_refused_and_changes_nothing():
    volume, _, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    with pytest.raises(PromptError, match="outside the volume"):
        session.set_roi(obj, [centre + 500, centre + 520])
    assert not session.mask(obj).any() and not session.can_undo


def test_a_correction_is_kept_and_never_overwritten_by_later_propagation():
    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    start = session.add_point(obj, centre).plane
    session.propagate(obj)
    # Correct a propagated slice five slices up: a negative click near its edge cuts a disc out of it.
    target = SlicePlane(start.axis, start.index + 5)
    state = session.objects[obj].slices[target]
    assert state.origin == "propagated" and not state.is_anchor
    rows, cols = np.nonzero(state.mask)
    ijk = np.zeros(3)
    edge = np.argmax(cols)
    ijk[target.axis], ijk[target.row_axis], ijk[target.col_axis] = target.index, rows[edge], cols[edge] - 3
    negative = volume.ijk_to_ras_points(ijk)
    session.add_point(obj, negative, positive=False, view=target.axis)
    corrected = session.objects[obj].slices[target]
    assert corrected.is_anchor and 0 < corrected.mask.sum() < state.mask.sum()
    kept = corrected.mask.copy()
    # Propagating again, from every anchor, both ways and each way alone, never touches it.
    for direction in ("both", "forward", "backward"):
        result = session.propagate(obj, direction)
        assert target not in result.states
        assert np.array_equal(session.objects[obj].slices[target].mask, kept)
    # Restarting from the correction revisits only as far as the change matters.
    result = session.repropagate(obj, target)
    assert set(reasons(result).values()) <= {"converged", "anchor", "end", "collapse", "growth", "overlap"}
    assert len(result.states) < len(session.objects[obj].slices) - 1
    assert np.array_equal(session.objects[obj].slices[target].mask, kept)
    assert dice(session.mask(obj), truth) >= 0.85


def test_between_two_anchors_each_fills_the_slices_nearer_to_it():
    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    low = session.add_point(obj, centre).plane
    axis = low.axis
    ijk = volume.ras_to_ijk_points(centre)
    ijk[axis] += 7
    high = session.add_point(obj, volume.ijk_to_ras_points(ijk)).plane
    anchors = {p: session.objects[obj].slices[p].mask.copy() for p in (low, high)}
    walks = Propagator(session, session.objects[obj].slices, obj, axis).plan("both")
    covered = [i for w in walks for i in range(w.start + w.step, w.limit + w.step, w.step)]
    assert len(covered) == len(set(covered))  # no slice is walked twice
    assert set(range(low.index + 1, high.index)) <= set(covered)
    session.propagate(obj)
    for plane, mask in anchors.items():
        assert np.array_equal(session.objects[obj].slices[plane].mask, mask)
    assert all(extract_slice(session.mask(obj), SlicePlane(axis, i)).any() for i in range(low.index, high.index + 1))


def test_a_slice_corrected_while_propagation_ran_is_not_replaced():
    volume, _, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    start = session.add_point(obj, centre).plane
    result = Propagator(session, session.objects[obj].slices, obj, start.axis).run("forward")  # as on the worker thread
    target = SlicePlane(start.axis, start.index + 2)
    assert target in result.states
    ijk = volume.ras_to_ijk_points(centre)
    ijk[start.axis] = target.index
    session.add_point(obj, volume.ijk_to_ras_points(ijk))  # the user clicks meanwhile
    clicked = session.objects[obj].slices[target].mask.copy()
    session.apply_propagation(result)
    assert np.array_equal(session.objects[obj].slices[target].mask, clicked)


def test_cancel_and_progress():
    volume, _, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, centre)
    seen = []
    result = session.propagate(
        obj, progress=lambda done, total, plane: seen.append((done, total)), cancel=lambda: len(seen) >= 3
    )
    assert reasons(result) == {"forward": "cancelled"}
    assert result.slices_written == 3 and [d for d, _ in seen] == [1, 2, 3]
    assert seen[0][1] == volume.dimensions[result.axis] - 1  # the plan: every other slice, at most


def test_propagation_with_tiny_sam_uses_cached_embeddings_and_its_logits(tiny_sam):
    volume, _, centre = tapering_phantom(dims=(40, 36, 14), radii=(10.0, 8.0, 12.0))
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    session = Session(volume, engine)
    obj = session.add_object()
    session.add_point(obj, centre)
    result = session.propagate(obj, options=NEVER_STOP)
    count = volume.dimensions[result.axis]
    assert reasons(result) == {"forward": "edge", "backward": "edge"}
    assert result.slices_written == count - 1
    propagated = [s for s in result.states.values() if s is not None]
    assert all(s.carried_logits is not None and s.carried.box is not None for s in propagated)
    assert session.cache.stats.misses == count
    # Propagating again costs decodes only: every slice is already encoded.
    session.propagate(obj, options=NEVER_STOP)
    assert session.cache.stats.misses == count
    # A model that is never confident enough stops at once and writes nothing.
    strict = PropagationOptions(criteria=StopCriteria(min_score=np.inf, min_object_fraction=0.0))
    result = session.propagate(obj, options=strict)
    assert result.slices_written == 0 and "quality" in reasons(result).values()


def test_box_only_models_are_carried_by_boxes(tiny_sam):
    volume, _, centre = tapering_phantom(dims=(40, 36, 14), radii=(10.0, 8.0, 12.0))
    session = Session(volume, create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu"))
    obj = session.add_object()
    session.set_roi(obj, [centre - [12, 10, 14], centre + [12, 10, 14]], options=NEVER_STOP)
    states = list(session.objects[obj].slices.values())
    assert len(states) > 3
    assert all(s.carried is not None and s.carried.box is not None and len(s.carried.points) == 0 for s in states)


def test_keep_touching_components_and_fill_holes():
    mask = np.zeros((12, 20, 20), bool)
    mask[2:6, 2:8, 2:8] = True  # touched by the seed
    mask[7:10, 12:18, 12:18] = True  # a stray blob
    kept = keep_touching_components(mask, [(3, 4, 4)])
    assert kept[2:6, 2:8, 2:8].all() and not kept[7:10].any()
    seeds = np.zeros_like(mask)
    seeds[8, 14, 14] = True
    assert keep_touching_components(mask, seeds)[8, 14, 14] and not keep_touching_components(mask, seeds)[3].any()
    # No seed inside the mask: nothing is thrown away.
    assert np.array_equal(keep_touching_components(mask, [(0, 0, 0)]), mask)
    # A tube open at both ends: a hole on every slice across K, but no enclosed cavity in 3D.
    tube = np.zeros((10, 20, 20), bool)
    tube[:, 4:16, 4:16] = True
    tube[:, 8:12, 8:12] = False
    assert not fill_holes(tube, axis=None)[5, 10, 10]
    assert fill_holes(tube, axis=2)[:, 8:12, 8:12].all()
    # Across another axis the same tube has no holes to fill.
    assert np.array_equal(fill_holes(tube, axis=0), tube)


def test_prompt_seeds_keep_the_prompted_object():
    matrix = make_ijk_to_ras((1.0, 1.0, 2.0), angles_deg=(0, 0, 10))
    a = matrix[:3, :3] @ np.array([14, 20, 8]) + matrix[:3, 3]
    b = matrix[:3, :3] @ np.array([34, 20, 8]) + matrix[:3, 3]
    volume, masks = render(
        (48, 40, 16), matrix, [Ellipsoid(tuple(a), (6, 6, 8), 200.0), Ellipsoid(tuple(b), (6, 6, 8), 200.0)]
    )
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, a)
    session.propagate(obj)
    # Pretend a model also marked the other sphere (as real models sometimes do): post-processing removes it.
    polluted = session.mask(obj) | masks[1]
    cleaned = keep_touching_components(polluted, session.prompt_seeds(obj))
    assert dice(cleaned, masks[0]) >= 0.9 and not (cleaned & masks[1]).any()


def test_prompt_seeds_are_the_slices_a_box_or_a_3d_box_vouches_for():
    """Without positive points, a box's slice and a 3D box's seed slice are what the user vouched for."""
    volume, sphere, centre = sphere_volume("ras_aligned")  # 1 mm voxels from the origin; S = k mm
    session = Session(volume, ClassicEngine())
    k = int(round(centre[2]))
    boxed = session.add_object()
    session.set_box(boxed, centre - [12, 12, 0], centre + [12, 12, 0])
    session.propagate(boxed)
    expected = np.zeros_like(sphere)
    expected[k] = sphere[k]  # the box's slice: the sphere's section there (the classic model is exact)
    np.testing.assert_array_equal(session.prompt_seeds(boxed), expected)
    assert session.mask(boxed).sum() > 3 * expected.sum()  # the propagated slices are not seeds
    roi = session.add_object()
    session.set_roi(roi, [centre - [12, 12, 5], centre + [12, 12, 5]])
    # S from 7.1 to 17.1 mm: slices 7 to 17 by hand, so the seed is the middle slice, 12.
    expected = np.zeros_like(sphere)
    expected[12] = sphere[12]
    np.testing.assert_array_equal(session.prompt_seeds(roi), expected)


def test_the_plane_of_a_click_is_the_start_of_its_walks():
    volume, _, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, centre, view="coronal")
    plane = plane_through(volume, centre, "coronal")
    walks = Propagator(session, session.objects[obj].slices, obj, plane.axis).plan("both")
    assert {w.start for w in walks} == {plane.index} and {w.step for w in walks} == {1, -1}


def test_a_propagation_job_runs_on_a_worker_thread_and_can_be_stopped():
    from MedFMLib.interaction.background import PropagationJob

    volume, truth, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    session.add_point(obj, centre)
    propagator = Propagator(session, session.objects[obj].slices, obj, session.propagation_axis(obj))
    job = PropagationJob(lambda progress, cancelled: propagator.run("both", progress=progress, cancel=cancelled))
    assert job.wait(60) and job.failure is None and job.done == job.result.slices_written > 0
    session.apply_propagation(job.result)
    assert dice(session.mask(obj), truth) >= 0.9
    # Stopped before it starts: nothing is written; a failure is reported, not raised.
    stopped = PropagationJob(lambda progress, cancelled: (job.cancel(), propagator.run("both", cancel=lambda: True))[1])
    assert stopped.wait(60) and stopped.result.slices_written == 0
    failing = PropagationJob(lambda progress, cancelled: session.plan_roi(obj, [centre + 500, centre + 520]))
    assert failing.wait(60) and isinstance(failing.failure, PromptError)


def test_an_anchor_with_an_empty_mask_still_blocks_propagation():
    from dataclasses import replace

    volume, _, centre = tapering_phantom()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    start = session.add_point(obj, centre).plane
    ijk = volume.ras_to_ijk_points(centre)
    ijk[start.axis] += 6
    blocked = session.add_point(obj, volume.ijk_to_ras_points(ijk)).plane
    # The user judged the object absent there: the anchor keeps its prompt but an empty mask.
    state = session.objects[obj].slices[blocked]
    session.objects[obj].slices[blocked] = replace(state, mask=np.zeros_like(state.mask))
    propagator = Propagator(session, session.objects[obj].slices, obj, start.axis)
    assert propagator.anchors() == [start.index, blocked.index]
    assert propagator.anchors(with_mask=True) == [start.index]
    walks = propagator.plan("forward")
    assert [(w.start, w.limit, w.limit_reason) for w in walks] == [(start.index, blocked.index - 1, "anchor")]


def test_a_negative_click_moves_a_box_only_models_box_off_it():
    from MedFMLib.interaction.box_prompts import box_without_negatives

    box = np.array([10, 10, 40, 40], np.float32)
    # The nearest side (left, 2 pixels away) moves past the click.
    np.testing.assert_array_equal(box_without_negatives(box, [(12, 25)], [0]), [13, 10, 40, 40])
    # A positive click the left side would leave out: the next side that keeps it moves instead (bottom).
    moved = box_without_negatives(box, [(11, 20), (12, 25)], [1, 0])
    np.testing.assert_array_equal(moved, [10, 10, 40, 24])
    # A negative click outside the box changes nothing.
    np.testing.assert_array_equal(box_without_negatives(box, [(50, 25)], [0]), box)


def test_a_click_off_the_propagated_range_borrows_the_nearest_box(tiny_sam):
    """A box-only model takes a click on a slice without a box: the nearest segmented slice lends its box."""
    volume, _, centre = tapering_phantom(dims=(40, 36, 14), radii=(10.0, 8.0, 12.0))
    session = Session(volume, create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu"))
    obj = session.add_object()
    axis = resolve_axis(volume.ijk_to_ras, "axial")
    session.set_roi(obj, [centre - [12, 10, 3], centre + [12, 10, 3]], options=NEVER_STOP)
    segmented = sorted(p.index for p, s in session.objects[obj].slices.items() if s.mask is not None and s.mask.any())
    assert segmented
    beyond = segmented[-1] + 2
    ijk = volume.ras_to_ijk_points(np.array([centre]))[0]
    ijk[axis] = beyond
    session.add_point(obj, volume.ijk_to_ras_points(ijk), view="axial")  # no PromptError
    state = session.objects[obj].slices[SlicePlane(axis, beyond)]
    neighbour = session.objects[obj].slices[SlicePlane(axis, segmented[-1])].mask
    rows, cols = np.nonzero(neighbour)
    np.testing.assert_array_equal(state.carried.box, [cols.min(), rows.min(), cols.max(), rows.max()])
    with pytest.raises(PromptError, match="box-prompted"):  # a fresh object has no slice to borrow from
        session.add_point(session.add_object(), centre, view="axial")


def hourglass(dims=(60, 60, 15)):
    """A bright column in noise whose radius is 6 pixels on its middle slice and grows 2 pixels per slice."""
    matrix = make_ijk_to_ras((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (0, 0, 0))
    k, j, i = np.ogrid[: dims[2], : dims[1], : dims[0]]
    radius = 6.0 + 2.0 * np.abs(k - dims[2] // 2)
    truth = (j - 30) ** 2 + (i - 30) ** 2 <= radius**2
    rng = np.random.default_rng(3)
    from MedFMLib.imaging.volume import Volume

    return Volume(np.where(truth, 200.0, 40.0) + rng.normal(0, 4.0, truth.shape), matrix), truth


@pytest.mark.parametrize("bounded", [True, False])
def test_a_3d_box_bounds_every_slice_or_only_its_range(bounded):
    """A Slicer ROI bounds each slice by its outline; the challenge's box (drawn on one slice) only by its range."""
    volume, truth = hourglass()
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    low = volume.ijk_to_ras_points(np.array([23.0, 23.0, 4.0]))
    high = volume.ijk_to_ras_points(np.array([37.0, 37.0, 10.0]))
    session.set_roi(obj, [low, high], options=PropagationOptions(roi_bounds_footprint=bounded))
    mask = session.mask(obj)
    assert mask[4:11].any(axis=(1, 2)).all() and not mask[:4].any() and not mask[11:].any()  # the range, always
    outside = mask.copy()
    outside[:, 23:38, 23:38] = False
    if bounded:
        assert not outside.any()
    else:
        assert outside[[4, 10]].sum() > 0.5 * (truth[[4, 10]] & ~truth[7]).sum()  # it grew with the column
        assert dice(mask[4:11], truth[4:11]) > 0.9


def test_a_carried_box_widens_only_on_the_sides_its_mask_reaches():
    options = PropagationOptions(box_margin_pixels=3.0, box_widen_fraction=0.25)
    box = np.array([20.0, 10.0, 39.0, 29.0], np.float32)  # 20 x 20 pixels
    inside = np.zeros((60, 80), bool)
    inside[14:26, 24:36] = True
    assert widened_box(inside, box, options, None) is None
    left_and_bottom = np.zeros((60, 80), bool)
    left_and_bottom[14:30, 20:36] = True  # reaches x0 = 20 and y1 = 29
    np.testing.assert_allclose(widened_box(left_and_bottom, box, options, None), [15.0, 10.0, 39.0, 34.0])
    # a side at the image's edge, or at a 3D box's footprint, cannot widen
    at_edge = np.zeros((60, 80), bool)
    at_edge[14:26, 0:20] = True  # reaches only x0, which is 0
    assert widened_box(at_edge, np.array([0.0, 10.0, 29.0, 29.0], np.float32), options, None) is None
    bound = np.array([18.0, 0.0, 79.0, 59.0], np.float32)
    np.testing.assert_allclose(widened_box(left_and_bottom, box, options, bound), [18.0, 10.0, 39.0, 34.0])


def test_only_a_model_that_reads_the_box_as_the_extent_gets_a_wider_box(tiny_sam):
    assert create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu").box_is_extent
    assert not ClassicEngine().box_is_extent
