"""Reading volumes of every kind into the right IJK→RAS matrix, and refusing what cannot be used."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from MedFMLib.errors import VolumeError
from MedFMLib.imaging.io import read_volume, write_volume
from MedFMLib.imaging.phantoms import make_ijk_to_ras
from MedFMLib.imaging.volume import Volume


def _write_nrrd(path, array_kji: np.ndarray, space: str, directions, origin) -> None:
    """A NRRD written by hand, so the test does not trust our own writer for the space field."""
    k, j, i = array_kji.shape
    directions_text = " ".join("(" + ",".join(f"{v:.17g}" for v in column) + ")" for column in directions)
    header = (
        "NRRD0004\n"
        "type: short\n"
        "dimension: 3\n"
        f"space: {space}\n"
        f"sizes: {i} {j} {k}\n"
        f"space directions: {directions_text}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: gzip\n"
        f"space origin: ({','.join(f'{v:.17g}' for v in origin)})\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(array_kji.astype("<i2").tobytes()))


def _array(shape=(5, 6, 7)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def test_ras_and_lps_nrrd_files_give_the_same_ras_geometry(tmp_path):
    ijk_to_ras = make_ijk_to_ras((0.7, 1.3, 2.9), (12.0, -30.0, 44.0), (20, -10, 35))
    array = _array()
    _write_nrrd(tmp_path / "ras.nrrd", array, "right-anterior-superior", ijk_to_ras[:3, :3].T, ijk_to_ras[:3, 3])
    flip = np.diag([-1.0, -1.0, 1.0])
    lps_directions = (flip @ ijk_to_ras[:3, :3]).T
    _write_nrrd(tmp_path / "lps.nrrd", array, "left-posterior-superior", lps_directions, flip @ ijk_to_ras[:3, 3])

    for name in ("ras.nrrd", "lps.nrrd"):
        volume = read_volume(tmp_path / name)
        np.testing.assert_allclose(volume.ijk_to_ras, ijk_to_ras, atol=1e-9, err_msg=name)
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.spacing, (0.7, 1.3, 2.9), atol=1e-9)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_oblique_anisotropic_round_trip(tmp_path, suffix):
    ijk_to_ras = make_ijk_to_ras((0.6, 0.9, 3.3), (-101.5, 22.25, 310.0), (33, 12, -47), (-1, 1, 1))
    volume = Volume(_array((4, 9, 11)), ijk_to_ras, name="in")
    path = write_volume(tmp_path / f"out{suffix}", volume)
    loaded = read_volume(path)
    # NIfTI stores float32 geometry.
    np.testing.assert_allclose(loaded.ijk_to_ras, ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(loaded.array, volume.array)


def test_a_voxel_maps_to_its_physical_position(tmp_path):
    """A single bright voxel, written as LPS by SimpleITK, is found at the RAS point we expect."""
    image = sitk.Image(10, 12, 8, sitk.sitkInt16)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))  # LPS
    image.SetPixel(3, 7, 5, 1000)  # (i, j, k)
    sitk.WriteImage(image, str(tmp_path / "dot.nrrd"))
    volume = read_volume(tmp_path / "dot.nrrd")
    lps = np.array(image.TransformIndexToPhysicalPoint((3, 7, 5)))
    ras = lps * np.array([-1, -1, 1])
    ijk = np.rint(volume.ras_to_ijk_points(ras)).astype(int)
    assert volume.array[ijk[2], ijk[1], ijk[0]] == 1000


def test_dicom_series_folder(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    array = (np.arange(4 * 16 * 20).reshape(4, 16, 20) % 300).astype(np.int16)
    spacing_z = 2.5
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing((0.8, 0.9))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4241",
            "0020|000e": series_uid,
            "0020|0032": f"-10\\-20\\{k * spacing_z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0028|0030": "0.9\\0.8",
            "0018|0050": str(spacing_z),
        }.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    volume = read_volume(folder)
    assert volume.array.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.9, spacing_z), atol=1e-6)
    np.testing.assert_allclose(volume.ijk_to_ras[:3, 3], (10.0, 20.0, 0.0), atol=1e-6)


def test_four_dimensional_volume_is_refused(tmp_path):
    image = sitk.Image([4, 4, 4, 3], sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "series.nrrd"))
    with pytest.raises(VolumeError, match="4D"):
        read_volume(tmp_path / "series.nrrd")


def test_rgb_volume_is_refused(tmp_path):
    image = sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeError, match="RGB"):
        read_volume(tmp_path / "rgb.nrrd")


def test_empty_and_malformed_volumes_are_refused():
    with pytest.raises(VolumeError, match="empty"):
        Volume(np.zeros((0, 4, 4)), np.eye(4))
    with pytest.raises(VolumeError, match="3D"):
        Volume(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(VolumeError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "notes.nrrd").write_text("this is not an image")
    with pytest.raises(VolumeError, match="Cannot read notes.nrrd"):
        read_volume(tmp_path / "notes.nrrd")
    with pytest.raises(VolumeError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path / "empty_folder")


def test_two_dimensional_image_becomes_a_one_slice_volume(tmp_path):
    image = sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(5, 6))
    sitk.WriteImage(image, str(tmp_path / "flat.nrrd"))
    volume = read_volume(tmp_path / "flat.nrrd")
    assert volume.array.shape == (1, 5, 6)


def test_fingerprint_depends_on_content_and_geometry():
    array = _array()
    a = Volume(array, np.eye(4))
    assert a.fingerprint == Volume(array.copy(), np.eye(4)).fingerprint
    assert a.fingerprint != Volume(array + 1, np.eye(4)).fingerprint
    assert a.fingerprint != Volume(array, np.diag([2.0, 1, 1, 1])).fingerprint
