"""The bridge between Slicer's MRML nodes and MedFM's plain arrays.

Only slicer (MRML), vtk and numpy are used here, so the bridge runs inside
Slicer and headless on the ``slicer-core`` package alike. Geometry always goes
through the nodes' own 4×4 matrices, in world (RAS) coordinates: markups
positions are read in world coordinates, and a volume's parent transform is
either hardened into its IJK→RAS matrix or refused.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import vtk
from vtk.util import numpy_support

from ..errors import PromptError, VolumeError
from ..imaging.intensity import Window
from ..imaging.volume import Volume


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node.GetName() else "the node"


def to_world_matrix(node, harden_transform: bool = True) -> np.ndarray:
    """The 4×4 matrix from a node's local coordinates to world, through its parent transforms.

    A non-linear transform cannot be expressed as a matrix and is refused; a
    linear one is refused too unless ``harden_transform``.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise VolumeError(
            f"{_node_label(node)} is under the non-linear transform '{transform_node.GetName()}'; "
            "harden it first (Data module: right-click the node, Harden transform)."
        )
    if not harden_transform:
        raise VolumeError(
            f"{_node_label(node)} is under the transform '{transform_node.GetName()}'; harden it first "
            "(Data module: right-click the node, Harden transform)."
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _matrix_to_numpy(matrix)


def volume_from_node(volume_node, harden_transform: bool = True) -> Volume:
    """A scalar volume node as a ``Volume`` (a copy of its voxels and its IJK→world matrix)."""
    if volume_node is None:
        raise VolumeError("No volume selected: choose the volume to segment (Segment Editor: Source volume).")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise VolumeError(
            f"{_node_label(volume_node)} is a {volume_node.GetClassName()}, not a scalar volume; "
            "MedFM segments single-channel 3D volumes: convert RGB to grayscale (Vector to Scalar Volume module)."
        )
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise VolumeError(f"{_node_label(volume_node)} holds no voxels; load the image again.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise VolumeError(
            f"{_node_label(volume_node)} has {components} values per voxel (a 4D or RGB volume); "
            "MedFM needs one: pick a single frame or convert it to a scalar volume."
        )
    columns, rows, slices = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(slices, rows, columns).copy()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    to_world = to_world_matrix(volume_node, harden_transform)
    return Volume(array, to_world @ _matrix_to_numpy(ijk_to_ras), name=volume_node.GetName() or "volume")


def add_volume_node(scene, volume: Volume, name: str | None = None):
    """A new scalar volume node in the scene holding a copy of ``volume`` (for self-tests and scripts)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name)
    array = np.ascontiguousarray(volume.array)
    slices, rows, columns = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, slices)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def window_from_node(volume_node) -> Window | None:
    """The window/level the viewer shows the volume with, or None without a usable display node."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width = float(display.GetWindow())
    if not np.isfinite(width) or width <= 0:
        return None
    return Window(width=width, level=float(display.GetLevel()))


def control_points(markups_node) -> list[tuple[str, np.ndarray]]:
    """The placed control points of a markups node: (control point ID, world RAS position)."""
    if markups_node is None:
        return []
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue  # still being placed
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        points.append((markups_node.GetNthControlPointID(index), np.array(position, dtype=np.float64)))
    return points


def roi_corners(roi_node) -> np.ndarray:
    """The eight world RAS corners of a markups ROI (rotated ROIs included)."""
    if roi_node is None or roi_node.GetNumberOfDefinedControlPoints() == 0:
        raise PromptError("The ROI has not been placed yet; draw the box first.")
    size = np.array(roi_node.GetSize(), dtype=np.float64)
    # The ROI's object frame has its origin at the ROI's centre and its axes along the ROI's sides.
    object_to_world = roi_node.GetObjectToWorldMatrix()
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = np.c_[signs * size / 2.0, np.ones(8)]
    return (corners @ _matrix_to_numpy(object_to_world).T)[:, :3]


def roi_box_on_slice(volume: Volume, roi_node, axis: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Two RAS corners of the ROI's footprint on one slice: its IJK bounding box, at slice ``index``.

    The ROI may be rotated against the volume; its footprint is the box the
    ROI's corners span in the slice's own pixel axes.
    """
    ijk = volume.ras_to_ijk_points(roi_corners(roi_node))
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    if not (low[axis] - 0.5 <= index <= high[axis] + 0.5):
        raise PromptError(f"The ROI does not reach this slice (slice {index}); move the ROI or the slice so they meet.")
    # A box reaching past the image is cut at its edge: the model sees only the image anyway.
    last = np.array(volume.dimensions, dtype=np.float64) - 1.0
    low, high = np.clip(low, 0.0, last), np.clip(high, 0.0, last)
    low[axis] = high[axis] = index
    corners = volume.ijk_to_ras_points(np.stack([low, high]))
    return corners[0], corners[1]


def set_roi_corners(roi_node, corner_a, corner_b, thickness_mm: float = 1.0) -> None:
    """Make a markups ROI the world-aligned box spanned by two RAS corners (at least ``thickness_mm`` thick)."""
    corner_a, corner_b = np.asarray(corner_a, dtype=float), np.asarray(corner_b, dtype=float)
    radius = np.maximum(np.abs(corner_b - corner_a) / 2.0, thickness_mm / 2.0)
    roi_node.SetXYZ(*((corner_a + corner_b) / 2.0))
    roi_node.SetRadiusXYZ(*radius)


# --------------------------------------------------------------------------- segments
def oriented_image(mask: np.ndarray, image_to_world: np.ndarray):
    """A (K, J, I) mask as Slicer's vtkOrientedImageData with the given IJK→world matrix."""
    from slicer import vtkOrientedImageData

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    slices, rows, columns = mask.shape
    image = vtkOrientedImageData()
    image.SetDimensions(columns, rows, slices)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
    image.SetImageToWorldMatrix(_numpy_to_matrix(image_to_world))
    return image


def _segment_label(segmentation_node, segment_id: str):
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise PromptError(f"The segmentation has no segment '{segment_id}'; select or add a segment.")
    return segment


def segment_array(segmentation_node, segment_id: str, volume: Volume) -> np.ndarray:
    """A segment resampled onto the volume's voxel grid, as a (K, J, I) bool array."""
    from slicer import vtkOrientedImageData, vtkOrientedImageDataResample, vtkSlicerSegmentationsModuleLogic

    segment = _segment_label(segmentation_node, segment_id)
    labelmap = vtkOrientedImageData()
    # With the segmentation's parent transform applied: world coordinates, like the volume's matrix.
    vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, True
    )
    empty = labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty()
    if empty:
        return np.zeros(volume.array.shape, dtype=bool)
    reference = oriented_image(np.zeros(volume.array.shape, np.uint8), volume.ijk_to_ras)
    resampled = vtkOrientedImageData()
    vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(volume.array.shape)
    # Segments may share one labelmap layer; this segment is the voxels with its label value.
    return values == segment.GetLabelValue()


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, volume: Volume) -> None:
    """Replace a segment by a mask, without masking or undo: for MedFM's own preview segmentation."""
    from slicer import vtkSlicerSegmentationsModuleLogic as logic

    _segment_label(segmentation_node, segment_id)
    image_to_local = np.linalg.inv(to_world_matrix(segmentation_node)) @ volume.ijk_to_ras
    logic.SetBinaryLabelmapToSegment(
        oriented_image(mask, image_to_local), segmentation_node, segment_id, logic.MODE_REPLACE
    )


def write_segment(
    mask: np.ndarray,
    volume: Volume,
    segmentation_node,
    segment_id: str,
    region: np.ndarray | None = None,
    editor_node=None,
    source_volume_node=None,
) -> None:
    """Write a (K, J, I) mask into a segment, on the volume's geometry.

    Within ``region`` (default: everywhere) the segment becomes ``mask``;
    outside it the segment is left as it was. The write goes through Slicer's
    own segment editor logic, so it honours the Segment Editor node's editable
    area, editable intensity range and overwrite setting. Without an editor
    node, everywhere is editable and other segments are never overwritten.
    """
    from slicer import vtkSlicerSegmentEditorLogic

    _segment_label(segmentation_node, segment_id)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.array.shape:
        raise VolumeError(f"The mask is {mask.shape}, but the volume is {volume.array.shape}.")
    region = np.ones_like(mask) if region is None else np.asarray(region, dtype=bool)
    scene = segmentation_node.GetScene()
    from slicer import vtkSegmentationConverter

    geometry_key = vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if source_volume_node is not None and not segmentation_node.GetSegmentation().GetConversionParameter(geometry_key):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(source_volume_node)
    temporary_editor = editor_node is None
    if temporary_editor:
        editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedFM temporary editor")
        editor_node.SetOverwriteMode(editor_node.OverwriteNone)
    try:
        editor = vtkSlicerSegmentEditorLogic()
        editor.SetMRMLScene(scene)
        editor.SetSegmentEditorNode(editor_node)
        editor.SetSegmentationNode(segmentation_node)
        if source_volume_node is not None:
            editor.SetSourceVolumeNode(source_volume_node)
        # The labelmaps are given in the segmentation's local frame.
        image_to_local = np.linalg.inv(to_world_matrix(segmentation_node)) @ volume.ijk_to_ras
        # Remove, then add: "set" would also clear the segment outside the region.
        changes = ((region & ~mask, editor.ModificationModeRemove), (mask & region, editor.ModificationModeAdd))
        for part, mode in changes:
            if part.any():
                modifier = oriented_image(part, image_to_local)
                editor.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, False, False)
    finally:
        if temporary_editor:
            scene.RemoveNode(editor_node)


def ensure_segment(segmentation_node, name_or_id: str | None, color: Iterable[float] | None = None) -> str:
    """The ID of the segment with this ID or name, added if there is none."""
    segmentation = segmentation_node.GetSegmentation()
    if name_or_id:
        if segmentation.GetSegment(name_or_id) is not None:
            return name_or_id
        found = segmentation.GetSegmentIdBySegmentName(name_or_id)
        if found:
            return found
    segment_id = segmentation.AddEmptySegment("", name_or_id or "")
    if color is not None:
        segmentation.GetSegment(segment_id).SetColor(*[float(c) for c in color])
    return segment_id
