"""An interactive segmentation session on one volume.

The session holds the objects (segments) of a volume and their prompts, in
RAS millimetres as the user placed them. Every prompt belongs to one slice
plane; each change re-decodes only that plane, writes its mask into the
object's 3D mask, and can be undone and redone.

Refinement follows SAM's recommendation: when a point is added, the previous
low-resolution logits of that slice are fed back to the decoder. When a point
is moved or removed, the slice is decoded afresh from the remaining prompts,
because the old logits still carry the influence of the point that is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..engines.base import Embedding, Engine, Prompts2D
from ..errors import PromptError
from ..imaging.geometry import (
    SlicePlane,
    ViewLike,
    box_corners,
    box_on_plane,
    extract_slice,
    plane_through,
    point_on_plane,
    resolve_axis,
    roi_footprint,
    roi_slice_range,
    write_slice,
)
from ..imaging.intensity import Window, resolve_window
from ..imaging.resample import isotropic_shape, resize_linear
from ..imaging.volume import Volume
from .box_prompts import box_from_neighbour, box_without_negatives, unanswered_click_note
from .cache import EmbeddingCache, EmbeddingKey
from .click_corrections import clicks_on_slice, corrected_by_clicks
from .objects import (
    PROPAGATED,
    ROI,
    BoxPrompt,
    PointPrompt,
    SegmentObject,
    SessionObjects,
    SliceState,
    SliceUpdate,
    as_ras,
)
from .propagation import BOTH, PropagationOptions, PropagationResult, Propagator, within_box
from .zoom import Crop, SmallObjectZoom

# Resample a slice to square pixels only when the aspect ratio is off by more
# than this: below it the interpolation blur costs more than the distortion.
_ANISOTROPY_TOLERANCE = 1.1
#: pixels a carried box grows beyond a positive click the user placed outside it
_CLICK_MARGIN = 5.0

_DEFAULT_COLORS = [
    (0.95, 0.35, 0.25),
    (0.25, 0.65, 0.95),
    (0.40, 0.85, 0.35),
    (0.95, 0.80, 0.25),
    (0.75, 0.45, 0.90),
    (0.30, 0.85, 0.80),
]


@dataclass(frozen=True)
class _Change:
    object_id: int
    plane: SlicePlane
    before: SliceState | None
    after: SliceState | None


class SliceFrames:
    """The slices along one axis as a sequence of frames, for engines that track through them (SAM 2)."""

    def __init__(self, session: Session, axis: int) -> None:
        self.session = session
        self.axis = axis
        self.count = session.volume.dimensions[axis]
        self.image_shape = session.model_image_shape(SlicePlane(axis, 0))

    def __len__(self) -> int:
        return self.count

    def image(self, index: int) -> np.ndarray:
        return self.session.model_image(SlicePlane(self.axis, index))

    def embedding(self, index: int) -> Embedding:
        """Encoded once, through the session's cache, shared with clicks on the same slice."""
        return self.session.embedding(SlicePlane(self.axis, index))


class Session(SessionObjects):
    """Objects, prompts, undo/redo and cached embeddings for one volume and engine."""

    def __init__(
        self,
        volume: Volume,
        engine: Engine,
        window: Window | None = None,
        cache: EmbeddingCache | None = None,
        isotropic: bool | None = None,
        max_undo: int | None = None,
    ) -> None:
        self.volume = volume
        self.engine = engine
        self.window = resolve_window(volume.array, window)
        self.cache = cache if cache is not None else EmbeddingCache()
        # Resample anisotropic slices to square pixels (default: as the engine prefers).
        self.isotropic = engine.prefers_square_pixels if isotropic is None else isotropic
        self.objects: dict[int, SegmentObject] = {}
        #: undo steps kept (None: all); each step holds the slice states it replaced, masks and logits included
        self.max_undo = max_undo
        self._undo: list[list[_Change]] = []
        self._redo: list[list[_Change]] = []
        self._next_object_id = 1
        self._next_prompt_id = 1
        self.zoom = SmallObjectZoom(engine) if getattr(engine, "zooms_on_small_objects", False) else None

    # ----------------------------------------------------------------- objects
    def add_object(self, name: str | None = None, color: Sequence[float] | None = None) -> int:
        object_id = self._next_object_id
        self._next_object_id += 1
        if color is None:
            color = _DEFAULT_COLORS[(object_id - 1) % len(_DEFAULT_COLORS)]
        self.objects[object_id] = SegmentObject(
            id=object_id,
            name=name or f"Segment_{object_id}",
            color=tuple(float(c) for c in color),
            mask=np.zeros(self.volume.array.shape, dtype=bool),
        )
        return object_id

    def remove_object(self, object_id: int) -> None:
        self._object(object_id)
        del self.objects[object_id]
        # History entries of a removed object can no longer be replayed.
        for stack in (self._undo, self._redo):
            stack[:] = [[c for c in entry if c.object_id != object_id] for entry in stack]
            stack[:] = [entry for entry in stack if entry]

    # ----------------------------------------------------------------- prompts
    def add_point(
        self, object_id: int, ras: Sequence[float], positive: bool = True, view: ViewLike = "axial"
    ) -> SliceUpdate:
        """Add a positive or negative click, given in RAS millimetres, in the given view."""
        obj = self._object(object_id)
        ras = as_ras(ras)
        plane = plane_through(self.volume, ras, view)
        before = obj.slices.get(plane)
        state = before or SliceState(plane)
        if self.engine.prompt_types == ("box",) and state.box is None and (state.carried is None
                                                                            or state.carried.box is None):  # fmt: skip
            state = replace(state, carried=box_from_neighbour(obj.slices, state.plane) or state.carried)
        point = PointPrompt(self._next_prompt_id, ras, bool(positive))
        after = self.predict(replace(state, points=state.points + (point,)), refine_from=state)
        self._next_prompt_id += 1
        update = self._commit([_Change(object_id, plane, before, after)])[0]
        if self.engine.prompt_types == ("box",):
            click = clicks_on_slice(self.volume, plane, [point])[0]
            update = replace(update, note=unanswered_click_note(self.engine.model_name, after, click))
        return update

    def set_box(
        self,
        object_id: int,
        corner_a: Sequence[float],
        corner_b: Sequence[float],
        view: ViewLike = "axial",
        keep_other_slices: bool = False,
    ) -> SliceUpdate:
        """Set the object's box (two RAS corners on one slice), replacing any earlier box.

        ``keep_other_slices``: replace only a box on the same slice, and keep those on other slices (a box on
        each of several slices, as MedSAM-style models are prompted through a volume).
        """
        obj = self._object(object_id)
        corner_a, corner_b = as_ras(corner_a), as_ras(corner_b)
        plane, _ = box_on_plane(self.volume, corner_a, corner_b, view)
        changes = []
        for old_plane, old_state in obj.slices.items():
            if old_state.box is not None and old_plane != plane and not keep_other_slices:
                changes.append(_Change(object_id, old_plane, old_state, self.predict(replace(old_state, box=None))))
        before = obj.slices.get(plane)
        state = before or SliceState(plane)
        box = BoxPrompt(self._next_prompt_id, corner_a, corner_b)
        # A new box changes what the object is: start afresh rather than refine.
        changes.append(_Change(object_id, plane, before, self.predict(replace(state, box=box))))
        self._next_prompt_id += 1
        return self._commit(changes)[-1]

    def move_prompt(self, object_id: int, prompt_id: int, ras: Sequence[float]) -> list[SliceUpdate]:
        """Move a point to a new RAS position (it may change slice), or a box's second corner."""
        obj = self._object(object_id)
        ras = as_ras(ras)
        state, prompt = self._find_prompt(obj, prompt_id)
        if isinstance(prompt, BoxPrompt):
            corner_a = prompt.corner_a
            plane, _ = box_on_plane(self.volume, corner_a, ras, state.plane.axis)
            if plane != state.plane:
                raise PromptError("A box corner can only be moved within the box's own slice.")
            moved = replace(prompt, corner_b=ras)
            return self._commit([_Change(object_id, plane, state, self.predict(replace(state, box=moved)))])
        new_plane = plane_through(self.volume, ras, state.plane.axis)
        moved = replace(prompt, ras=ras)
        if new_plane == state.plane:
            points = tuple(moved if p.id == prompt_id else p for p in state.points)
            return self._commit([_Change(object_id, state.plane, state, self.predict(replace(state, points=points)))])
        remaining = tuple(p for p in state.points if p.id != prompt_id)
        target_before = obj.slices.get(new_plane)
        target = target_before or SliceState(new_plane)
        changes = [
            _Change(object_id, state.plane, state, self.predict(replace(state, points=remaining))),
            _Change(
                object_id,
                new_plane,
                target_before,
                self.predict(replace(target, points=target.points + (moved,)), refine_from=target),
            ),
        ]
        return self._commit(changes)

    def move_box(self, object_id: int, corner_a: Sequence[float], corner_b: Sequence[float]) -> SliceUpdate:
        """Replace both corners of the object's box (a drag of the whole box)."""
        obj = self._object(object_id)
        state = next((s for s in obj.slices.values() if s.box is not None), None)
        if state is None:
            raise PromptError("This object has no box to move; draw one first.")
        return self.set_box(object_id, corner_a, corner_b, view=state.plane.axis)

    def remove_prompt(self, object_id: int, prompt_id: int) -> SliceUpdate:
        obj = self._object(object_id)
        state, prompt = self._find_prompt(obj, prompt_id)
        if isinstance(prompt, BoxPrompt):
            reduced = replace(state, box=None)
        else:
            reduced = replace(state, points=tuple(p for p in state.points if p.id != prompt_id))
        return self._commit([_Change(object_id, state.plane, state, self.predict(reduced))])[0]

    def clear_object(self, object_id: int) -> list[SliceUpdate]:
        """Remove all prompts of an object (undoable)."""
        obj = self._object(object_id)
        changes = [_Change(object_id, plane, state, None) for plane, state in obj.slices.items()]
        return self._commit(changes) if changes else []

    # ------------------------------------------------------------ 3D
    def set_roi(
        self,
        object_id: int,
        corners: Sequence[Sequence[float]],
        view: ViewLike = "axial",
        propagate: bool = True,
        options: PropagationOptions | None = None,
    ) -> PropagationResult:
        """Segment every slice a 3D box spans: two opposite RAS corners, or the eight of a rotated ROI.

        As MedSAM does, the box's middle slice is segmented first with the box's
        footprint as its prompt; propagation then carries the mask outwards and
        stops at the box's first and last slice. The whole is one undo step.
        """
        result = self.plan_roi(object_id, corners, view, propagate, options)
        self.apply_propagation(result)
        return result

    def plan_roi(
        self,
        object_id: int,
        corners: Sequence[Sequence[float]],
        view: ViewLike = "axial",
        propagate: bool = True,
        options: PropagationOptions | None = None,
        progress=None,
        cancel=None,
    ) -> PropagationResult:
        """What ``set_roi`` does, computed without changing the session (for a worker thread)."""
        obj = self._object(object_id)
        corners = np.asarray(corners, dtype=np.float64)
        if corners.shape == (2, 3):
            corners = box_corners(corners[0], corners[1])
        axis = resolve_axis(self.volume.ijk_to_ras, view)
        first, last = roi_slice_range(self.volume, corners, axis)
        plane = SlicePlane(axis, (first + last) // 2)
        footprint = roi_footprint(self.volume, corners, plane)
        if footprint is None:
            raise PromptError("The 3D box misses its own middle slice; draw it over the image.")
        result = PropagationResult(object_id, axis)
        # A new box replaces the old box and what was propagated along its axis.
        for old_plane, old_state in obj.slices.items():
            if old_state.roi_corners is not None or (old_plane.axis == axis and old_state.origin == PROPAGATED
                                                     and not old_state.has_prompts):  # fmt: skip
                result.states[old_plane], result.basis[old_plane] = None, old_state
        seed = SliceState(plane, carried=Prompts2D(box=footprint), origin=ROI, roi_corners=corners)
        result.states[plane], result.basis[plane] = within_box(self.predict(seed), footprint), obj.slices.get(plane)
        seeded = result.states[plane]
        # A middle slice with nothing on it has nothing to carry: the box stays, and the user can click there.
        if propagate and seeded is not None and seeded.mask is not None and seeded.mask.any():
            walks = Propagator(self, obj.slices, object_id, axis, options, overlay=dict(result.states))
            walked = walks.run(BOTH, progress=progress, cancel=cancel)
            for walked_plane, state in walked.states.items():
                result.states[walked_plane] = state
                result.basis.setdefault(walked_plane, obj.slices.get(walked_plane))
            result.stops = walked.stops
        return result

    def propagate(
        self,
        object_id: int,
        direction: str = "both",
        view: ViewLike | None = None,
        start: int | None = None,
        until_converged: bool = False,
        options: PropagationOptions | None = None,
        progress=None,
        cancel=None,
    ) -> PropagationResult:
        """Propagate an object through the volume and apply the result (one undo step).

        ``view`` picks the axis; by default it is the axis of the most recently
        prompted slice. For a worker thread, use ``plan_propagation`` and
        ``apply_propagation`` instead, so that the session changes on one thread.
        """
        result = self.plan_propagation(object_id, direction, view, start, until_converged, options, progress, cancel)
        self.apply_propagation(result)
        return result

    def plan_propagation(
        self,
        object_id: int,
        direction: str = "both",
        view: ViewLike | None = None,
        start: int | None = None,
        until_converged: bool = False,
        options: PropagationOptions | None = None,
        progress=None,
        cancel=None,
    ) -> PropagationResult:
        """What ``propagate`` does, computed without changing the session (for a worker thread)."""
        axis = self.propagation_axis(object_id, view)
        slices = self._object(object_id).slices
        return Propagator(self, slices, object_id, axis, options).run(
            direction, start, until_converged, progress, cancel
        )

    def repropagate(self, object_id: int, plane: SlicePlane, options: PropagationOptions | None = None):
        """After a correction on ``plane``: propagate from it, both ways, only as far as the change matters.

        Only slices that earlier propagation filled are revisited; a walk ends
        where the new result agrees with the old one, or at the next anchor.
        """
        obj = self._object(object_id)
        state = obj.slices.get(plane)
        propagated = [
            p for p, s in obj.slices.items() if p.axis == plane.axis and s.origin == PROPAGATED and not s.is_anchor
        ]
        if state is None or state.mask is None or not state.mask.any() or not propagated:
            return PropagationResult(object_id, plane.axis)
        walks = Propagator(self, obj.slices, object_id, plane.axis, options)
        result = walks.run(BOTH, start=plane.index, until_converged=True)
        self.apply_propagation(result)
        return result

    def apply_propagation(self, result: PropagationResult) -> list[SliceUpdate]:
        """Write a propagation's slices into the object, as one undo step; anchors are never replaced."""
        obj = self._object(result.object_id)
        changes = []
        for plane, state in result.states.items():
            before = obj.slices.get(plane)
            if before is not None and before.is_anchor and before is not result.basis.get(plane):
                continue  # the user prompted this slice while the propagation ran
            changes.append(_Change(result.object_id, plane, before, state))
        return self._commit(changes) if changes else []

    def prompt_seeds(self, object_id: int) -> np.ndarray:
        """Voxels the user vouched for, (K, J, I) bool: positive points, and anchor slices that have none.

        What ``postprocess.keep_touching_components`` keeps: the parts of the
        object these voxels touch.
        """
        seeds = np.zeros(self.volume.array.shape, dtype=bool)
        for state in self._object(object_id).slices.values():
            positives = [p for p in state.points if p.positive]
            for point in positives:
                ijk = np.clip(
                    np.rint(self.volume.ras_to_ijk_points(point.ras)), 0, np.array(self.volume.dimensions) - 1
                )
                seeds[int(ijk[2]), int(ijk[1]), int(ijk[0])] = True
            if state.is_anchor and not positives and state.mask is not None:
                plane_seeds = extract_slice(seeds, state.plane)
                plane_seeds |= state.mask
        return seeds

    def frames(self, axis: int) -> SliceFrames:
        """The slices along one axis as an engine with memory sees them: images and cached embeddings."""
        return SliceFrames(self, axis)

    # ------------------------------------------------------------- undo, redo
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> list[SliceUpdate]:
        if not self._undo:
            return []
        changes = self._undo.pop()
        self._redo.append(changes)
        return [self._apply(c.object_id, c.plane, c.before) for c in reversed(changes)]

    def redo(self) -> list[SliceUpdate]:
        if not self._redo:
            return []
        changes = self._redo.pop()
        self._undo.append(changes)
        return [self._apply(c.object_id, c.plane, c.after) for c in changes]

    # --------------------------------------------------------------- encoding
    def embedding_key(self, plane: SlicePlane, crop: Crop | None = None) -> EmbeddingKey:
        """The cache's key of a plane's embedding, or of a ``crop`` of its model image (zoom.py)."""
        return EmbeddingKey(
            volume=self.volume.fingerprint,
            axis=plane.axis,
            index=plane.index,
            engine=self.engine.cache_id,
            window=self.window.key(),
            image_shape=self.model_image_shape(plane),
            crop=None if crop is None else (crop.row, crop.col, crop.rows, crop.cols),
        )

    def model_image_shape(self, plane: SlicePlane) -> tuple[int, int]:
        """Size of the image the engine sees: the slice, resampled to square pixels if needed."""
        shape = plane.shape(self.volume)
        row_mm, col_mm = plane.pixel_spacing(self.volume)
        if not self.isotropic or max(row_mm, col_mm) / min(row_mm, col_mm) < _ANISOTROPY_TOLERANCE:
            return shape
        return isotropic_shape(shape, (row_mm, col_mm))

    def model_image(self, plane: SlicePlane) -> np.ndarray:
        image = self.window.apply(extract_slice(self.volume.array, plane))
        target = self.model_image_shape(plane)
        return image if image.shape == target else resize_linear(image, target)

    def embedding(self, plane: SlicePlane, crop: Crop | None = None) -> Embedding:
        """The plane's embedding, or a ``crop`` of its model image's (zoom.py): encoded on first use, cached after."""
        window = (slice(None), slice(None)) if crop is None else crop.slices
        encode = lambda: self.engine.encode(self.model_image(plane)[window])  # noqa: E731
        return self.cache.get_or_create(self.embedding_key(plane, crop), encode)

    def is_encoded(self, plane: SlicePlane, crop: Crop | None = None) -> bool:
        return self.embedding_key(plane, crop) in self.cache

    def slice_prompts(self, state: SliceState) -> Prompts2D:
        """A state's prompts in the pixel coordinates of the engine's image.

        The user's prompts come first; carried prompts fill in, and the user's
        box replaces a carried one. A carried box grows to hold the user's
        positive clicks: a correction says the object reaches there.
        """
        points = [point_on_plane(self.volume, state.plane, p.ras) for p in state.points]
        labels = [1 if p.positive else 0 for p in state.points]
        box = None
        if state.box is not None:
            _, box = box_on_plane(self.volume, state.box.corner_a, state.box.corner_b, state.plane.axis)
        if state.carried is not None:
            if box is None and state.carried.box is not None:
                box = np.asarray(state.carried.box, np.float32)
                positives = np.array([xy for xy, label in zip(points, labels) if label == 1], np.float32)
                if len(positives):
                    box = np.concatenate([np.minimum(box[:2], positives.min(axis=0) - _CLICK_MARGIN),
                                          np.maximum(box[2:], positives.max(axis=0) + _CLICK_MARGIN)])  # fmt: skip
            points.extend(state.carried.points)
            labels.extend(int(label) for label in state.carried.labels)
        if box is not None and self.engine.prompt_types == ("box",):
            box = box_without_negatives(box, points, labels, state.mask)
            # A box-only model reads no click (a negative one only misleads it: a lung nodule's slice went from
            # Dice 0.93 to 0.83 with one); each click has moved its box, and that is all it sees.
            points, labels = [], []
        appearance = state.carried.appearance if state.carried is not None else None
        prompts = Prompts2D(np.array(points, np.float32).reshape(-1, 2), labels, box, appearance)
        rows, cols = state.plane.shape(self.volume)
        model_rows, model_cols = self.model_image_shape(state.plane)
        if (model_rows, model_cols) != (rows, cols):
            prompts = prompts.scaled(model_cols / cols, model_rows / rows)
        return prompts

    # --------------------------------------------------------------- internals
    def _find_prompt(self, obj: SegmentObject, prompt_id: int) -> tuple[SliceState, PointPrompt | BoxPrompt]:
        for state in obj.slices.values():
            for point in state.points:
                if point.id == prompt_id:
                    return state, point
            if state.box is not None and state.box.id == prompt_id:
                return state, state.box
        raise PromptError(f"Object {obj.id} has no prompt {prompt_id}.")

    def predict(self, state: SliceState, refine_from: SliceState | None = None) -> SliceState | None:
        """Decode a state's prompts (refining ``refine_from``'s logits); None when no prompt is left on the plane.

        Reads the session only, so propagation may call it from a worker thread.
        """
        if not state.has_any_prompt:
            return None
        if refine_from is not None and refine_from.has_any_prompt and self.engine.prompt_types == ("box",):
            # A box-only model does not read the click: its own logits fed back on the same box only drift (a
            # mask flickering click after click, blobs off the box); it decodes the box afresh.
            previous = None
        elif refine_from is not None and refine_from.has_any_prompt:
            previous = refine_from.logits
            if previous is None and self.engine.refines_from_mask:
                previous = refine_from.mask
        else:
            previous = state.carried_logits
        prompts = self.slice_prompts(state)
        self.engine.check_prompts(prompts)
        decode = lambda: self.engine.decode(self.embedding(state.plane), prompts, previous)  # noqa: E731
        zoomed = self.zoom is not None and state.origin != PROPAGATED  # zoom.py says why only the user's slices
        prediction = self.zoom.predict(self, state.plane, prompts, decode) if zoomed else decode()
        mask = self.to_slice_grid(state.plane, prediction.mask)
        if state.points and self.engine.prompt_types == ("box",):  # the model read no click: they correct it
            image = self.window.apply(extract_slice(self.volume.array, state.plane))
            mask = corrected_by_clicks(image, mask, clicks_on_slice(self.volume, state.plane, state.points))
        return replace(state, mask=mask, logits=prediction.low_res_logits, score=prediction.score)

    def to_slice_grid(self, plane: SlicePlane, mask: np.ndarray) -> np.ndarray:
        """A mask on the engine's image of a plane, back on the slice's own pixel grid."""
        mask = np.asarray(mask, dtype=bool)
        slice_shape = plane.shape(self.volume)
        if mask.shape != slice_shape:
            mask = resize_linear(mask.astype(np.float32), slice_shape) >= 0.5
        return mask

    def _commit(self, changes: list[_Change]) -> list[SliceUpdate]:
        updates = [self._apply(c.object_id, c.plane, c.after) for c in changes]
        self._undo.append(changes)
        self._redo.clear()
        if self.max_undo is not None:
            del self._undo[: max(0, len(self._undo) - self.max_undo)]
        return updates

    def drop_oldest_undo(self) -> bool:
        """Forget the oldest undo step (to free memory); False when there is none."""
        if not self._undo:
            return False
        del self._undo[0]
        return True

    def state_nbytes(self) -> int:
        """Memory held by slice states: the current ones and those kept for undo and redo, each array once."""
        seen: set[int] = set()
        total = 0
        states = [s for obj in self.objects.values() for s in obj.slices.values()]
        for stack in (self._undo, self._redo):
            states += [state for entry in stack for change in entry for state in (change.before, change.after)]
        for state in states:
            if state is None:
                continue
            for array in (state.mask, state.logits, state.carried_logits):
                if array is not None and id(array) not in seen:
                    seen.add(id(array))
                    total += array.nbytes
        return total

    def _apply(self, object_id: int, plane: SlicePlane, state: SliceState | None) -> SliceUpdate:
        obj = self.objects[object_id]
        if state is None:
            obj.slices.pop(plane, None)
        else:
            obj.slices[plane] = state
        write_slice(obj.mask, plane, self._compose_plane(obj, plane))
        return SliceUpdate(
            object_id, plane, None if state is None else state.mask, 0.0 if state is None else state.score
        )

    def _compose_plane(self, obj: SegmentObject, plane: SlicePlane) -> np.ndarray:
        """The plane's own mask united with the lines where other views' slices cross it."""
        state = obj.slices.get(plane)
        if state is not None and state.mask is not None:
            composite = state.mask.copy()
        else:
            composite = np.zeros(plane.shape(self.volume), dtype=bool)
        for other in obj.slices.values():
            if other.plane.axis == plane.axis or other.mask is None:
                continue
            line = other.mask[plane.index, :] if other.plane.row_axis == plane.axis else other.mask[:, plane.index]
            if plane.row_axis == other.plane.axis:
                composite[other.plane.index, :] |= line
            else:
                composite[:, other.plane.index] |= line
        return composite
