"""What a session is made of: prompts, per-slice states, objects and their read-only views.

These are plain data, shared by the local :class:`~MedFMLib.interaction.session.Session`,
propagation (which builds new slice states) and the remote client (which mirrors a
server's objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engines.base import Prompts2D
from ..errors import PromptError
from ..imaging.geometry import SlicePlane, ViewLike, resolve_axis
from ..imaging.volume import Volume


@dataclass(frozen=True)
class PointPrompt:
    id: int
    ras: tuple[float, float, float]
    positive: bool


@dataclass(frozen=True)
class BoxPrompt:
    id: int
    corner_a: tuple[float, float, float]
    corner_b: tuple[float, float, float]


#: how a slice got its mask
USER, ROI, PROPAGATED = "user", "roi", "propagated"


@dataclass(frozen=True, eq=False)
class SliceState:
    """The prompts of one object on one plane, and the mask they produced.

    ``points`` and ``box`` are what the user placed. A slice reached by
    propagation (or the middle slice of a 3D box) also has ``carried`` prompts,
    in the slice's own pixel coordinates, and ``carried_logits``, the
    neighbour's low-resolution logits given to the model as a mask prompt.
    """

    plane: SlicePlane
    points: tuple[PointPrompt, ...] = ()
    box: BoxPrompt | None = None
    mask: np.ndarray | None = None
    logits: np.ndarray | None = None
    score: float = 0.0
    carried: Prompts2D | None = None
    carried_logits: np.ndarray | None = None
    origin: str = USER
    #: the eight RAS corners of the 3D box this slice was seeded from (its middle slice only)
    roi_corners: np.ndarray | None = None

    @property
    def has_prompts(self) -> bool:
        """Whether the user placed a prompt on this slice."""
        return bool(self.points) or self.box is not None

    @property
    def has_any_prompt(self) -> bool:
        return self.has_prompts or self.carried is not None

    @property
    def is_anchor(self) -> bool:
        """A slice the user prompted or corrected, or a 3D box's seed: propagation never overwrites it."""
        return self.has_prompts or self.origin == ROI


@dataclass
class SegmentObject:
    id: int
    name: str
    color: tuple[float, float, float]
    mask: np.ndarray
    slices: dict[SlicePlane, SliceState] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceUpdate:
    """What changed after an action: one plane of one object's mask."""

    object_id: int
    plane: SlicePlane
    mask: np.ndarray | None
    score: float
    #: why the action left the mask as it was, for the user ("" when it changed, or when nothing needs saying)
    note: str = ""


def as_ras(point: Sequence[float]) -> tuple[float, float, float]:
    values = np.asarray(point, dtype=np.float64).reshape(-1)
    if values.shape != (3,) or not np.all(np.isfinite(values)):
        raise PromptError(f"A RAS point needs three finite numbers, not {point!r}.")
    return (float(values[0]), float(values[1]), float(values[2]))


class SessionObjects:
    """What a session's objects tell without the model: masks, prompts, the propagation axis.

    Shared by :class:`Session` and the client's ``RemoteSession``, whose objects
    mirror a server's.
    """

    volume: Volume
    objects: dict[int, SegmentObject]

    def mask(self, object_id: int) -> np.ndarray:
        """The object's 3D mask, (K, J, I) bool, in the volume's own grid."""
        return self._object(object_id).mask

    def labelmap(self) -> np.ndarray:
        """All objects as one (K, J, I) labelmap; label = object id, later objects on top."""
        labels = np.zeros(self.volume.array.shape, dtype=np.uint16)
        for obj in self.objects.values():
            labels[obj.mask] = obj.id
        return labels

    def prompts(self, object_id: int) -> list[PointPrompt | BoxPrompt]:
        result: list[PointPrompt | BoxPrompt] = []
        for state in self._object(object_id).slices.values():
            result.extend(state.points)
            if state.box is not None:
                result.append(state.box)
        return result

    def has_prompts(self, object_id: int) -> bool:
        """Whether the object has any prompt (or a propagated slice) yet."""
        return bool(self._object(object_id).slices)

    def roi(self, object_id: int) -> np.ndarray | None:
        """The eight RAS corners of the object's 3D box, if it has one."""
        return next((s.roi_corners for s in self._object(object_id).slices.values() if s.roi_corners is not None), None)

    def propagation_axis(self, object_id: int, view: ViewLike | None = None) -> int:
        if view is not None:
            return resolve_axis(self.volume.ijk_to_ras, view)
        prompted = [s for s in self._object(object_id).slices.values() if s.is_anchor]
        if not prompted:
            raise PromptError("Nothing to propagate yet: segment one slice first (a click or a box), then propagate.")
        newest = max(prompted, key=lambda s: max([p.id for p in s.points] + [s.box.id if s.box else 0]))
        return newest.plane.axis

    def _object(self, object_id: int) -> SegmentObject:
        try:
            return self.objects[object_id]
        except KeyError:
            raise PromptError(f"There is no object {object_id}; add one first.") from None
