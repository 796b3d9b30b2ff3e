"""Carry a segmentation from its prompted slices through the volume.

Propagation walks slice by slice along one IJK axis, away from each *anchor*
(a slice the user prompted or corrected, or the middle slice of a 3D box).
Each new slice is prompted from the one before: the previous mask's bounding
box (with a margin), a point deep inside the previous mask, and the previous
low-resolution logits as a mask prompt, each as the engine takes them. An
engine with a memory of earlier frames (SAM 2) tracks instead, conditioned on
every anchor.

On real scans a model always finds *something* in a carried box, so the walk
also knows what the object looks like: an ``Appearance`` learnt from the
anchors (intensities inside the object against the tissue around it). On each
new slice it finds where the object went (the pixels that look like it, near
the previous mask), and the carried box and point are drawn there rather than
where the object was; and a new mask that looks mostly like the surroundings
ends the walk. Sections grow between thick slices faster than a carried box's
margin: a model that reads the box as the object's extent and fills it to a
side gets that side widened and decodes again (decoder only).

A walk stops where the object ends (its area collapses), where the model
loses confidence, where the new mask looks unlike the object, stops
overlapping the previous one or suddenly grows (a leak), at a 3D box's last
slice, at the volume's edge, or at the next anchor: anchors are never
overwritten. Between two anchors each one fills the slices nearer to it.

The computation only reads the session, so it can run on a worker thread; the
result is applied afterwards, as one undoable step, by ``Session.apply_propagation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..engines.base import Prompts2D
from ..errors import PromptError
from ..imaging.appearance import Appearance, dilate, equivalent_radius
from ..imaging.geometry import SlicePlane, box_mask, extract_slice, roi_footprint, roi_slice_range
from ..imaging.volume import Volume
from .objects import PROPAGATED, SliceState

FORWARD, BACKWARD, BOTH = "forward", "backward", "both"
DIRECTIONS = (BOTH, FORWARD, BACKWARD)

#: why a walk stopped, and how to say it
STOP_REASONS = {
    "end": "the object ended (its area fell below the minimum)",
    "collapse": "the object's area collapsed",
    "quality": "the model's confidence dropped",
    "appearance": "the new slice's mask looks like the surrounding tissue, not like the object",
    "overlap": "the overlap with the previous slice dropped",
    "growth": "the area grew too fast (a leak)",
    "roi": "it reached the end of the 3D box",
    "edge": "it reached the edge of the volume",
    "anchor": "it reached a slice you prompted or corrected",
    "converged": "the result matched the earlier propagation again",
    "cancelled": "it was cancelled",
}


@dataclass(frozen=True)
class StopCriteria:
    """When a walk decides that the object has ended or the model lost it."""

    #: fewer pixels than this: the object ended
    min_area_pixels: int = 4
    #: less than this fraction of the previous slice's area: the area collapsed
    min_area_ratio: float = 0.15
    #: the model's own quality estimate (SAM's predicted IoU, SAM 2's object presence) below this
    min_score: float = 0.5
    #: pixels within reach of the previous mask (half its radius) over the smaller mask below this: lost it
    min_overlap: float = 0.5
    #: more than this times the previous area, plus ``growth_allowance_pixels``: a leak
    max_area_ratio: float = 2.5
    growth_allowance_pixels: int = 50
    #: less than this share of the mask looking like the object (by the anchors' appearance): it ended
    min_object_fraction: float = 0.5


@dataclass(frozen=True)
class PropagationOptions:
    criteria: StopCriteria = field(default_factory=StopCriteria)
    #: prompt each slice with the previous mask's bounding box, grown by this many pixels and this fraction
    use_box: bool = True
    box_margin_pixels: float = 3.0
    box_margin_fraction: float = 0.1
    #: a positive point at the deepest pixel of the previous mask (engines that take points)
    use_point: bool = True
    #: the previous slice's low-resolution logits as a mask prompt (engines that return them)
    use_mask: bool = True
    #: use the engine's memory across slices where it has one (SAM 2)
    use_memory: bool = True
    #: learn the object's appearance from the anchors: find the object on each new slice by it (the carried
    #: box and point go there), and give it to engines that segment by intensity
    use_appearance: bool = True
    #: a mask that reaches a side of its carried box says the object goes on past it (it grew since the last
    #: slice): widen those sides by this fraction (at least ``box_margin_pixels``) and decode again, at most
    #: ``box_widenings`` times
    box_widenings: int = 3
    box_widen_fraction: float = 0.25
    #: a box-only model also decodes its carried box grown by this fraction of its size on every side, and the
    #: grown box's answer is kept when the model rates it higher by ``grown_box_min_gain`` (0: never)
    grown_box_fraction: float = 0.25
    grown_box_min_gain: float = 0.05
    #: after a correction: stop once a slice agrees with its earlier result to this Dice
    converge_dice: float = 0.97
    #: a 3D box bounds every slice by its footprint (a Slicer ROI drawn around the object); False: by its slice
    #: range only (a box drawn on one slice and given a depth, as the CVPR 2025 challenge's boxes are)
    roi_bounds_footprint: bool = True


@dataclass(frozen=True)
class Walk:
    """One walk from an anchor: the slices ``start + step``, … up to ``limit`` (inclusive)."""

    start: int
    step: int
    limit: int
    #: why the walk ends at ``limit`` if nothing stops it before
    limit_reason: str

    @property
    def length(self) -> int:
        return max(0, (self.limit - self.start) * self.step)


@dataclass
class PropagationResult:
    """New states per plane (None: the plane's propagated mask is removed) and why each walk stopped."""

    object_id: int
    axis: int
    states: dict = field(default_factory=dict)
    #: (start index, "forward"|"backward", reason key, index of the last slice written)
    stops: list[tuple[int, str, str, int]] = field(default_factory=list)
    #: each written plane's state when the result was computed: a plane the user changed since is kept
    basis: dict = field(default_factory=dict)

    @property
    def slices_written(self) -> int:
        return sum(1 for state in self.states.values() if state is not None)

    def describe(self) -> list[str]:
        lines = []
        for start, direction, reason, last in self.stops:
            lines.append(f"from slice {start} {direction}: stopped after slice {last}: {STOP_REASONS[reason]}")
        return lines


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def stop_reason(
    previous: np.ndarray, mask: np.ndarray, score: float, criteria: StopCriteria, object_fraction: float = 1.0
) -> str | None:
    """The reason to stop at a slice whose mask is ``mask``, given the previous slice's; None to go on.

    ``object_fraction``: the share of the mask that looks like the object (1.0 when nothing is known).
    """
    area, previous_area = int(mask.sum()), int(previous.sum())
    if area < max(1, criteria.min_area_pixels):  # an empty mask has nothing to carry on
        return "end"
    if area < criteria.min_area_ratio * previous_area:
        return "collapse"
    if score < criteria.min_score:
        return "quality"
    if object_fraction < criteria.min_object_fraction:
        return "appearance"
    # A section moves between slices (more so on thick ones): it overlaps where the previous one could have gone.
    reach = max(2, int(round(equivalent_radius(previous))) // 2)
    overlap = float(np.logical_and(mask, dilate(previous, reach)).sum()) / max(1, min(area, previous_area))
    if overlap < criteria.min_overlap:
        return "overlap"
    if area > criteria.max_area_ratio * previous_area + criteria.growth_allowance_pixels:
        return "growth"
    return None


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel (x, y) farthest from the mask's border: a positive point that stays inside a shrinking object."""
    import SimpleITK as sitk

    padded = np.pad(mask, 1).astype(np.uint8)
    distance = sitk.GetArrayFromImage(  # a copy: a view would outlive the temporary image
        sitk.SignedMaurerDistanceMap(
            sitk.GetImageFromArray(padded), insideIsPositive=True, squaredDistance=False, useImageSpacing=False
        )
    )
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col - 1), float(row - 1)


def clamped_box(box: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """A 2D box (x0, y0, x1, y1) cut to a bounding box, never inside out."""
    box = np.concatenate([np.maximum(box[:2], bound[:2]), np.minimum(box[2:], bound[2:])])
    box[2:] = np.maximum(box[2:], box[:2])
    return box


def carried_prompts(
    previous_mask: np.ndarray,
    options: PropagationOptions,
    prompt_types: tuple[str, ...],
    bound: np.ndarray | None,
    appearance: Appearance | None = None,
) -> Prompts2D:
    """Prompts for the next slice from a mask (the previous slice's, or where the object was found on this one)."""
    rows, cols = previous_mask.shape
    ys, xs = np.nonzero(previous_mask)
    box = None
    if options.use_box and "box" in prompt_types:
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        margin_x = options.box_margin_pixels + options.box_margin_fraction * (x1 - x0 + 1)
        margin_y = options.box_margin_pixels + options.box_margin_fraction * (y1 - y0 + 1)
        box = np.array(
            [
                max(0.0, x0 - margin_x),
                max(0.0, y0 - margin_y),
                min(cols - 1.0, x1 + margin_x),
                min(rows - 1.0, y1 + margin_y),
            ],
            dtype=np.float32,
        )
        if bound is not None:  # a 3D box is a hard limit
            box = clamped_box(box, bound)
    points = np.zeros((0, 2), np.float32)
    if (options.use_point and "point" in prompt_types) or box is None:
        points = np.array([deepest_point(previous_mask)], np.float32)
    return Prompts2D(points, np.ones(len(points), np.int32), box, appearance)


def widened_box(
    mask: np.ndarray, box: np.ndarray, options: PropagationOptions, bound: np.ndarray | None
) -> np.ndarray | None:
    """The carried box widened on each side that the mask reaches (within a pixel); None when none can widen."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    reached = np.array([xs.min() <= box[0] + 1, ys.min() <= box[1] + 1, xs.max() >= box[2] - 1, ys.max() >= box[3] - 1])
    step_x = max(options.box_margin_pixels, options.box_widen_fraction * (box[2] - box[0] + 1))
    step_y = max(options.box_margin_pixels, options.box_widen_fraction * (box[3] - box[1] + 1))
    rows, cols = mask.shape
    wider = box + np.array([-step_x, -step_y, step_x, step_y], np.float32) * reached
    wider = np.clip(wider, 0.0, [cols - 1.0, rows - 1.0, cols - 1.0, rows - 1.0])
    if bound is not None:
        wider = clamped_box(wider, bound)
    wider = wider.astype(np.float32)
    return None if np.allclose(wider, box) else wider


def within_box(state: SliceState, box: np.ndarray | None) -> SliceState:
    """A state whose mask is cut to a 3D box's footprint: a box prompt guides a model but does not bound it."""
    if box is None or state.mask is None:
        return state
    return replace(state, mask=state.mask & box_mask(state.mask.shape, box))


class SliceModel(Protocol):
    """What propagation needs from a session: the volume, the engine, and decoding of one slice's prompts."""

    volume: Volume
    engine: object
    window: object  # the session's ``Window``: the intensities the engine sees

    def predict(self, state: SliceState) -> SliceState | None: ...

    def to_slice_grid(self, plane: SlicePlane, mask: np.ndarray) -> np.ndarray: ...

    def frames(self, axis: int): ...


class Propagator:
    """Plans and runs the walks of one propagation (read-only: see ``Session.apply_propagation``).

    ``slices`` are the object's slice states as they stand; ``model`` decodes new ones.
    """

    def __init__(
        self,
        model: SliceModel,
        slices: Mapping[SlicePlane, SliceState],
        object_id: int,
        axis: int,
        options: PropagationOptions | None = None,
        overlay: dict | None = None,
    ) -> None:
        self.model = model
        self.volume = model.volume
        self.stored = slices
        self.object_id = object_id
        self.axis = axis
        self.options = options or PropagationOptions()
        # The object's slices as the walks see them: ``overlay`` states (None: removed) shadow the stored ones,
        # so a plan can build on changes not applied yet without touching the session.
        merged = {**slices, **(overlay or {})}
        self.slices = {plane: state for plane, state in merged.items() if state is not None}
        self.count = self.volume.dimensions[axis]
        self.roi = self._roi()
        self._last_image: tuple[SlicePlane, np.ndarray] | None = None
        self.appearance = self._learn_appearance() if self.options.use_appearance else None

    # ------------------------------------------------------------------ plan
    def _roi(self) -> tuple[np.ndarray, int, int] | None:
        for state in self.slices.values():
            if state.roi_corners is not None and state.plane.axis == self.axis:
                first, last = roi_slice_range(self.volume, state.roi_corners, self.axis)
                return state.roi_corners, first, last
        return None

    def image(self, plane: SlicePlane) -> np.ndarray:
        """A slice as the engine sees its intensities (windowed), on the slice's own pixel grid.

        The last one is kept: a walk looks for the object on a slice and then judges its mask there.
        """
        if self._last_image is None or self._last_image[0] != plane:
            self._last_image = (plane, self.model.window.apply(extract_slice(self.volume.array, plane)))
        return self._last_image[1]

    def _learn_appearance(self) -> Appearance | None:
        """The object's look on the anchors of this axis (the slices the user vouched for)."""
        anchors = [SlicePlane(self.axis, index) for index in self.anchors(with_mask=True)]
        return Appearance.learn((self.image(plane), self.slices[plane].mask) for plane in anchors)

    def anchors(self, with_mask: bool = False) -> list[int]:
        """Slice indices of the anchors on the axis; ``with_mask``: only those with something to carry.

        An anchor whose mask is empty (the object is not on that slice) still blocks propagation.
        """
        return sorted(
            plane.index
            for plane, state in self.slices.items()
            if plane.axis == self.axis
            and state.is_anchor
            and (not with_mask or (state.mask is not None and state.mask.any()))
        )

    def plan(self, direction: str = BOTH, start: int | None = None) -> list[Walk]:
        """The walks: from ``start`` only (a correction), or from every anchor on the axis."""
        if direction not in DIRECTIONS:
            raise PromptError(f"Propagate {direction!r}? Use one of: {', '.join(DIRECTIONS)}.")
        anchors = self.anchors()
        if start is not None:
            state = self.slices.get(SlicePlane(self.axis, start))
            if state is None or state.mask is None or not state.mask.any():
                raise PromptError(f"Slice {start} has no segmentation to propagate from; segment it first.")
            starts, halfway = [start], False
        else:
            starts, halfway = self.anchors(with_mask=True), direction == BOTH
            if not starts:
                raise PromptError(
                    "Nothing to propagate yet: segment one slice first (a click or a box), then propagate."
                )
        low, high = (0, self.count - 1) if self.roi is None else (self.roi[1], self.roi[2])
        walks = []
        for index in starts:
            for step, name in ((1, FORWARD), (-1, BACKWARD)):
                if direction not in (BOTH, name):
                    continue
                bound = high if step > 0 else low
                reason = "roi" if self.roi is not None else "edge"
                beyond = [a for a in anchors if (a - index) * step > 0]
                if beyond:
                    nearest = min(beyond, key=lambda a: abs(a - index))
                    # Between two anchors each fills the slices nearer to it.
                    gap = abs(nearest - index)
                    stop = index + step * (gap // 2 if step > 0 else (gap - 1) // 2) if halfway else nearest - step
                    if (stop - bound) * step <= 0:
                        bound, reason = stop, "anchor"
                if (bound - index) * step > 0:
                    walks.append(Walk(index, step, bound, reason))
        return walks

    # ------------------------------------------------------------------- run
    def run(
        self,
        direction: str = BOTH,
        start: int | None = None,
        until_converged: bool = False,
        progress: Callable[[int, int, SlicePlane], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> PropagationResult:
        walks = self.plan(direction, start)
        result = PropagationResult(self.object_id, self.axis)
        total, done = sum(w.length for w in walks), 0
        tracking = self.options.use_memory and getattr(self.model.engine, "tracks_with_memory", False)
        for walk in walks:
            steps = self._track(walk) if tracking else self._step_2d(walk)
            reason, last = walk.limit_reason, walk.start
            for plane, state in steps:
                if cancel is not None and cancel():
                    reason = "cancelled"
                    break
                previous = result.states.get(SlicePlane(self.axis, last)) or self.slices[SlicePlane(self.axis, last)]
                looks = 1.0
                if self.appearance is not None and state.mask is not None:
                    looks = self.appearance.object_fraction(self.image(plane), state.mask)
                why = stop_reason(previous.mask, state.mask, state.score, self.options.criteria, looks)
                if why is not None:
                    reason = why
                    self._clear_beyond(result, walk, plane.index)
                    break
                old = self.slices.get(plane)
                result.states[plane] = state
                result.basis[plane] = self.stored.get(plane)
                last = plane.index
                done += 1
                if progress is not None:
                    progress(done, total, plane)
                if (
                    until_converged
                    and old is not None
                    and old.mask is not None
                    and dice(old.mask, state.mask) >= self.options.converge_dice
                ):
                    reason = "converged"
                    break
            steps.close()
            result.stops.append((walk.start, FORWARD if walk.step > 0 else BACKWARD, reason, last))
            if reason == "cancelled":
                break
        return result

    def _clear_beyond(self, result: PropagationResult, walk: Walk, first: int) -> None:
        """After a stop, earlier propagated slices further along this walk belong to an object that has ended."""
        for index in range(first, walk.limit + walk.step, walk.step):
            plane = SlicePlane(self.axis, index)
            state = self.slices.get(plane)
            if state is not None and not state.is_anchor:
                result.states[plane] = None
                result.basis[plane] = self.stored.get(plane)

    def _footprint(self, plane: SlicePlane) -> np.ndarray | None:
        if self.roi is None or not self.options.roi_bounds_footprint:
            return None
        return roi_footprint(self.volume, self.roi[0], plane)

    def _step_2d(self, walk: Walk) -> Iterator[tuple[SlicePlane, object]]:
        """Slice-by-slice prompting for image models (SAM, MedSAM, classic)."""
        previous = self.slices[SlicePlane(self.axis, walk.start)]
        prompt_types = self.model.engine.prompt_types
        for index in range(walk.start + walk.step, walk.limit + walk.step, walk.step):
            plane = SlicePlane(self.axis, index)
            footprint = self._footprint(plane)
            guide = previous.mask
            if self.appearance is not None:
                found = self.appearance.locate(self.image(plane), previous.mask)
                if found.sum() >= max(1, self.options.criteria.min_area_pixels):
                    guide = found  # prompt where the object is on this slice, not where it was
            prompts = carried_prompts(guide, self.options, prompt_types, footprint, self.appearance)
            state = SliceState(
                plane,
                carried=prompts,
                carried_logits=self._logits_of(previous) if self.options.use_mask else None,
                origin=PROPAGATED,
            )
            state = self._widen_to_fit(self._grown_if_better(self.model.predict(state), footprint), footprint)
            state = within_box(state, footprint)
            yield plane, state
            previous = state

    def _grown_if_better(self, state: SliceState | None, bound: np.ndarray | None) -> SliceState | None:
        """A box-only model's answer to its carried box grown on every side, if the model rates it clearly higher.

        A box carried from a slice where the section was small (a tumour's waist) holds only the bright core of
        a larger section next to it, and the mask then fits the box, so widening to fit never starts: on brain1
        the challenge's box, drawn on such a slice, gave the next slice Dice 0.31. The model's predicted IoU
        tells the two apart; a small gain is noise (a lung tumour's slices leaked into the lung without it).
        """
        fraction = self.options.grown_box_fraction
        engine = self.model.engine
        if not fraction or state is None or state.carried is None or state.carried.box is None:
            return state
        if getattr(engine, "prompt_types", ()) != ("box",):
            return state
        box = np.asarray(state.carried.box, np.float32)
        size = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, np.float32)
        rows, cols = state.mask.shape
        grown = np.clip(box + np.array([-1, -1, 1, 1], np.float32) * size * fraction, 0.0,
                        [cols - 1.0, rows - 1.0, cols - 1.0, rows - 1.0])  # fmt: skip
        if bound is not None:
            grown = clamped_box(grown, bound)
        if np.allclose(grown, box):
            return state
        other = self.model.predict(replace(state, carried=replace(state.carried, box=grown.astype(np.float32))))
        better = other is not None and other.score > state.score + self.options.grown_box_min_gain
        return other if better else state

    def _widen_to_fit(self, state: SliceState | None, bound: np.ndarray | None) -> SliceState | None:
        """Decode again with a wider box while the mask fills its carried box to a side (decoder only); kept only
        if the mask comes to fit a wider box."""
        widenings = self.options.box_widenings if getattr(self.model.engine, "box_is_extent", True) else 0
        first = state
        for attempt in range(widenings + 1):
            if state is None or state.mask is None or state.carried is None or state.carried.box is None:
                return state
            wider = widened_box(state.mask, state.carried.box, self.options, bound)
            if wider is None:
                return state  # it fits its box
            if attempt == widenings:
                break
            state = self.model.predict(replace(state, carried=replace(state.carried, box=wider)))
        # Still filling its box after every widening: a leak that grows with its box, not an object past it.
        return first

    def _logits_of(self, state: SliceState):
        """What the next slice refines from: the model's logits, or the mask itself for an engine without any."""
        if state.logits is None and getattr(self.model.engine, "refines_from_mask", False):
            return state.mask
        return state.logits

    def _track(self, walk: Walk) -> Iterator[tuple[SlicePlane, object]]:
        """Memory-based tracking (SAM 2), conditioned on every anchor of the axis."""
        model = self.model
        conditioning = {index: self.slices[SlicePlane(self.axis, index)].mask for index in self.anchors()}
        if walk.start not in conditioning:  # a propagated slice chosen as the start
            conditioning[walk.start] = self.slices[SlicePlane(self.axis, walk.start)].mask
        frames = model.frames(self.axis)
        for index, prediction in model.engine.track(frames, conditioning, walk.start, walk.step, walk.limit):
            plane = SlicePlane(self.axis, index)
            mask = model.to_slice_grid(plane, prediction.mask)
            footprint = self._footprint(plane)
            if footprint is not None:
                mask = mask & box_mask(mask.shape, footprint)
            # The mask's own box and centre ride along, so that a correction click there refines this result.
            carried = (
                carried_prompts(mask, self.options, model.engine.prompt_types, footprint) if mask.any() else None
            )
            yield (
                plane,
                SliceState(
                    plane,
                    mask=mask,
                    score=prediction.score,
                    logits=prediction.low_res_logits,
                    carried=carried,
                    origin=PROPAGATED,
                ),
            )

