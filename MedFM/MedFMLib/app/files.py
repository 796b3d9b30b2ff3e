"""The app's files: volumes in, segmentations in and out, always on the volume's own grid (no Qt here).

A segmentation is saved as a ``.seg.nrrd`` that Slicer opens, or as a labelmap (``.nrrd``, ``.nii.gz``);
an existing one is opened to be refined only when its geometry is the volume's (Slicer may crop a
``.seg.nrrd`` to its segments' extent: such a file is placed back where it belongs on the grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import VolumeError
from ..imaging.io import SEGMENTATION_SUFFIX, SegmentData, read_volume, write_output
from ..imaging.volume import Volume, ras_to_lps_matrix

_TOLERANCE_MM = 1e-3
#: colours of new segments, in turn (Slicer's first label colours)
SEGMENT_COLOURS = ((0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82), (0.86, 0.38, 0.33))


def read_segments(path: str | Path, volume: Volume) -> list[SegmentData]:
    """The segments of a ``.seg.nrrd`` or a labelmap (each label value one segment), on the volume's grid."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path} does not exist; check the path.")
    if path.name.lower().endswith(SEGMENTATION_SUFFIX):
        return _read_slicer_segmentation(path, volume)
    labels = read_volume(path)
    _check_same_grid(labels.ijk_to_ras, labels.array.shape, volume, path.name)
    values = [v for v in np.unique(labels.array) if v != 0]
    return [
        SegmentData(f"Segment_{int(v)}", labels.array == v, SEGMENT_COLOURS[i % len(SEGMENT_COLOURS)])
        for i, v in enumerate(values)
    ]


def _read_slicer_segmentation(path: Path, volume: Volume) -> list[SegmentData]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises several types on a damaged file
        raise VolumeError(f"Cannot read {path.name} as a Slicer segmentation ({exc}).") from None
    voxels = np.asarray(segmentation["voxels"])
    layers = list(voxels) if voxels.ndim == 4 else [voxels]  # slicerio: (layer, I, J, K) when segments overlap
    ijk_to_ras = ras_to_lps_matrix(np.asarray(segmentation["ijkToLPS"], float))
    shape_kji = layers[0].shape[::-1]
    offset = _offset_on_grid(ijk_to_ras, volume, path.name)
    segments = []
    for index, segment in enumerate(segmentation["segments"]):
        layer = layers[int(segment.get("layer", 0))]
        mask_kji = np.transpose(layer == int(segment.get("labelValue", index + 1)), (2, 1, 0))
        full = np.zeros(volume.array.shape, bool)
        k, j, i = offset
        target = full[k : k + shape_kji[0], j : j + shape_kji[1], i : i + shape_kji[2]]
        if target.shape != mask_kji.shape or min(offset) < 0:
            raise VolumeError(f"{path.name} reaches outside {volume.name}: it belongs to another volume.")
        target[...] = mask_kji
        colour = tuple(float(c) for c in segment.get("color", SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)]))
        segments.append(SegmentData(str(segment.get("name", f"Segment_{index + 1}")), full, colour))
    return segments


def _offset_on_grid(ijk_to_ras: np.ndarray, volume: Volume, name: str) -> tuple[int, int, int]:
    """Where a (possibly cropped) grid with the volume's axes and spacing starts, in the volume's (K, J, I)."""
    if not np.allclose(ijk_to_ras[:3, :3], volume.ijk_to_ras[:3, :3], atol=_TOLERANCE_MM):
        raise VolumeError(f"{name} does not match {volume.name}: its voxel axes or spacing differ.")
    ijk = np.linalg.solve(volume.ijk_to_ras[:3, :3], ijk_to_ras[:3, 3] - volume.ijk_to_ras[:3, 3])
    if np.abs(ijk - np.round(ijk)).max() > 1e-3:
        raise VolumeError(f"{name} does not match {volume.name}: its voxels lie between the volume's.")
    i, j, k = np.round(ijk).astype(int)
    return int(k), int(j), int(i)


def _check_same_grid(ijk_to_ras: np.ndarray, shape, volume: Volume, name: str) -> None:
    if tuple(shape) != tuple(volume.array.shape) or not np.allclose(ijk_to_ras, volume.ijk_to_ras, atol=_TOLERANCE_MM):
        raise VolumeError(
            f"{name} does not match {volume.name}: size {tuple(shape)[::-1]} against {volume.dimensions}, or "
            "another position or orientation. Open the segmentation made on this volume."
        )


def segments_of_node(segmentation_node, volume: Volume) -> list[SegmentData]:
    """Every segment of a segmentation node, as masks on the volume's grid."""
    from ..mrml.bridge import segment_array

    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        mask = segment_array(segmentation_node, segment_id, volume)
        segments.append(SegmentData(segment.GetName(), mask, tuple(segment.GetColor())))
    return segments


def save_segmentation(path: str | Path, segmentation_node, volume: Volume) -> Path:
    """Save a segmentation node as ``.seg.nrrd`` or a labelmap (by the suffix), in the volume's geometry."""
    return write_output(path, segments_of_node(segmentation_node, volume), volume)
