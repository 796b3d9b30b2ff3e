"""The interface of native 3D engines: the whole volume in, a 3D mask out.

A slice engine (``base.Engine``) encodes one slice and decodes prompts on it;
3D comes from propagation. A volume engine (nnInteractive, VISTA3D) takes the
whole voxel array once (``set_volume``) and answers each interaction with a 3D
mask. Interactions accumulate on the current object, as the models were
trained; ``start_object`` begins a new one, optionally from a mask the object
already has (after an undo, or when the user returns to another segment).

Coordinates are voxel indices into the volume's array, in its (K, J, I)
order. Inputs and outputs are numpy arrays and small dataclasses, so that a
volume engine can sit behind the server's network boundary.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..errors import PromptError
from ..imaging.volume import Volume

#: what a volume engine may accept; ``VolumeEngine.interactions`` names the subset a model takes
POINT, BOX, SCRIBBLE, LASSO, MASK, CLASS = "point", "box", "scribble", "lasso", "mask", "class"
INTERACTION_KINDS = (POINT, BOX, SCRIBBLE, LASSO, MASK, CLASS)


@dataclass
class Interaction:
    """One user action on a 3D object, in voxel coordinates (k, j, i) of the volume's array.

    - ``point``: ``points`` is (1, 3).
    - ``box``: ``points`` is (2, 3), the first and last voxel along each axis (inclusive). A 2D box spans a
      single voxel along one axis.
    - ``scribble``: ``points`` is the stroke's polyline (N, 3), on one slice or not.
    - ``lasso``: ``points`` is a closed polygon (N, 3) with all points on one slice; its inside counts.
    - ``mask``: ``mask`` is a (K, J, I) bool array: an initial segmentation to refine.
    - ``class``: ``class_name`` names one of the model's classes (``VolumeEngine.classes``).

    ``positive`` False marks background (a negative click, scribble or lasso).
    """

    kind: str
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    positive: bool = True
    mask: np.ndarray | None = None
    class_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INTERACTION_KINDS:
            raise PromptError(f"Unknown interaction '{self.kind}'; use one of {', '.join(INTERACTION_KINDS)}.")
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 3)
        needed = {POINT: (1, 1), BOX: (2, 2), SCRIBBLE: (1, None), LASSO: (3, None)}.get(self.kind)
        if needed is not None:
            least, most = needed
            if len(self.points) < least or (most is not None and len(self.points) > most):
                raise PromptError(f"A {self.kind} needs {least if least == most else f'at least {least}'} points.")
        if self.kind == BOX:
            self.points = np.sort(self.points, axis=0)
        if self.kind == LASSO and int(np.sum(np.ptp(self.points, axis=0) < 0.5)) < 1:
            raise PromptError("A lasso must be drawn on one slice; draw it again in one view.")
        if self.kind == MASK:
            if self.mask is None:
                raise PromptError("An initial-mask interaction needs a mask.")
            self.mask = np.asarray(self.mask, dtype=bool)
        if self.kind == CLASS and not self.class_name:
            raise PromptError("A class prompt needs a class name, e.g. liver.")

    @property
    def is_2d_box(self) -> bool:
        return self.kind == BOX and bool(np.any(self.points[1] - self.points[0] < 0.5))

    def inside(self, shape: tuple[int, int, int]) -> bool:
        """Whether every point lies within a volume of this (K, J, I) shape."""
        if self.kind == MASK:
            return self.mask.shape == tuple(shape)
        upper = np.asarray(shape, dtype=np.float32) - 0.5
        return bool(np.all(self.points >= -0.5) and np.all(self.points <= upper))


@dataclass
class VolumePrediction:
    """A 3D answer: ``mask`` (bool) is the region of the volume starting at voxel ``offset`` (k, j, i).

    Engines that change only part of the volume return that part; ``full`` puts it into a whole-volume mask
    (``previous`` outside the region). ``score`` is the model's own quality estimate, None where it has none.
    """

    mask: np.ndarray
    offset: tuple[int, int, int] = (0, 0, 0)
    score: float | None = None

    @property
    def region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape))

    def full(self, shape: tuple[int, int, int], previous: np.ndarray | None = None) -> np.ndarray:
        result = np.zeros(shape, dtype=bool) if previous is None else np.array(previous, dtype=bool, copy=True)
        result[self.region] = self.mask
        return result


def changed_region(before: np.ndarray, after: np.ndarray) -> VolumePrediction | None:
    """The smallest box holding every voxel that differs, as a prediction of ``after`` there (None: no change)."""
    differs = np.asarray(before, bool) != np.asarray(after, bool)
    if not differs.any():
        return None
    bounds = [np.flatnonzero(differs.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    offset = tuple(int(b[0]) for b in bounds)
    region = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in bounds)
    return VolumePrediction(np.ascontiguousarray(after[region]), offset)


class VolumeEngine(ABC):
    """Base class of engines that segment the whole volume at once."""

    #: "volume" (slice engines are "slice"): what the front ends show and which tools they offer
    kind: str = "volume"
    model_name: str = ""
    device: str = "cpu"
    #: the interaction kinds this model takes
    interactions: tuple[str, ...] = (POINT,)
    #: class prompts by name (lower case) → the model's label, for models that take them
    classes: dict[str, int] = {}
    #: the session whose volume and object the engine holds now; a server's sessions take turns on one model
    owner: object | None = None

    @property
    def lock(self) -> threading.RLock:
        """Held while a session uses the engine: one model, loaded once, serves one session at a time."""
        if "_lock" not in self.__dict__:
            self.__dict__["_lock"] = threading.RLock()
        return self.__dict__["_lock"]

    @property
    def cache_id(self) -> str:
        return f"{self.model_name}@{self.device}"

    @property
    def prompt_types(self) -> tuple[str, ...]:
        return self.interactions

    @abstractmethod
    def set_volume(self, volume: Volume) -> None:
        """Take the volume (raw intensities and geometry); preprocess it once. Starts no object."""

    @abstractmethod
    def start_object(self, initial_mask: np.ndarray | None = None) -> VolumePrediction | None:
        """Forget earlier interactions and begin an object, from ``initial_mask`` (K, J, I) if it has one.

        Returns the engine's answer to the initial mask when the engine re-segments it, else None.
        """

    @abstractmethod
    def interact(self, interaction: Interaction) -> VolumePrediction:
        """Add an interaction to the current object; return its new mask (or the changed region)."""

    def segment_classes(self, names: list[str], progress=None) -> dict[str, np.ndarray]:
        """Whole-volume masks, (K, J, I) bool, for class prompts by name (engines with classes override this)."""
        raise PromptError(f"{self.model_name} takes no class prompts; click on the object instead.")

    def check(self, interaction: Interaction, shape: tuple[int, int, int]) -> None:
        """Raise a PromptError when this model cannot take the interaction, saying what to do instead."""
        if interaction.kind not in self.interactions:
            raise PromptError(
                f"{self.model_name} does not take a {interaction.kind}; use "
                f"{', '.join(self.interactions)}."
            )
        if not interaction.inside(shape):
            raise PromptError(f"The {interaction.kind} lies outside the volume; place it on the image.")
        if interaction.kind == CLASS and interaction.class_name.lower() not in self.classes:
            raise PromptError(
                f"{self.model_name} has no class '{interaction.class_name}'; see `medfm models info "
                f"{self.model_name}` for its classes."
            )

    def close(self) -> None:  # noqa: B027 - most engines hold nothing that needs freeing
        """Free what the engine holds (a GPU's memory); the engine is not used after."""


@lru_cache(maxsize=8)
def class_table(engine: str) -> dict:
    """A model's class prompts from ``<engine>_labels.json`` beside this file (read without torch).

    ``labels``: [{"id", "name", "color"}]; ``everything``: the ids one "everything" pass segments;
    ``groups``: names that stand for several labels. Read once: callers must not change it.
    """
    import json
    from pathlib import Path

    path = Path(__file__).with_name(f"{engine}_labels.json")
    if not path.is_file():
        return {"labels": [], "everything": [], "groups": {}}
    return json.loads(path.read_text(encoding="utf-8"))
