"""Clicks in RAS land on the right IJK slice and pixel, whatever the volume's orientation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.errors import PromptError
from MedFMLib.imaging.geometry import (
    SlicePlane,
    axis_for_normal,
    box_on_plane,
    extract_slice,
    plane_through,
    point_on_plane,
    view_axes,
    write_slice,
)
from MedFMLib.imaging.phantoms import make_ijk_to_ras
from MedFMLib.imaging.resample import isotropic_shape, resize_linear
from MedFMLib.imaging.volume import Volume
from MedFMLib.interaction.session import Session


def test_view_axes_follow_the_anatomy():
    assert view_axes(np.eye(4)) == {"sagittal": 0, "coronal": 1, "axial": 2}
    # LPS storage flips I and J but does not change which axis is which.
    assert view_axes(make_ijk_to_ras(axis_signs=(-1, -1, 1))) == {"sagittal": 0, "coronal": 1, "axial": 2}
    # A sagittal acquisition: I runs A→P, J runs S→I, K runs L→R.
    sagittal_acquired = np.eye(4)
    sagittal_acquired[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    assert view_axes(sagittal_acquired) == {"sagittal": 2, "coronal": 0, "axial": 1}
    # 40 degrees oblique: still three distinct axes, each the closest one.
    oblique = make_ijk_to_ras(angles_deg=(40, 0, 0))
    assert view_axes(oblique) == {"sagittal": 0, "coronal": 1, "axial": 2}
    assert sorted(view_axes(make_ijk_to_ras(angles_deg=(45, 45, 45))).values()) == [0, 1, 2]


def test_axis_for_a_slice_view_normal():
    sagittal_acquired = np.eye(4)
    sagittal_acquired[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    assert axis_for_normal(sagittal_acquired, (1, 0, 0)) == 2
    assert axis_for_normal(sagittal_acquired, (0, 0.2, -1)) == 1
    with pytest.raises(PromptError):
        axis_for_normal(np.eye(4), (0, 0, 0))


def test_plane_images_match_numpy_indexing():
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # K=4, J=5, I=6
    assert extract_slice(array, SlicePlane(2, 3)).shape == (5, 6)  # rows J, cols I
    assert extract_slice(array, SlicePlane(1, 2)).shape == (4, 6)  # rows K, cols I
    assert extract_slice(array, SlicePlane(0, 1)).shape == (4, 5)  # rows K, cols J
    plane = SlicePlane(0, 1)
    # Pixel (x, y) of a plane is voxel (col_axis=x, row_axis=y).
    xy = plane.ijk_to_xy(np.array([1.0, 3.0, 2.0]))[0]
    assert extract_slice(array, plane)[int(xy[1]), int(xy[0])] == array[2, 3, 1]
    target = np.zeros_like(array)
    write_slice(target, plane, np.ones((4, 5), dtype=array.dtype))
    assert target[:, :, 1].all() and target.sum() == 20


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_click_on_sphere_centre_gives_its_cross_section(geometry, view):
    volume, sphere, centre = sphere_volume(geometry)
    session = Session(volume, ClassicEngine())
    object_id = session.add_object()
    update = session.add_point(object_id, centre, view=view)
    plane = update.plane
    assert plane == plane_through(volume, centre, view)
    truth = extract_slice(sphere, plane)
    found = extract_slice(session.mask(object_id), plane)
    assert truth.sum() > 20
    np.testing.assert_array_equal(found, truth)
    # Nothing is written outside the clicked plane.
    assert session.mask(object_id).sum() == truth.sum()


def test_click_position_maps_to_the_pixel_under_the_cursor(geometry):
    volume, _, _ = sphere_volume(geometry)
    rng = np.random.default_rng(7)
    for _ in range(20):
        ijk = rng.uniform(0, np.array(volume.dimensions) - 1)
        ras = volume.ijk_to_ras_points(ijk)
        for view in ("axial", "coronal", "sagittal"):
            plane = plane_through(volume, ras, view)
            assert plane.index == int(np.rint(ijk[plane.axis]))
            xy = point_on_plane(volume, plane, ras)
            np.testing.assert_allclose(xy, [ijk[plane.col_axis], ijk[plane.row_axis]], atol=1e-9)


def test_prompt_outside_the_volume_is_an_error():
    volume, _, centre = sphere_volume("oblique_anisotropic")
    session = Session(volume, ClassicEngine())
    object_id = session.add_object()
    far = volume.ijk_to_ras_points(np.array([-3.0, 5.0, 5.0]))
    with pytest.raises(PromptError, match="outside the volume"):
        session.add_point(object_id, far)
    assert not session.mask(object_id).any() and not session.can_undo


def test_box_on_one_slice_and_across_slices():
    volume = Volume(np.zeros((10, 20, 30), np.int16), make_ijk_to_ras((1.0, 1.0, 2.0)))
    a, b = volume.ijk_to_ras_points(np.array([[3.0, 4.0, 5.0], [12.0, 2.0, 5.2]]))
    plane, box = box_on_plane(volume, a, b, "axial")
    assert plane == SlicePlane(2, 5)
    np.testing.assert_allclose(box, [3, 2, 12, 4], atol=1e-9)
    c = volume.ijk_to_ras_points(np.array([12.0, 2.0, 8.0]))
    with pytest.raises(PromptError, match="different slices"):
        box_on_plane(volume, a, c, "axial")


def test_resampling_helpers():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(resize_linear(image, (3, 4)), image)
    doubled = resize_linear(image, (6, 8))
    assert doubled.shape == (6, 8)
    assert doubled.min() >= image.min() and doubled.max() <= image.max()
    np.testing.assert_allclose(resize_linear(doubled, (3, 4))[1:-1, 1:-1], image[1:-1, 1:-1], atol=0.5)
    assert isotropic_shape((40, 100), (2.5, 0.5)) == (200, 100)
    assert isotropic_shape((1000, 100), (5.0, 1.0), max_side=1000) == (1000, 20)


def test_anisotropic_slices_are_resampled_to_square_pixels_and_back():
    volume, sphere, centre = sphere_volume("lps_anisotropic")  # 0.8 x 0.8 x 3.0 mm
    session = Session(volume, ClassicEngine(), isotropic=True)
    plane = plane_through(volume, centre, "coronal")
    rows, cols = plane.shape(volume)
    assert session.model_image_shape(plane) == (round(rows * 3.0 / 0.8), cols)
    object_id = session.add_object()
    session.add_point(object_id, centre, view="coronal")
    found, truth = extract_slice(session.mask(object_id), plane), extract_slice(sphere, plane)
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.95


def test_a_rotated_3d_box_footprint_matches_sampled_points(geometry):
    from MedFMLib.imaging.geometry import SlicePlane, roi_footprint, roi_slice_range
    from MedFMLib.imaging.phantoms import rotation_matrix

    volume, _, centre = sphere_volume(geometry)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    half = np.array([7.0, 5.0, 6.0])
    rotation = rotation_matrix((20, -10, 35))
    corners = centre + (signs * half) @ rotation.T
    for axis in range(3):
        first, last = roi_slice_range(volume, corners, axis)
        plane = SlicePlane(axis, (first + last) // 2)
        box = roi_footprint(volume, corners, plane)
        # Sample the plane finely; keep the samples inside the rotated box (in the box's own frame).
        rows, cols = plane.shape(volume)
        y, x = np.mgrid[0 : rows - 1 : 0.05, 0 : cols - 1 : 0.05]
        ijk = np.zeros((x.size, 3))
        ijk[:, axis], ijk[:, plane.row_axis], ijk[:, plane.col_axis] = plane.index, y.ravel(), x.ravel()
        local = (volume.ijk_to_ras_points(ijk) - centre) @ rotation
        inside = np.all(np.abs(local) <= half, axis=1)
        xs, ys = x.ravel()[inside], y.ravel()[inside]
        np.testing.assert_allclose(
            box, [xs.min(), ys.min(), xs.max(), ys.max()], atol=0.1
        )  # the sampling step, diagonally
        assert roi_footprint(volume, corners, SlicePlane(axis, first)) is not None
        assert roi_footprint(volume, corners, SlicePlane(axis, last)) is not None
    assert roi_footprint(volume, corners, SlicePlane(2, last + 5)) is None


@pytest.mark.parametrize(
    ("span_mm", "expected"),
    [
        ((5.2, 11.6), (5, 12)),  # a slice counts when its centre is within half a voxel of the box
        ((5.6, 11.4), (6, 11)),
        ((-3.0, 2.2), (0, 2)),  # cut at the volume's first slice
        ((20.7, 40.0), (21, 23)),  # and at its last (24 slices)
        ((7.0, 7.0), (7, 7)),  # a flat box on one slice
    ],
)
def test_a_3d_box_reaches_the_slices_worked_out_by_hand(span_mm, expected):
    """RAS-aligned 1 mm voxels from the origin: slice k is centred at S = k mm (worked out by hand, not computed)."""
    from MedFMLib.imaging.geometry import box_corners, roi_slice_range

    volume, _, _ = sphere_volume("ras_aligned")  # 48 x 44 x 24 voxels
    corners = box_corners((10.0, 10.0, span_mm[0]), (20.0, 20.0, span_mm[1]))
    assert roi_slice_range(volume, corners, 2) == expected
    assert roi_slice_range(volume, corners, 0) == (10, 20)  # along R: columns 10 to 20


def test_a_3d_box_range_on_an_lps_anisotropic_grid():
    """3 mm slices, origin S = -60 mm, K along +S: slice k is centred at S = -60 + 3k (by hand)."""
    from MedFMLib.imaging.geometry import box_corners, roi_slice_range

    volume, _, _ = sphere_volume("lps_anisotropic")
    # S from -50 to -41: slice 3 is centred at -51 (-51 + 1.5 >= -50, so it counts), slice 6 at -42, slice 7 at -39.
    assert roi_slice_range(volume, box_corners((100.0, 70.0, -50.0), (110.0, 80.0, -41.0)), 2) == (3, 6)
