"""What an object looks like: intensity histograms inside it and in a ring of tissue around it.

Propagation learns an ``Appearance`` from the slices the user vouched for (the
anchors) and uses it on every new slice, whatever the engine:

* to judge a new slice's mask: on real scans a model always finds *something*
  in a carried box, and when the object has ended that something is tissue
  that looks like the surroundings, not like the object;
* to find where the object went: pixels that look like the object near the
  previous slice's mask, from which a box or a point for the new slice follows.

It is a likelihood ratio of two smoothed histograms: no training, no weights,
deterministic, and robust to an object that is not one flat intensity (a
ring-enhancing tumour). Images are the engine's windowed slices, masks their
boolean masks; morphology runs in SimpleITK.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: histogram bins over the intensities seen inside and around the object
BINS = 32
#: a mask smaller than this says too little about the object to learn from
MIN_LEARN_PIXELS = 4
#: how far (times its radius) an object's section may reach beyond its section on the neighbouring slice
REACH = 1.0
#: pixels between the object and the ring of surrounding tissue (partial-volume edge left out)
_RING_GAP = 2


def _sitk_binary(mask: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))


def _to_bool(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(bool)


#: radii above this dilate and erode by a distance map (linear time), below it by a ball kernel
_KERNEL_RADIUS_LIMIT = 3


def _grown(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within a ball of ``radius`` of the mask (the ball kernel's own half-pixel reach), by a distance map."""
    import SimpleITK as sitk

    distance = sitk.SignedMaurerDistanceMap(_sitk_binary(mask), insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=False)  # fmt: skip
    return sitk.GetArrayFromImage(distance) <= radius + 0.5


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius > _KERNEL_RADIUS_LIMIT:
        return _grown(mask, radius)
    return _to_bool(sitk.BinaryDilate(_sitk_binary(mask), [int(radius)] * mask.ndim, sitk.sitkBall))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    if radius <= 0 or not mask.any():
        return mask.copy()
    if radius > _KERNEL_RADIUS_LIMIT:  # the background grown into the object, the image's border included
        inside = (slice(1, -1),) * mask.ndim
        return ~_grown(~np.pad(mask, 1), radius)[inside]
    # The border is background, so an object touching the image edge erodes from there too.
    return _to_bool(sitk.BinaryErode(_sitk_binary(mask), [int(radius)] * mask.ndim, sitk.sitkBall, 0, 1, False))


def components(mask: np.ndarray) -> np.ndarray:
    """Connected components (8-connected in 2D), labelled 1, 2, …; 0 is background."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ConnectedComponent(_sitk_binary(mask), True))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    return _to_bool(sitk.BinaryFillhole(_sitk_binary(mask), fullyConnected=False))


def equivalent_radius(mask: np.ndarray) -> float:
    """The radius of a disc with the mask's area, in pixels."""
    return float(np.sqrt(mask.sum() / np.pi))


def surrounding_ring(mask: np.ndarray) -> np.ndarray:
    """Tissue around a mask: as wide as the object's radius (at least 4 pixels), a small gap left out."""
    width = max(4, int(round(equivalent_radius(mask))))
    return dilate(mask, width + _RING_GAP) & ~dilate(mask, _RING_GAP)


@dataclass(frozen=True)
class Appearance:
    """Histograms of the object's intensities and of the tissue around it, as probabilities per bin."""

    edges: np.ndarray
    inside: np.ndarray
    outside: np.ndarray

    @classmethod
    def from_box(cls, image: np.ndarray, box: np.ndarray) -> tuple[Appearance | None, np.ndarray]:
        """(appearance, middle) from a box drawn around an object: it fills the box's middle, and the tissue
        just outside the box is not the object. ``box``: the box's pixels, a boolean mask."""
        rows, cols = np.nonzero(box)
        if len(rows) == 0:
            return None, box
        quarter = max(1, int(round(min(np.ptp(rows) + 1, np.ptp(cols) + 1) / 4)))
        middle = erode(box, quarter)
        if middle.sum() < MIN_LEARN_PIXELS:
            middle = box
        ring = dilate(box, max(3, quarter)) & ~box
        if not ring.any():
            return None, middle
        return cls._from_values(np.asarray(image, np.float64)[middle], np.asarray(image, np.float64)[ring]), middle

    @classmethod
    def learn(cls, examples: Iterable[tuple[np.ndarray, np.ndarray]]) -> Appearance | None:
        """From (image, mask) pairs on which the object is known; None when no mask says enough."""
        inside, outside = [], []
        for image, mask in examples:
            mask = np.asarray(mask, dtype=bool)
            if mask.sum() < MIN_LEARN_PIXELS or mask.all():
                continue
            ring = surrounding_ring(mask)
            if not ring.any():
                continue
            inside.append(np.asarray(image, np.float64)[mask])
            outside.append(np.asarray(image, np.float64)[ring])
        if not inside:
            return None
        return cls._from_values(np.concatenate(inside), np.concatenate(outside))

    @classmethod
    def _from_values(cls, inside_values: np.ndarray, outside_values: np.ndarray) -> Appearance:
        low, high = np.percentile(np.concatenate([inside_values, outside_values]), [0.5, 99.5])
        if not high > low:
            high = low + 1e-6
        edges = np.linspace(low, high, BINS + 1)
        return cls(edges, _histogram(inside_values, edges), _histogram(outside_values, edges))

    def log_ratio(self, values: np.ndarray) -> np.ndarray:
        """log P(value | object) / P(value | surroundings), per value: positive where it looks like the object."""
        bins = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, len(self.inside) - 1)
        return np.log(self.inside[bins] / self.outside[bins])

    def object_fraction(self, image: np.ndarray, mask: np.ndarray) -> float:
        """The share of a mask's pixels that look more like the object than like its surroundings."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return 0.0
        return float((self.log_ratio(np.asarray(image)[mask]) > 0).mean())

    def locate(
        self,
        image: np.ndarray,
        previous: np.ndarray | None,
        allowed: np.ndarray | None = None,
        seeds: Iterable[tuple[int, int]] = (),
        threshold: float = 0.0,
        core: np.ndarray | None = None,
    ) -> np.ndarray:
        """Where the object is on a slice (empty if nowhere), from its mask on the neighbouring one.

        The pixels that look like the object (log ratio above ``threshold``) within
        ``REACH`` times the object's radius of the ``previous`` mask (how far a
        section moves and grows between slices) or around a seed, inside ``allowed``, that connect
        to the previous mask's core (or to ``core`` when given) or to a ``seeds``
        pixel (row, col); holes filled, as an object's section has none.
        """
        image = np.asarray(image)
        allowed = np.ones(image.shape, dtype=bool) if allowed is None else allowed
        near = allowed
        given_core = core
        core = np.zeros(image.shape, dtype=bool)
        if previous is not None and np.any(previous):
            previous = np.asarray(previous, dtype=bool)
            radius = max(3, int(round(equivalent_radius(previous))))
            near = allowed & dilate(previous, max(2, int(round(REACH * radius))))
            core = erode(previous, max(1, radius // 3))
            if core.sum() < MIN_LEARN_PIXELS:
                core = previous
            seeds = [(r, c) for r, c in seeds if allowed[r, c]]
            if seeds:
                # A click away from the mask says the object is there too: look around it as far as the object is big.
                clicked = np.zeros(image.shape, dtype=bool)
                clicked[tuple(np.array(seeds).T)] = True
                near = near | (allowed & dilate(clicked, radius + max(2, int(round(REACH * radius)))))
        if given_core is not None:
            core = np.asarray(given_core, dtype=bool)
        seeds = [(r, c) for r, c in seeds if allowed[r, c]]
        # A 3x3 majority vote fills a textured object's pinholes and drops lone look-alike pixels, and unlike
        # averaging the ratio it keeps the object's edges where they are.
        each = self.log_ratio(image) > threshold
        looks = _majority(each)
        # A one-pixel opening drops the speckle that joins an object to look-alike neighbours (before the
        # limits cut the picture: a box's edge must not open away the object's pixels along it).
        candidates = looks & dilate(erode(looks, 1), 1) & near
        for r, c in seeds:  # a seed belongs to the object, whatever it looks like
            candidates[r, c] = True
        labels = components(candidates)
        touching = set(np.unique(labels[core & candidates]).tolist())
        touching.update(int(labels[r, c]) for r, c in seeds)
        touching.discard(0)
        kept = np.isin(labels, sorted(touching))
        # The vote and the opening decide the shape; each pixel's own look decides its edge, one pixel deep.
        kept |= each & dilate(kept, 1) & near
        return fill_holes(kept) & allowed


def _majority(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    return _to_bool(sitk.BinaryMedian(_sitk_binary(mask), [1] * mask.ndim, 1, 0))


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), edges)
    # A little mass everywhere, and a one-bin blur: an unseen value is unlikely, not impossible.
    counts = counts.astype(np.float64) + 0.5
    counts = np.convolve(np.pad(counts, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    return counts / counts.sum()
