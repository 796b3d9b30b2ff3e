"""The appearance model propagation judges slices by: histograms inside an object against the tissue around it."""

from __future__ import annotations

import numpy as np

from MedFMLib.imaging.appearance import Appearance


def disc(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def noisy(mask: np.ndarray, inside: float, outside: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(mask, inside, outside) + rng.normal(0, 0.03, mask.shape)


def test_a_bright_object_is_told_from_its_surroundings():
    shape = (80, 80)
    obj = disc(shape, (40, 40), 12)
    image = noisy(obj, 0.8, 0.3)
    appearance = Appearance.learn([(image, obj)])
    assert appearance is not None
    assert appearance.object_fraction(image, obj) > 0.97
    assert appearance.object_fraction(image, disc(shape, (10, 10), 6) & ~obj) < 0.03  # the surroundings
    half = obj | (disc(shape, (40, 70), 9) & ~obj)  # the object plus as much background: about 2/3 of it
    assert 0.55 < appearance.object_fraction(image, half) < 0.85
    assert appearance.object_fraction(image, np.zeros(shape, bool)) == 0.0
    # Nothing to learn from: an empty mask, or one pixel.
    assert Appearance.learn([(image, np.zeros(shape, bool))]) is None


def test_locate_follows_a_shifted_section_but_not_a_look_alike_elsewhere():
    shape = (100, 100)
    previous = disc(shape, (50, 40), 10)
    moved = disc(shape, (53, 44), 9)  # the next slice's section: shifted by 5 pixels, a little smaller
    elsewhere = disc(shape, (50, 85), 8)  # the same intensity, 35 pixels away
    appearance = Appearance.learn([(noisy(previous, 0.8, 0.3, 1), previous)])
    found = appearance.locate(noisy(moved | elsewhere, 0.8, 0.3, 2), previous)
    assert (found & moved).sum() >= 0.95 * moved.sum()
    assert not (found & elsewhere).any()
    assert found.sum() <= 1.05 * moved.sum()
    # The object ended: nothing on the next slice looks like it near where it was.
    assert not appearance.locate(noisy(elsewhere, 0.8, 0.3, 3), previous).any()


def test_a_ring_enhancing_object_is_found_whole():
    """An enhancing rim around a dark core (a tumour's necrosis): the core is filled, not left as a hole."""
    shape = (80, 80)
    outer, core = disc(shape, (40, 40), 14), disc(shape, (40, 40), 6)
    image = noisy(outer & ~core, 0.9, 0.3) + np.where(core, -0.1, 0.0)
    appearance = Appearance.learn([(image, outer)])
    found = appearance.locate(image, outer)
    assert (found & outer).sum() >= 0.97 * outer.sum() and found[40, 40]


def test_a_box_gives_what_the_object_looks_like():
    shape = (60, 60)
    obj = disc(shape, (30, 30), 10)
    image = noisy(obj, 0.2, 0.7)  # a dark object on bright tissue
    box = np.zeros(shape, bool)
    box[18:43, 18:43] = True
    appearance, middle = Appearance.from_box(image, box)
    assert middle[30, 30] and not middle[19, 19]
    found = appearance.locate(image, None, allowed=box, core=middle)
    assert abs(int(found.sum()) - int(obj.sum())) <= 0.05 * obj.sum() and (found & obj).sum() >= 0.95 * obj.sum()


def test_large_radius_morphology_matches_the_ball_kernel():
    """Radii above a few pixels go through a distance map (linear time): the very pixels of SimpleITK's ball."""
    import SimpleITK as sitk

    from MedFMLib.imaging.appearance import dilate, erode

    shape = (200, 200)
    mask = disc(shape, (100, 90), 50) | disc(shape, (30, 170), 15)
    mask[0:10, 0:40] = True  # touching the image's border, which counts as background
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    for radius in (4, 7, 12):
        kernel = [radius, radius]
        dilated = sitk.GetArrayFromImage(sitk.BinaryDilate(image, kernel, sitk.sitkBall)).astype(bool)
        eroded = sitk.GetArrayFromImage(sitk.BinaryErode(image, kernel, sitk.sitkBall, 0, 1, False)).astype(bool)
        assert np.array_equal(dilate(mask, radius), dilated) and np.array_equal(erode(mask, radius), eroded)
