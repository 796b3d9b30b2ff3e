"""`classic`: a weight-free engine, so MedFM works offline on any CPU.

Region growing from the positive points, bounded by the box and pushed back by
the negative points:

* each positive point takes the robust intensity of its neighbourhood; pixels
  connected to it whose value lies within a tolerance of it join the mask;
* a box limits the region, and without points its central area seeds it;
* when a negative point falls inside the grown region, the tolerance shrinks
  until it no longer does, and finally a small disc around it is cut away.

During propagation the prompts also carry the object's *appearance*, learnt
from the slices the user vouched for (see ``imaging/appearance.py``). Region
growing with one tolerance leaks on real anatomy (a ring-enhancing tumour is
not one intensity, and the brain around it is close); so a propagated slice is
segmented instead as the pixels that look more like the object than like its
surroundings, connected to the previous slice's core or to a positive point.
It has no logits: propagation hands it the previous slice's mask instead.

It is deterministic, so it also serves as the oracle of the geometry tests: a
click on a bright phantom sphere must return exactly that sphere's section.
"""

from __future__ import annotations

import numpy as np

from ..errors import PromptError
from ..imaging.appearance import Appearance
from .base import Embedding, Engine, Prediction, Prompts2D

# Tolerance around the seed value, in window units ([0, 1]); the lower bound
# keeps noise-free phantoms and flat regions from collapsing to a single pixel.
_MIN_TOLERANCE = 0.06
_NOISE_FACTOR = 3.0
_SEED_RADIUS = 2
_SHRINK_STEPS = 8
#: log-likelihood-ratio thresholds tried, in turn, until no negative point is inside the object
_RATIO_STEPS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: what a negative click must leave of the region: taking more, it took the object itself, and only cuts a disc
_KEEP_SHARE = 0.1


def _neighbourhood(image: np.ndarray, x: float, y: float, radius: int) -> np.ndarray:
    row, col = int(round(y)), int(round(x))
    return image[max(0, row - radius) : row + radius + 1, max(0, col - radius) : col + radius + 1]


class ClassicEngine(Engine):
    """Region growing seeded by points and bounded by a box; needs no weights."""

    model_name = "classic"
    prompt_types = ("point", "box")
    # Region growing works on the native grid; resampling would only blur its edges.
    prefers_square_pixels = False
    refines_from_mask = True
    #: its region comes from intensities, not from the box: a wider box only lets a leak through
    box_is_extent = False

    def __init__(self, device: str = "cpu") -> None:
        # Runs on the CPU whatever the caller asked for: there is nothing to accelerate.
        self.device = "cpu"

    def encode(self, image: np.ndarray) -> Embedding:
        image = np.ascontiguousarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"expected a 2D image, got shape {image.shape}")
        return Embedding(features=image, image_shape=image.shape, nbytes=image.nbytes)

    def decode(self, embedding: Embedding, prompts: Prompts2D, previous_logits: np.ndarray | None = None) -> Prediction:
        self.check_prompts(prompts)
        image: np.ndarray = embedding.features
        rows, cols = image.shape
        allowed = np.ones(image.shape, dtype=bool)
        positives = [tuple(p) for p, label in zip(prompts.points, prompts.labels) if label == 1]
        negatives = _pixels([tuple(p) for p, label in zip(prompts.points, prompts.labels) if label == 0], image.shape)
        seeds, seed_radius = positives, _SEED_RADIUS
        if prompts.box is not None:
            x0, y0, x1, y1 = prompts.box
            c0, c1 = int(np.clip(np.floor(x0 + 0.5), 0, cols - 1)), int(np.clip(np.ceil(x1 - 0.5), 0, cols - 1))
            r0, r1 = int(np.clip(np.floor(y0 + 0.5), 0, rows - 1)), int(np.clip(np.ceil(y1 - 0.5), 0, rows - 1))
            allowed[:] = False
            allowed[r0 : r1 + 1, c0 : c1 + 1] = True
            if not positives:
                seeds = [((x0 + x1) / 2.0, (y0 + y1) / 2.0)]
                seed_radius = max(_SEED_RADIUS, int(min(x1 - x0, y1 - y0) / 6))
        if not seeds:
            raise PromptError("The classic model needs at least one positive point or a box.")
        previous = None
        if previous_logits is not None and np.shape(previous_logits) == image.shape:
            previous = np.asarray(previous_logits) > 0
        if prompts.appearance is not None:
            return _prediction(_by_appearance(image, prompts.appearance, allowed, seeds, negatives, previous))
        if prompts.box is not None:
            # A box says what the object looks like (its middle) and what it does not (just outside).
            appearance, middle = Appearance.from_box(image, allowed)
            # Inside a box drawn within the object, its middle looks like its outside: grow from the seeds.
            if appearance is not None and appearance.object_fraction(image, middle) >= 0.5:
                return _prediction(_by_appearance(image, appearance, allowed, positives, negatives, None, middle))
        return _prediction(_region_grow(image, allowed, seeds, negatives, seed_radius))


def _prediction(mask: np.ndarray) -> Prediction:
    return Prediction(mask=mask, score=1.0 if mask.any() else 0.0, low_res_logits=None)


def _pixels(points: list[tuple[float, float]], shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, col) of points (x, y) that fall on the image."""
    rows, cols = shape
    pixels = [(int(round(y)), int(round(x))) for x, y in points]
    return [(r, c) for r, c in pixels if 0 <= r < rows and 0 <= c < cols]


def _cut_around(mask: np.ndarray, negative_pixels: list[tuple[int, int]]) -> np.ndarray:
    """The mask less a small disc around each negative pixel still inside it."""
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    for r, c in negative_pixels:
        if mask[r, c]:
            mask = mask & ((yy - r) ** 2 + (xx - c) ** 2 > (2 * _SEED_RADIUS + 1) ** 2)
    return mask


def _region_grow(
    image: np.ndarray,
    allowed: np.ndarray,
    seeds: list[tuple[float, float]],
    negative_pixels: list[tuple[int, int]],
    seed_radius: int,
) -> np.ndarray:
    """Pixels connected to each seed within a tolerance of its neighbourhood's value; negative pixels (row, col)
    shrink it."""
    import SimpleITK as sitk

    rows, cols = image.shape
    seed_stats = []
    for x, y in seeds:
        patch = _neighbourhood(image, x, y, seed_radius)
        centre = float(np.median(patch))
        spread = float(np.median(np.abs(patch - centre))) * 1.4826
        seed_stats.append((x, y, centre, max(_MIN_TOLERANCE, _NOISE_FACTOR * spread)))

    sitk_image = sitk.GetImageFromArray(np.where(allowed, image, np.float32(-10.0)).astype(np.float32))

    mask = np.zeros(image.shape, dtype=bool)
    first = None
    for step in range(_SHRINK_STEPS + 1):
        shrink = 0.75**step
        mask[:] = False
        for x, y, centre, tolerance in seed_stats:
            seed = (int(np.clip(round(x), 0, cols - 1)), int(np.clip(round(y), 0, rows - 1)))
            if not allowed[seed[1], seed[0]]:
                continue
            grown = sitk.ConnectedThreshold(
                sitk_image,
                seedList=[seed],
                lower=centre - tolerance * shrink,
                upper=centre + tolerance * shrink,
            )
            mask |= sitk.GetArrayViewFromImage(grown).astype(bool)
        first = mask.copy() if first is None else first
        if not any(mask[r, c] for r, c in negative_pixels):
            break
    if mask.sum() < _KEEP_SHARE * first.sum():
        mask = first  # a negative click takes a part away, never the object itself: a disc only
    mask = _cut_around(mask, negative_pixels)

    filled = sitk.GetArrayFromImage(
        sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)), fullyConnected=False)
    ).astype(bool)
    holes = filled & ~mask
    if holes.any() and negative_pixels:
        # A hole the user marked negative is background, not a gap to close.
        hole_labels = sitk.GetArrayFromImage(
            sitk.ConnectedComponent(sitk.GetImageFromArray(holes.astype(np.uint8)))
        )
        for r, c in negative_pixels:
            if hole_labels[r, c]:
                filled[hole_labels == hole_labels[r, c]] = False
    return filled & allowed


def _by_appearance(
    image: np.ndarray,
    appearance: Appearance,
    allowed: np.ndarray,
    positives: list[tuple[float, float]],
    negative_pixels: list[tuple[int, int]],
    previous: np.ndarray | None,
    core: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels that look like the object, near the previous slice's mask, connected to its core or to a point.

    A negative point inside raises the likelihood threshold until it is outside; failing that, a small
    disc around it is cut away. (Measured against a local cut, the part nearer the negative point than
    the positive evidence, on the real cases: the threshold did better on two of three lesions.)
    """
    rows, cols = image.shape
    seeds = [(int(np.clip(round(y), 0, rows - 1)), int(np.clip(round(x), 0, cols - 1))) for x, y in positives]
    first = None
    for threshold in _RATIO_STEPS:
        mask = appearance.locate(image, previous, allowed, seeds, threshold, core)
        first = mask if first is None else first
        if not any(mask[r, c] for r, c in negative_pixels):
            break
    if mask.sum() < _KEEP_SHARE * first.sum():
        mask = first  # a negative click takes a part away, never the object itself: a disc only
    return _cut_around(mask, negative_pixels)
