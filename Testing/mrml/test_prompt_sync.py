"""The effect's machinery without Qt: markups kept in step with prompts, and encoding in the background."""

from __future__ import annotations

import numpy as np
import vtk

from conftest import sphere_volume
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.errors import VolumeError
from MedFMLib.imaging.geometry import SlicePlane, plane_through
from MedFMLib.interaction.background import BackgroundEncoder
from MedFMLib.interaction.session import Session
from MedFMLib.mrml.bridge import add_volume_node, volume_from_node
from MedFMLib.mrml.prompt_sync import PromptSync


def _setup(mrml_scene, geometry="oblique_anisotropic"):
    volume, truth, centre = sphere_volume(geometry)
    volume = volume_from_node(add_volume_node(mrml_scene, volume))
    session = Session(volume, ClassicEngine())
    object_id = session.add_object()
    positive = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    negative = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    return volume, truth, np.asarray(centre), session, object_id, positive, negative


def _shifted(volume, ras, ijk_step):
    return volume.ijk_to_ras_points(volume.ras_to_ijk_points(np.array([ras])) + [ijk_step])[0]


def test_markups_changes_become_prompt_changes(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene)
    sync = PromptSync(session, obj, default_view="axial")
    positive.AddControlPoint(vtk.vtkVector3d(*centre))
    updates, rejected = sync.sync(positive, negative)
    plane = plane_through(volume, centre, "axial")
    assert not rejected and [u.plane for u in updates] == [plane]
    np.testing.assert_array_equal(session.mask(obj)[plane.array_index()], truth[plane.array_index()])
    assert sync.sync(positive, negative) == ([], [])  # nothing changed, nothing decoded

    # Dragging the point two slices up moves the prompt there: the old slice empties.
    above = _shifted(volume, centre, [0, 0, 2])
    positive.SetNthControlPointPositionWorld(0, *above)
    updates, _ = sync.sync(positive, negative)
    upper = plane_through(volume, above, "axial")
    assert {u.plane for u in updates} == {plane, upper}
    assert not session.mask(obj)[plane.array_index()].any()
    np.testing.assert_array_equal(session.mask(obj)[upper.array_index()], truth[upper.array_index()])

    # Deleting it removes the prompt; undo in the session brings the mask back.
    positive.RemoveNthControlPoint(0)
    sync.sync(positive, negative)
    assert not session.mask(obj).any() and session.prompts(obj) == []


def test_points_keep_the_view_they_were_placed_in(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene)
    sync = PromptSync(session, obj, default_view="axial")
    index = positive.AddControlPoint(vtk.vtkVector3d(*centre))
    sync.set_view(positive, positive.GetNthControlPointID(index), "sagittal")
    sync.sync(positive, negative)
    plane = plane_through(volume, centre, "sagittal")
    assert {p for p in session.objects[obj].slices} == {plane}
    region = sync.touched_region()
    assert region[plane.array_index()].all() and region.sum() == region[plane.array_index()].size


def test_a_point_outside_is_rejected_and_the_rest_still_works(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene)
    sync = PromptSync(session, obj)
    positive.AddControlPoint(vtk.vtkVector3d(*(centre + 900.0)))
    positive.AddControlPoint(vtk.vtkVector3d(*centre))
    updates, rejected = sync.sync(positive, negative)
    assert len(rejected) == 1 and "outside the volume" in rejected[0].message
    assert rejected[0].point_id == positive.GetNthControlPointID(0)
    assert len(updates) == 1 and session.mask(obj).any()


def test_roi_edits_replace_the_box(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene, "lps_anisotropic")
    sync = PromptSync(session, obj, default_view="axial")
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(14.0, 14.0, 0.5)
    plane = plane_through(volume, centre, "axial")
    assert sync.sync_box(roi).plane == plane
    np.testing.assert_array_equal(session.mask(obj)[plane.array_index()], truth[plane.array_index()])
    assert sync.sync_box(roi) is None  # unchanged
    roi.SetRadiusXYZ(3.0, 3.0, 0.5)  # too small to hold the sphere's section: the mask shrinks with it
    smaller = sync.sync_box(roi)
    assert 0 < smaller.mask.sum() < truth[plane.array_index()].sum()
    roi.RemoveAllControlPoints()
    assert sync.sync_box(roi) is not None and not session.mask(obj).any()


def test_background_encoder_fills_the_cache_nearest_slice_first(mrml_scene):
    volume, _, centre, session, _, _, _ = _setup(mrml_scene)
    encoder = BackgroundEncoder(session)
    try:
        plane = plane_through(volume, centre, "axial")
        wanted = encoder.neighbours(plane, reach=2)
        assert wanted[0] == plane and {p.index for p in wanted} == {plane.index + d for d in (-2, -1, 0, 1, 2)}
        encoder.request(wanted)
        for p in wanted:
            assert encoder.wait(p, timeout=30) and encoder.is_ready(p)
        assert encoder.encoded == 5 and not encoder.is_busy()
        misses = session.cache.stats.misses
        encoder.request(wanted)  # already there: nothing to do
        assert encoder.wait(plane, timeout=5) and encoder.encoded == 5
        assert session.cache.stats.misses == misses
        # The edge of the volume: no planes outside it.
        assert [p.index for p in encoder.neighbours(SlicePlane(plane.axis, 0), reach=2)] == [0, 1, 2]
    finally:
        encoder.stop()


class _FailingEngine(ClassicEngine):
    def encode(self, image):
        raise VolumeError("this slice cannot be encoded")


def test_background_failures_reach_the_gui_thread(mrml_scene):
    volume, _, centre, _, _, _, _ = _setup(mrml_scene)
    session = Session(volume, _FailingEngine())
    encoder = BackgroundEncoder(session)
    try:
        plane = plane_through(volume, centre, "axial")
        encoder.request([plane])
        assert encoder.wait(plane, timeout=10)
        assert isinstance(encoder.failure(plane), VolumeError) and not encoder.is_ready(plane)
        encoder.cancel()
        assert not encoder.is_busy()
    finally:
        encoder.stop()


def test_undo_in_the_session_redraws_the_markups(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene)
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    sync = PromptSync(session, obj, default_view="axial")
    positive.AddControlPoint(vtk.vtkVector3d(*centre))
    negative.AddControlPoint(vtk.vtkVector3d(*_shifted(volume, centre, [5, 0, 0])))
    sync.sync(positive, negative)
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(15.0, 15.0, 0.5)
    sync.sync_box(roi)
    with_box = session.mask(obj).copy()
    session.undo()  # the box goes
    sync.rebuild(positive, negative, roi)
    assert roi.GetNumberOfDefinedControlPoints() == 0
    assert positive.GetNumberOfControlPoints() == 1 and negative.GetNumberOfControlPoints() == 1
    assert sync.sync(positive, negative) == ([], [])  # markups and session agree again
    session.redo()
    sync.rebuild(positive, negative, roi)
    assert roi.GetNumberOfDefinedControlPoints() > 0 and sync.sync_box(roi) is None
    np.testing.assert_array_equal(session.mask(obj), with_box)
    # Dragging a redrawn point still moves its prompt.
    positive.SetNthControlPointPositionWorld(0, *_shifted(volume, centre, [0, 0, 1]))
    updates, _ = sync.sync(positive, negative)
    assert len(updates) == 2 and len(session.prompts(obj)) == 3


def test_preview_segment_is_replaced_whole(mrml_scene):
    from MedFMLib.mrml.bridge import ensure_segment, segment_array, set_segment_mask

    volume, truth, *_ = _setup(mrml_scene)
    preview = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedFM preview")
    segment = ensure_segment(preview, "preview", color=(0.2, 0.9, 0.2))
    set_segment_mask(preview, segment, truth, volume)
    np.testing.assert_array_equal(segment_array(preview, segment, volume), truth)
    smaller = np.zeros_like(truth)
    smaller[truth.shape[0] // 2] = truth[truth.shape[0] // 2]
    set_segment_mask(preview, segment, smaller, volume)
    np.testing.assert_array_equal(segment_array(preview, segment, volume), smaller)


def test_the_planes_a_click_needs_are_those_of_its_own_view(mrml_scene):
    volume, truth, centre, session, obj, positive, negative = _setup(mrml_scene, "ras_aligned")
    sync = PromptSync(session, obj, default_view="axial")
    positive.AddControlPoint(vtk.vtkVector3d(*centre))
    index = negative.AddControlPoint(vtk.vtkVector3d(*(centre + [3.0, 0.0, 0.0])))
    sync.set_view(negative, negative.GetNthControlPointID(index), "sagittal")
    negative.AddControlPoint(vtk.vtkVector3d(9999.0, 0.0, 0.0))  # outside the volume: no plane, no error
    # RAS-aligned 1 mm voxels from the origin: axial slice k at S = k, sagittal slice i at R = i (by hand).
    assert sync.prompted_planes(positive, negative) == [
        SlicePlane(2, round(centre[2])), SlicePlane(0, round(centre[0] + 3.0))
    ]


def test_a_correction_on_a_propagated_slice_is_found_among_the_updates():
    from MedFMLib.interaction.cleanup import corrected_planes

    volume, _, centre = sphere_volume("ras_aligned")
    session = Session(volume, ClassicEngine())
    obj = session.add_object()
    first = session.add_point(obj, centre).plane
    session.propagate(obj)
    on_propagated = session.add_point(obj, centre + [0.5, 0.0, 2.0])  # two slices up: propagated, now corrected
    fresh = session.add_object()
    elsewhere = session.add_point(fresh, centre)  # another object's first click is no correction
    slices = session.objects[obj].slices
    assert corrected_planes(slices, [on_propagated]) == [on_propagated.plane] != [first]
    assert corrected_planes(slices, [session.add_point(obj, centre + [1.0, 0, 0])]) == []  # the user's own slice
    assert corrected_planes(session.objects[fresh].slices, [elsewhere]) == []
