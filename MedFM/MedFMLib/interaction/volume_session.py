"""An interactive session with a native 3D engine (nnInteractive, VISTA3D).

Prompts arrive in RAS millimetres, as in the slice session, and are turned
into voxel interactions of the volume's (K, J, I) array. The engine answers
each with a 3D mask. The session keeps the objects, their prompts and an undo
history of the changed regions only (a click on a 512×512×300 CT changes a
small box of it, and a whole-volume copy per step would cost 80 MB).

The engine works on one object at a time and accumulates its interactions, as
the models were trained. When the user turns to another object, or undoes a
step, the engine starts that object afresh from the mask it has now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..engines.volumetric import (
    BOX,
    CLASS,
    LASSO,
    MASK,
    POINT,
    SCRIBBLE,
    Interaction,
    VolumeEngine,
    VolumePrediction,
    changed_region,
)
from ..errors import PromptError
from ..imaging.geometry import ViewLike, box_on_plane, plane_through
from ..imaging.volume import Volume
from .objects import BoxPrompt, PointPrompt, SegmentObject, SessionObjects, as_ras

_COLORS = [(0.95, 0.35, 0.25), (0.25, 0.65, 0.95), (0.40, 0.85, 0.35), (0.95, 0.80, 0.25), (0.75, 0.45, 0.90)]


@dataclass(frozen=True)
class VolumePrompt:
    """One prompt of a 3D object as the user gave it: RAS points (N, 3), or a class name, or a mask."""

    id: int
    kind: str
    ras: tuple[tuple[float, float, float], ...] = ()
    positive: bool = True
    class_name: str | None = None
    #: the IJK axis of the slice a box, scribble or lasso was drawn on
    axis: int | None = None


@dataclass(frozen=True)
class VolumeUpdate:
    """What an action changed: a region of one object's mask, starting at voxel ``offset`` (k, j, i)."""

    object_id: int
    offset: tuple[int, int, int]
    mask: np.ndarray
    score: float | None = None
    #: why the action left the mask as it was (as ``SliceUpdate.note``); a 3D model answers every prompt
    note: str = ""

    @property
    def region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape))


@dataclass(frozen=True)
class _Step:
    object_id: int
    offset: tuple[int, int, int]
    before: np.ndarray | None
    after: np.ndarray | None
    prompts_before: tuple[VolumePrompt, ...]
    prompts_after: tuple[VolumePrompt, ...]


class VolumeSession(SessionObjects):
    """Objects, prompts and undo/redo for one volume and a 3D engine."""

    #: the answer is already 3D: front ends hide or explain propagation for these sessions
    volumetric = True

    def __init__(self, volume: Volume, engine: VolumeEngine, max_undo: int | None = None) -> None:
        self.volume = volume
        self.engine = engine
        self.objects: dict[int, SegmentObject] = {}
        self.max_undo = max_undo
        self._prompts: dict[int, tuple[VolumePrompt, ...]] = {}
        self._initial_masks: dict[int, np.ndarray] = {}
        self._undo: list[_Step] = []
        self._redo: list[_Step] = []
        self._next_object_id = 1
        self._next_prompt_id = 1
        #: the object the engine's accumulated interactions belong to (None: it must start afresh)
        self._engine_object: int | None = None
        #: what the engine said about the last prompt it changed (a box given as clicks, say)
        self.note: str | None = None

    # ----------------------------------------------------------------- objects
    def add_object(self, name: str | None = None, color: Sequence[float] | None = None) -> int:
        object_id = self._next_object_id
        self._next_object_id += 1
        color = color if color is not None else _COLORS[(object_id - 1) % len(_COLORS)]
        self.objects[object_id] = SegmentObject(
            object_id, name or f"Segment_{object_id}", tuple(float(c) for c in color),
            np.zeros(self.volume.array.shape, dtype=bool),
        )  # fmt: skip
        self._prompts[object_id] = ()
        return object_id

    def remove_object(self, object_id: int) -> None:
        self._object(object_id)
        del self.objects[object_id], self._prompts[object_id]
        for stack in (self._undo, self._redo):
            stack[:] = [step for step in stack if step.object_id != object_id]
        if self._engine_object == object_id:
            self._engine_object = None

    def prompts(self, object_id: int) -> list[PointPrompt | BoxPrompt]:
        """The object's points and boxes, as the slice session gives them (for markups)."""
        result: list[PointPrompt | BoxPrompt] = []
        for prompt in self._prompts_of(object_id):
            if prompt.kind == POINT:
                result.append(PointPrompt(prompt.id, prompt.ras[0], prompt.positive))
            elif prompt.kind == BOX:
                result.append(BoxPrompt(prompt.id, prompt.ras[0], prompt.ras[1]))
        return result

    def volume_prompts(self, object_id: int) -> tuple[VolumePrompt, ...]:
        """Every prompt of the object, scribbles, lassos and class prompts included."""
        return self._prompts_of(object_id)

    # ----------------------------------------------------------------- prompts
    def add_point(
        self, object_id: int, ras: Sequence[float], positive: bool = True, view: ViewLike = "axial"
    ) -> VolumeUpdate:
        """A positive or negative click (RAS); ``view`` does not matter, the answer is 3D."""
        return self._add(object_id, VolumePrompt(self._next_prompt_id, POINT, (as_ras(ras),), bool(positive)))

    def set_box(
        self, object_id: int, corner_a: Sequence[float], corner_b: Sequence[float], view: ViewLike = "axial",
        keep_other_slices: bool = False, positive: bool = True,
    ) -> VolumeUpdate:  # fmt: skip
        """A 2D box: two RAS corners on one slice of the view.

        It replaces the object's earlier box (the viewers show one box), unless ``keep_other_slices``: then
        each box is one more interaction (boxes on several slices, as the command line gives them).
        """
        corner_a, corner_b = as_ras(corner_a), as_ras(corner_b)
        plane, _ = box_on_plane(self.volume, corner_a, corner_b, view)
        prompt = VolumePrompt(self._next_prompt_id, BOX, (corner_a, corner_b), positive, axis=plane.axis)
        earlier = [p for p in self._prompts_of(object_id) if p.kind == BOX]
        if earlier and not keep_other_slices:
            kept = tuple(p for p in self._prompts_of(object_id) if p.kind != BOX)
            return self._replay(object_id, kept + (prompt,))
        return self._add(object_id, prompt)

    def move_box(self, object_id: int, corner_a: Sequence[float], corner_b: Sequence[float]) -> VolumeUpdate:
        box = next((p for p in self._prompts_of(object_id) if p.kind == BOX), None)
        if box is None:
            raise PromptError("This object has no box to move; draw one first.")
        return self.set_box(object_id, corner_a, corner_b, view=box.axis)

    def set_roi(
        self, object_id: int, corners: Sequence[Sequence[float]], view: ViewLike = "axial", propagate: bool = True,
        options=None,
    ) -> VolumeUpdate:  # fmt: skip
        """A 3D box: two opposite RAS corners, or the eight of a rotated ROI (its voxel bounding box is used).

        ``view``, ``propagate`` and ``options`` are the slice session's; a 3D engine needs none of them.
        """
        corners = [as_ras(c) for c in corners]
        voxels = self._voxels(corners, "box corner")
        low, high = voxels.argmin(axis=0), voxels.argmax(axis=0)
        # Keep the two corners whose voxel box holds all eight.
        corner_a = as_ras(self.volume.ijk_to_ras_points(voxels[low, [0, 1, 2]][::-1]))
        corner_b = as_ras(self.volume.ijk_to_ras_points(voxels[high, [0, 1, 2]][::-1]))
        return self._add(object_id, VolumePrompt(self._next_prompt_id, BOX, (corner_a, corner_b)))

    def add_scribble(
        self, object_id: int, ras_points: Sequence[Sequence[float]], positive: bool = True, view: ViewLike = "axial"
    ) -> VolumeUpdate:
        """A drawn stroke (RAS points along it) on one slice of the view, positive or negative."""
        return self._add(object_id, self._stroke(SCRIBBLE, ras_points, positive, view))

    def add_lasso(
        self, object_id: int, ras_points: Sequence[Sequence[float]], positive: bool = True, view: ViewLike = "axial"
    ) -> VolumeUpdate:
        """A closed polygon (RAS points around it) on one slice of the view; its inside is the prompt."""
        if len(ras_points) < 3:
            raise PromptError("A lasso needs at least three points around the object; draw it again.")
        return self._add(object_id, self._stroke(LASSO, ras_points, positive, view))

    def set_class(self, object_id: int, class_name: str) -> VolumeUpdate:
        """A class prompt ("liver"): the model segments that class everywhere; clicks refine it after."""
        return self._add(object_id, VolumePrompt(self._next_prompt_id, CLASS, class_name=str(class_name)))

    def set_initial_mask(self, object_id: int, mask: np.ndarray) -> VolumeUpdate:
        """Start the object from an existing segmentation (K, J, I), which the model refines."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.volume.array.shape:
            raise PromptError(
                f"The initial mask has shape {mask.shape}, not the volume's {self.volume.array.shape}; "
                "resample it onto the volume first."
            )
        prompt = VolumePrompt(self._next_prompt_id, MASK)
        self._initial_masks[prompt.id] = mask
        return self._add(object_id, prompt)

    def move_prompt(self, object_id: int, prompt_id: int, ras: Sequence[float]) -> list[VolumeUpdate]:
        """Move a click (or a box's second corner): the object is segmented again from its prompts."""
        ras = as_ras(ras)
        moved = []
        for prompt in self._prompts_of(object_id):
            if prompt.id == prompt_id and prompt.kind == POINT:
                prompt = replace(prompt, ras=(ras,))
            elif prompt.id == prompt_id and prompt.kind == BOX:
                prompt = replace(prompt, ras=(prompt.ras[0], ras))
            moved.append(prompt)
        self._find(object_id, prompt_id)
        return [self._replay(object_id, tuple(moved))]

    def remove_prompt(self, object_id: int, prompt_id: int) -> VolumeUpdate:
        """Remove one prompt: the object is segmented again from the others (the models keep no way back)."""
        self._find(object_id, prompt_id)
        return self._replay(object_id, tuple(p for p in self._prompts_of(object_id) if p.id != prompt_id))

    def clear_object(self, object_id: int) -> list[VolumeUpdate]:
        """Remove the object's prompts and mask (undoable)."""
        obj = self._object(object_id)
        if not obj.mask.any() and not self._prompts_of(object_id):
            return []
        update = self._commit(object_id, np.zeros_like(obj.mask), ())
        if self._engine_object == object_id:
            self._engine_object = None
        return [update]

    def has_prompts(self, object_id: int) -> bool:
        return bool(self._prompts_of(object_id))

    def is_encoded(self, plane) -> bool:
        """Always: there are no slice embeddings; the model takes the volume at the first interaction."""
        return True

    def embedding(self, plane) -> None:
        """Nothing to prefetch for a 3D model."""

    def prompt_seeds(self, object_id: int) -> np.ndarray:
        """Voxels the user vouched for, (K, J, I) bool: positive clicks (for keeping the parts they touch)."""
        seeds = np.zeros(self.volume.array.shape, dtype=bool)
        for prompt in self._prompts_of(object_id):
            if prompt.kind == POINT and prompt.positive:
                k, j, i = np.clip(np.rint(self._voxels(prompt.ras, "point")[0]), 0, np.array(seeds.shape) - 1)
                seeds[int(k), int(j), int(i)] = True
        return seeds

    def close(self) -> None:
        """Let go of the engine (its volume and object), so that the next session starts clean."""
        with self.engine.lock:
            if self.engine.owner is self:
                self.engine.owner = None

    def propagate(self, *args, **kwargs):
        raise PromptError(
            f"{self.engine.model_name} answers in 3D already: there is nothing to propagate. "
            "Click on the slices where the result needs correcting."
        )

    plan_propagation = propagate

    # ------------------------------------------------------------- undo, redo
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> list[VolumeUpdate]:
        if not self._undo:
            return []
        step = self._undo.pop()
        self._redo.append(step)
        return [self._restore(step, step.before, step.prompts_before)]

    def redo(self) -> list[VolumeUpdate]:
        if not self._redo:
            return []
        step = self._redo.pop()
        self._undo.append(step)
        return [self._restore(step, step.after, step.prompts_after)]

    def state_nbytes(self) -> int:
        """Memory held by the undo and redo history (the regions it keeps)."""
        steps = self._undo + self._redo
        return sum(a.nbytes for step in steps for a in (step.before, step.after) if a is not None)

    def drop_oldest_undo(self) -> bool:
        if not self._undo:
            return False
        del self._undo[0]
        return True

    # --------------------------------------------------------------- internals
    def _prompts_of(self, object_id: int) -> tuple[VolumePrompt, ...]:
        self._object(object_id)
        return self._prompts[object_id]

    def _voxels(self, ras_points: Sequence[Sequence[float]], what: str) -> np.ndarray:
        """(N, 3) continuous voxel coordinates in the array's (k, j, i) order; outside the volume is an error."""
        ijk = np.stack([self.volume.require_inside(point, what) for point in ras_points])
        return ijk[:, ::-1].copy()

    def _stroke(self, kind: str, ras_points, positive: bool, view: ViewLike) -> VolumePrompt:
        points = tuple(as_ras(p) for p in ras_points)
        if not points:
            raise PromptError(f"A {kind} needs points along it; draw it again.")
        plane = plane_through(self.volume, points[0], view, what=kind)
        self._voxels(points, kind)  # every point on the image, or one clear error now
        return VolumePrompt(self._next_prompt_id, kind, points, bool(positive), axis=plane.axis)

    def _find(self, object_id: int, prompt_id: int) -> VolumePrompt:
        for prompt in self._prompts_of(object_id):
            if prompt.id == prompt_id:
                return prompt
        raise PromptError(f"Object {object_id} has no prompt {prompt_id}.")

    def _interaction(self, prompt: VolumePrompt) -> Interaction:
        """A prompt as the engine takes it: voxels of the array, on the slice it was drawn on."""
        if prompt.kind == CLASS:
            return Interaction(CLASS, class_name=prompt.class_name)
        if prompt.kind == MASK:
            return Interaction(MASK, mask=self._initial_masks[prompt.id])
        voxels = self._voxels(prompt.ras, prompt.kind)
        if prompt.axis is not None:
            # A box or stroke drawn in one view stays on the slice the user saw.
            column = 2 - prompt.axis
            voxels[:, column] = np.clip(np.rint(voxels[0, column]), 0, self.volume.array.shape[column] - 1)
        if prompt.kind in (POINT, BOX):
            voxels = np.rint(voxels)
        return Interaction(prompt.kind, voxels, positive=prompt.positive)

    def _take_engine(self) -> None:
        """Make the engine hold this session's volume (called with its lock held)."""
        if self.engine.owner is not self:
            # Another session (a server's other user) had the model: give it this volume again.
            self.engine.set_volume(self.volume)
            self.engine.owner, self._engine_object = self, None

    def _add(self, object_id: int, prompt: VolumePrompt) -> VolumeUpdate:
        """One more interaction on the object; a class or an initial mask defines the object anew."""
        obj = self._object(object_id)
        interaction = self._interaction(prompt)
        self.engine.check(interaction, self.volume.array.shape)
        anew = prompt.kind in (CLASS, MASK)
        with self.engine.lock:
            self._take_engine()
            if anew or self._engine_object != object_id:
                # The engine holds one object's interactions: begin this one where the user left it.
                self._engine_object = None
                self.engine.start_object(obj.mask.copy() if obj.mask.any() and not anew else None)
            self._engine_object = object_id
            prediction = self._run(interaction)
        self._next_prompt_id += 1
        prompts = (prompt,) if anew else self._prompts[object_id] + (prompt,)
        after = prediction.full(obj.mask.shape, previous=None if anew else obj.mask)
        return self._commit(object_id, after, prompts, prediction)

    def _replay(self, object_id: int, prompts: tuple[VolumePrompt, ...]) -> VolumeUpdate:
        """Segment the object afresh from these prompts (after one was moved or removed): one undo step."""
        obj = self._object(object_id)
        interactions = [self._interaction(p) for p in prompts]
        for interaction in interactions:
            self.engine.check(interaction, self.volume.array.shape)
        after = np.zeros_like(obj.mask)
        score = None
        with self.engine.lock:
            self._take_engine()
            self._engine_object = None
            self.engine.start_object(None)
            self._engine_object = object_id
            for interaction in interactions:
                prediction = self._run(interaction)
                after = prediction.full(after.shape, previous=None if interaction.kind in (CLASS, MASK) else after)
                score = prediction.score
        self._next_prompt_id = max([self._next_prompt_id, *[p.id + 1 for p in prompts]])
        return self._commit(object_id, after, prompts, VolumePrediction(np.zeros((0, 0, 0), bool), score=score))

    def _run(self, interaction: Interaction) -> VolumePrediction:
        try:
            prediction = self.engine.interact(interaction)
        except BaseException:
            self._engine_object = None  # its state may be half-changed: start afresh next time
            raise
        self.note = getattr(self.engine, "last_note", None)
        return prediction

    def _commit(
        self, object_id: int, after: np.ndarray, prompts: tuple[VolumePrompt, ...],
        prediction: VolumePrediction | None = None,
    ) -> VolumeUpdate:  # fmt: skip
        """Make ``after`` the object's mask and ``prompts`` its prompts: one undo step holding the changed box."""
        obj = self.objects[object_id]
        changed = changed_region(obj.mask, after)
        offset = changed.offset if changed is not None else (0, 0, 0)
        region = changed.region if changed is not None else (slice(0, 0),) * 3
        step = _Step(object_id, offset, obj.mask[region].copy(), after[region].copy(),
                     self._prompts[object_id], prompts)  # fmt: skip
        self._undo.append(step)
        self._redo.clear()
        if self.max_undo is not None:
            del self._undo[: max(0, len(self._undo) - self.max_undo)]
        obj.mask[region] = after[region]
        self._prompts[object_id] = prompts
        score = None if prediction is None else prediction.score
        return VolumeUpdate(object_id, offset, obj.mask[region].copy(), score)

    def _restore(self, step: _Step, region_mask: np.ndarray, prompts: tuple[VolumePrompt, ...]) -> VolumeUpdate:
        obj = self._object(step.object_id)
        region = tuple(slice(o, o + n) for o, n in zip(step.offset, region_mask.shape))
        obj.mask[region] = region_mask
        self._prompts[step.object_id] = prompts
        if self._engine_object == step.object_id:
            self._engine_object = None  # the engine's interactions no longer match the mask
        return VolumeUpdate(step.object_id, step.offset, region_mask.copy())
