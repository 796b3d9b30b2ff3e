"""The MRML bridge and the headless logic on Slicer's real MRML classes (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
import vtk

from conftest import add_fiducials, add_segmentation_node, sphere_volume
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.errors import PromptError, VolumeError
from MedFMLib.imaging.geometry import plane_through
from MedFMLib.imaging.intensity import Window
from MedFMLib.interaction.session import Session
from MedFMLib.models.store import ModelStore
from MedFMLib.mrml.bridge import (
    add_volume_node,
    ensure_segment,
    roi_box_on_slice,
    segment_array,
    volume_from_node,
    window_from_node,
    write_segment,
)
from MedFMLib.mrml.logic import SegmentationLogic, isOutOfMemory


def _matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


@pytest.fixture
def logic(tmp_path):
    return SegmentationLogic(store=ModelStore(tmp_path / "home"))


def test_volume_node_round_trip_keeps_voxels_and_geometry(mrml_scene, geometry):
    volume, _, _ = sphere_volume(geometry)
    node = add_volume_node(mrml_scene, volume)
    back = volume_from_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-9)


def test_parent_transforms_are_hardened_or_refused(mrml_scene):
    volume, _, _ = sphere_volume("oblique_anisotropic")
    node = add_volume_node(mrml_scene, volume)
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.5)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Shift")
    transform.SetMatrixTransformToParent(_matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(volume_from_node(node).ijk_to_ras, shift @ volume.ijk_to_ras, atol=1e-9)
    with pytest.raises(VolumeError, match="under the transform 'Shift'; harden it"):
        volume_from_node(node, harden_transform=False)
    bending = mrml_scene.AddNewNodeByClass("vtkMRMLTransformNode", "Bend")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (0, 0, 0)), ((50, 0, 0), (50, 5, 0)), ((0, 50, 0), (0, 50, 0)), ((0, 0, 50), (3, 0, 50))):
        source.InsertNextPoint(p)
        target.InsertNextPoint(q)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    bending.SetAndObserveTransformToParent(spline)
    node.SetAndObserveTransformNodeID(bending.GetID())
    with pytest.raises(VolumeError, match="non-linear transform 'Bend'"):
        volume_from_node(node)


def test_bad_volumes_are_refused_with_one_line(mrml_scene):
    with pytest.raises(VolumeError, match="No volume selected"):
        volume_from_node(None)
    rgb = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    with pytest.raises(VolumeError, match="'photo' has 3 values per voxel \\(a 4D or RGB volume\\)"):
        volume_from_node(rgb)
    frames = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cine")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 20)  # a 4D series stored as 20 components (MultiVolume)
    frames.SetAndObserveImageData(image)
    with pytest.raises(VolumeError, match="20 values per voxel"):
        volume_from_node(frames)
    labels = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(VolumeError, match="not a scalar volume"):
        volume_from_node(labels)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(VolumeError, match="holds no voxels"):
        volume_from_node(empty)


def test_viewer_window_level_becomes_the_intensity_window(mrml_scene, logic):
    volume, _, _ = sphere_volume("ras_aligned")
    node = add_volume_node(mrml_scene, volume)
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(350.0, 45.0)
    assert window_from_node(node) == Window(350.0, 45.0)
    assert logic.intensityWindow(node, "viewer") == Window(350.0, 45.0)
    assert logic.intensityWindow(node, "lung") == Window(1500.0, -600.0)
    assert logic.intensityWindow(node, "auto") is None


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_a_click_segments_the_true_cross_section_into_the_segment(mrml_scene, logic, geometry, view):
    volume, truth, centre = sphere_volume(geometry)
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    clicks = add_fiducials(mrml_scene, "clicks", centre)
    segment_id = logic.segment(volume_node, segmentation, "sphere", positivePointsNode=clicks, view=view)
    written = segment_array(segmentation, segment_id, volume)
    plane = plane_through(volume, centre, view)
    expected = np.zeros_like(truth)
    expected[plane.array_index()] = truth[plane.array_index()]
    np.testing.assert_array_equal(written, expected)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "sphere"


def test_segment_geometry_survives_a_transformed_segmentation(mrml_scene, logic):
    volume, truth, centre = sphere_volume("oblique_lps")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    shift = np.eye(4)
    shift[:3, 3] = (4.0, 0.0, -3.0)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(_matrix(shift))
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    clicks = add_fiducials(mrml_scene, "p", centre)
    segment_id = logic.segment(volume_node, segmentation, "s", positivePointsNode=clicks)
    plane = plane_through(volume, centre, "axial")
    assert (
        segment_array(segmentation, segment_id, volume)[plane.array_index()].sum() == truth[plane.array_index()].sum()
    )


def test_negative_points_and_roi_boxes_come_from_markups(mrml_scene, logic):
    volume, truth, centre = sphere_volume("oblique_anisotropic")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(30.0, 30.0, 1.0)
    plane = plane_through(volume, centre, "axial")
    corner_a, corner_b = roi_box_on_slice(volume, roi, plane.axis, plane.index)
    assert plane_through(volume, corner_a, plane.axis) == plane_through(volume, corner_b, plane.axis) == plane
    segment_id = logic.segment(volume_node, segmentation, "boxed", roiNode=roi, view="axial")
    got = segment_array(segmentation, segment_id, volume)[plane.array_index()]
    np.testing.assert_array_equal(got, truth[plane.array_index()])
    # Negative points arrive as negative prompts: the same result as the session given them directly.
    inner = volume.ijk_to_ras_points(volume.ras_to_ijk_points(np.array([centre])) + [[4, 0, 0]])[0]
    positive, negative = add_fiducials(mrml_scene, "pos", centre), add_fiducials(mrml_scene, "neg", inner)
    segment_id = logic.segment(
        volume_node, segmentation, "pn", positivePointsNode=positive, negativePointsNode=negative
    )
    session = Session(volume, ClassicEngine(), window_from_node(volume_node))
    obj = session.add_object()
    session.add_point(obj, centre, positive=True)
    session.add_point(obj, inner, positive=False)
    expected = session.mask(obj)
    assert expected[plane.array_index()].sum() < truth[plane.array_index()].sum()  # the negative point mattered
    np.testing.assert_array_equal(segment_array(segmentation, segment_id, volume), expected)


def test_a_prompt_outside_the_volume_leaves_the_segmentation_unchanged(mrml_scene, logic):
    volume, _, centre = sphere_volume("lps_anisotropic")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    first = logic.segment(volume_node, segmentation, "kept", positivePointsNode=add_fiducials(mrml_scene, "a", centre))
    before = segment_array(segmentation, first, volume).copy()
    outside = add_fiducials(mrml_scene, "b", np.asarray(centre) + 500.0)
    with pytest.raises(PromptError, match="outside the volume"):
        logic.segment(volume_node, segmentation, "kept", positivePointsNode=outside)
    np.testing.assert_array_equal(segment_array(segmentation, first, volume), before)
    with pytest.raises(PromptError, match="at least one positive point or a box"):
        logic.segment(volume_node, segmentation, "kept")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1


def test_other_slices_of_the_segment_are_kept(mrml_scene, logic):
    volume, truth, centre = sphere_volume("ras_aligned")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    plane = plane_through(volume, centre, "axial")
    above = volume.ijk_to_ras_points(volume.ras_to_ijk_points(np.array([centre])) + [[0, 0, 2]])[0]
    clicks = add_fiducials(mrml_scene, "a", centre)
    segment_id = logic.segment(volume_node, segmentation, "s", positivePointsNode=clicks)
    logic.segment(volume_node, segmentation, "s", positivePointsNode=add_fiducials(mrml_scene, "b", above))
    written = segment_array(segmentation, segment_id, volume)
    upper = plane_through(volume, above, "axial")
    assert upper != plane
    for p in (plane, upper):
        np.testing.assert_array_equal(written[p.array_index()], truth[p.array_index()])
    assert written.sum() == truth[plane.array_index()].sum() + truth[upper.array_index()].sum()


def test_segment_editor_masking_and_overwrite_are_honoured(mrml_scene):
    volume, truth, centre = sphere_volume("oblique_anisotropic")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    other = ensure_segment(segmentation, "other")
    target = ensure_segment(segmentation, "target")
    half = np.zeros_like(truth)
    half[:, :, : truth.shape[2] // 2] = True
    write_segment(half, volume, segmentation, other)  # default: everywhere editable
    np.testing.assert_array_equal(segment_array(segmentation, other, volume), half)

    editor = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    # Editable intensity range: only voxels at 100 or above may change.
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(100.0, 1000.0)
    editor.SetOverwriteMode(editor.OverwriteNone)
    everything = np.ones_like(truth)
    write_segment(everything, volume, segmentation, target, editor_node=editor, source_volume_node=volume_node)
    np.testing.assert_array_equal(segment_array(segmentation, target, volume), volume.array >= 100)
    assert segment_array(segmentation, other, volume).sum() == half.sum()  # OverwriteNone kept it

    # Overwrite all: writing the target takes the voxels away from the other segment.
    editor.SetSourceVolumeIntensityMask(False)
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    write_segment(truth, volume, segmentation, target, editor_node=editor, source_volume_node=volume_node)
    np.testing.assert_array_equal(segment_array(segmentation, target, volume), truth)
    np.testing.assert_array_equal(segment_array(segmentation, other, volume), half & ~truth)

    # Editable area: outside all segments only.
    editor.SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    write_segment(everything, volume, segmentation, ensure_segment(segmentation, "third"), editor_node=editor)
    third = segment_array(segmentation, ensure_segment(segmentation, "third"), volume)
    np.testing.assert_array_equal(third, ~(truth | half))


def test_out_of_memory_is_recognised():
    import torch

    assert isOutOfMemory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert isOutOfMemory(RuntimeError("MPS backend out of memory"))
    assert not isOutOfMemory(RuntimeError("shape mismatch"))


def test_a_model_not_yet_downloaded_is_named(mrml_scene, logic):
    volume, _, centre = sphere_volume("ras_aligned")
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    with pytest.raises(Exception, match="not downloaded yet; run `medfm models download sam_vit_b`"):
        logic.segment(volume_node, segmentation, "s", positivePointsNode=add_fiducials(mrml_scene, "a", centre),
                      modelName="sam_vit_b")  # fmt: skip
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_roi_corners_are_the_rois_own_corners_even_under_a_rotating_transform(mrml_scene):
    from MedFMLib.mrml.bridge import roi_corners

    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetXYZ(10.0, -20.0, 5.0)
    roi.SetRadiusXYZ(3.0, 4.0, 5.0)
    # Worked out by hand: the centre plus or minus each radius.
    expected = {(x, y, z) for x in (7.0, 13.0) for y in (-24.0, -16.0) for z in (0.0, 10.0)}
    assert {tuple(np.round(c, 6)) for c in roi_corners(roi)} == expected
    # Under a transform that turns 90 degrees about S and moves 100 mm along R: (x, y, z) -> (100 - y, x, z).
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(_matrix([[0, -1, 0, 100], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    roi.SetAndObserveTransformNodeID(transform.GetID())
    turned = {(100.0 - y, x, z) for x, y, z in expected}
    assert {tuple(np.round(c, 6)) for c in roi_corners(roi)} == turned


def test_a_tight_roi_bounds_the_mask(mrml_scene, logic):
    """An ROI smaller than the sphere's section: nothing outside it is segmented (the sphere is larger)."""
    volume, truth, centre = sphere_volume("ras_aligned", radius_mm=9.0)
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetXYZ(*centre)
    roi.SetRadiusXYZ(4.0, 3.0, 0.4)
    segment_id = logic.segment(volume_node, segmentation, "tight", roiNode=roi, view="axial")
    mask = segment_array(segmentation, segment_id, volume)
    # RAS-aligned 1 mm voxels from the origin: voxel (k, j, i) is centred at (i, j, k) mm.
    k, j, i = np.nonzero(mask)
    assert len(i) > 0 and np.all(mask <= truth)
    assert np.abs(i - centre[0]).max() <= 4.5 and np.abs(j - centre[1]).max() <= 3.5  # the ROI, to half a voxel
    assert np.abs(i - centre[0]).max() >= 3.5 and np.abs(j - centre[1]).max() >= 2.5  # and it fills it
