"""Reading volumes and writing segmentations, with the input's exact geometry.

Any format SimpleITK reads is accepted (NRRD, NIfTI, MHA, a DICOM series
folder). SimpleITK works in LPS; MedFM's matrices are IJK→RAS, as Slicer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedFMError, VolumeError
from .volume import Volume, ras_to_lps_matrix

LABELMAP_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"


def _image_to_volume(image, name: str) -> Volume:
    import SimpleITK as sitk

    dimension = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        raise VolumeError(
            f"{name} has {components} values per voxel (RGB or vector image); MedFM needs a scalar (grayscale) volume."
        )
    if dimension == 4:
        raise VolumeError(f"{name} is 4D (a time series or multi-volume); save one 3D frame and load that.")
    if dimension == 2:
        image = sitk.JoinSeries(image)
    elif dimension != 3:
        raise VolumeError(f"{name} has {dimension} dimensions; MedFM needs a 3D volume.")
    if 0 in image.GetSize():
        raise VolumeError(f"{name} is empty (size {image.GetSize()}).")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    ijk_to_lps[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image)
    return Volume(array=array, ijk_to_ras=ras_to_lps_matrix(ijk_to_lps), name=name)


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise VolumeError(f"The folder {folder} holds no DICOM series; give a DICOM folder or an image file.")
    # Several series in one folder: take the one with most slices (the main scan,
    # not a scout), which is what a user pointing at the folder expects.
    files = max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len)
    reader.SetFileNames(files)
    return reader.Execute()


def read_volume(path: str | Path) -> Volume:
    """Load a 3D scalar volume from a file or a DICOM series folder."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path} does not exist; check the path.")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError:
        raise VolumeError(
            f"Cannot read {path.name}: not an image SimpleITK can read (NRRD, NIfTI, MHA, DICOM folder), "
            "or the file is damaged."
        ) from None
    return _image_to_volume(image, path.name)


def _geometry_image(array: np.ndarray, volume: Volume):
    """A SimpleITK image of the array (K, J, I) with exactly the volume's geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    ijk_to_lps = ras_to_lps_matrix(volume.ijk_to_ras)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing[None, :]).reshape(-1).tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def output_kind(path: str | Path) -> str:
    """'segmentation' for .seg.nrrd, 'labelmap' for other supported suffixes; else a clear error."""
    name = Path(path).name.lower()
    if name.endswith(SEGMENTATION_SUFFIX):
        return "segmentation"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise MedFMError(
        f"Cannot write '{Path(path).name}': use .seg.nrrd (Slicer segmentation) or a labelmap "
        f"({', '.join(LABELMAP_SUFFIXES)})."
    )


@dataclass
class SegmentData:
    """One segment to write: its name, colour (RGB in [0, 1]) and (K, J, I) mask."""

    name: str
    mask: np.ndarray
    color: tuple[float, float, float] = (0.95, 0.35, 0.25)


def write_image(path: str | Path, array: np.ndarray, volume: Volume) -> Path:
    """Write a (K, J, I) array, keeping its voxel type, on the volume's grid."""
    import SimpleITK as sitk

    path = Path(path)
    if array.shape != volume.array.shape:
        raise ValueError(f"array shape {array.shape} does not match the volume {volume.array.shape}")
    sitk.WriteImage(_geometry_image(np.ascontiguousarray(array), volume), str(path), useCompression=True)
    return path


def write_volume(path: str | Path, volume: Volume) -> Path:
    return write_image(path, volume.array, volume)


def write_labelmap(path: str | Path, labels: np.ndarray, volume: Volume) -> Path:
    """Write integer labels as the smallest unsigned type that holds them."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return write_image(path, labels.astype(dtype), volume)


def write_segmentation(path: str | Path, segments: Sequence[SegmentData], volume: Volume) -> Path:
    """A Slicer segmentation (.seg.nrrd) with one segment per entry, on the volume's grid.

    Overlapping segments go into separate layers, as Slicer stores them.
    """
    import slicerio

    path = Path(path)
    ijk_to_lps = ras_to_lps_matrix(volume.ijk_to_ras)
    segmentation = slicerio.create_segmentation(volume.dimensions, ijk_to_lps, dtype="uint8")
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    segmentation["masterRepresentation"] = "Binary labelmap"
    for index, segment in enumerate(segments, start=1):
        # slicerio wants voxels in (I, J, K) order; MedFM keeps (K, J, I).
        slicerio.add_segment(
            segmentation,
            np.transpose(segment.mask.astype(bool), (2, 1, 0)),
            {"id": f"Segment_{index}", "name": segment.name, "color": list(segment.color)},
        )
    slicerio.write_segmentation(str(path), segmentation)
    return path


def write_output(path: str | Path, segments: Sequence[SegmentData], volume: Volume) -> Path:
    """Write segments as a .seg.nrrd segmentation or as a labelmap, chosen by suffix."""
    path = Path(path)
    kind = output_kind(path)
    if not path.parent.exists():
        raise MedFMError(f"The output folder {path.parent} does not exist; create it first.")
    if kind == "segmentation":
        return write_segmentation(path, segments, volume)
    labels = np.zeros(volume.array.shape, dtype=np.uint16)
    for value, segment in enumerate(segments, start=1):
        labels[segment.mask.astype(bool)] = value
    return write_labelmap(path, labels, volume)
