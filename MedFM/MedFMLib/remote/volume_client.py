"""A 3D model's session on a MedFM server: the same calls as a local ``VolumeSession``.

nnInteractive and VISTA3D belong on a server with a GPU: on a laptop's CPU one
click costs about a minute. The client uploads the volume once; each reply
carries the region of the mask that changed, compressed, and the object's
prompts, which this class mirrors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PromptError
from ..imaging.geometry import ViewLike
from ..imaging.intensity import Window
from ..imaging.volume import Volume
from ..interaction.objects import BoxPrompt, PointPrompt
from ..interaction.volume_session import VolumePrompt, VolumeUpdate
from .client import RemoteSession, ServerConnection, _ras_list, _view_value


@dataclass
class RemoteVolumeEngine:
    """What a remote 3D session tells about its engine."""

    model_name: str
    device: str
    interactions: tuple[str, ...]
    server: str
    classes: dict[str, int]
    kind: str = "volume"
    tracks_with_memory: bool = False

    @property
    def prompt_types(self) -> tuple[str, ...]:
        return self.interactions

    @property
    def cache_id(self) -> str:
        return f"{self.model_name}@{self.server}"


class RemoteVolumeSession(RemoteSession):
    """A :class:`~MedFMLib.interaction.volume_session.VolumeSession` whose 3D model runs on a MedFM server."""

    volumetric = True

    def __init__(self, connection: ServerConnection, volume: Volume, model: str, window: Window | None = None,
                 isotropic: bool | None = None) -> None:  # fmt: skip
        self._volume_prompts: dict[int, tuple[VolumePrompt, ...]] = {}
        self.note: str | None = None
        super().__init__(connection, volume, model, window, isotropic)

    def _open(self) -> None:
        super()._open()
        reply = self.opened
        if reply.get("kind") != "volume":
            raise PromptError(f"'{self.model}' on this server is a slice model; open it as a slice session.")
        self.engine = RemoteVolumeEngine(
            self.model, reply["device"], tuple(reply["prompt_types"]), self.connection.url,
            {name: index for index, name in enumerate(reply.get("classes", []))},
        )  # fmt: skip
        self._volume_prompts.clear()

    def _apply_reply(self, header: dict, parts: list[bytes]) -> None:
        super()._apply_reply(header, parts)
        listed = header.get("volume_prompts")
        if listed is not None:
            self._volume_prompts = {
                int(object_id): tuple(
                    VolumePrompt(p[0], p[1], tuple(tuple(float(v) for v in r) for r in p[2]), bool(p[3]), p[4], p[5])
                    for p in prompts
                )
                for object_id, prompts in listed.items()
            }
        self.note = header.get("note")

    def _volume_updates(self, header: dict) -> list[VolumeUpdate]:
        updates = []
        for object_id, offset, shape, score in header.get("volume_updates", []):
            obj = self.objects.get(object_id)
            region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            mask = obj.mask[region].copy() if obj is not None else np.zeros(shape, dtype=bool)
            updates.append(VolumeUpdate(object_id, tuple(offset), mask, score))
        return updates

    def _one(self, header: dict) -> VolumeUpdate:
        updates = self._volume_updates(header)
        return updates[-1] if updates else VolumeUpdate(0, (0, 0, 0), np.zeros((0, 0, 0), bool))

    # ------------------------------------------------------------ prompts
    def prompts(self, object_id: int) -> list[PointPrompt | BoxPrompt]:
        self._object(object_id)
        result: list[PointPrompt | BoxPrompt] = []
        for prompt in self._volume_prompts.get(object_id, ()):
            if prompt.kind == "point":
                result.append(PointPrompt(prompt.id, prompt.ras[0], prompt.positive))
            elif prompt.kind == "box":
                result.append(BoxPrompt(prompt.id, prompt.ras[0], prompt.ras[1]))
        return result

    def has_prompts(self, object_id: int) -> bool:
        return bool(self.volume_prompts(object_id))

    def volume_prompts(self, object_id: int) -> tuple[VolumePrompt, ...]:
        self._object(object_id)
        return self._volume_prompts.get(object_id, ())

    def add_point(self, object_id: int, ras: Sequence[float], positive: bool = True, view: ViewLike = "axial"):
        args = {"object_id": int(object_id), "ras": _ras_list(ras), "positive": bool(positive)}
        return self._one(self._call("add_point", dict(args, view=_view_value(view))))

    def set_box(self, object_id: int, corner_a, corner_b, view: ViewLike = "axial", keep_other_slices=False):
        args = {"object_id": int(object_id), "corner_a": _ras_list(corner_a), "corner_b": _ras_list(corner_b)}
        args.update(view=_view_value(view), keep_other_slices=bool(keep_other_slices))
        return self._one(self._call("set_box", args))

    def move_prompt(self, object_id: int, prompt_id: int, ras) -> list[VolumeUpdate]:
        args = {"object_id": int(object_id), "prompt_id": int(prompt_id), "ras": _ras_list(ras)}
        return self._volume_updates(self._call("move_prompt", args))

    def move_box(self, object_id: int, corner_a, corner_b) -> VolumeUpdate:
        args = {"object_id": int(object_id), "corner_a": _ras_list(corner_a), "corner_b": _ras_list(corner_b)}
        return self._one(self._call("move_box", args))

    def remove_prompt(self, object_id: int, prompt_id: int) -> VolumeUpdate:
        return self._one(self._call("remove_prompt", {"object_id": int(object_id), "prompt_id": int(prompt_id)}))

    def set_roi(self, object_id, corners, view="axial", propagate=True, options=None) -> VolumeUpdate:
        args = {"object_id": int(object_id), "corners": [_ras_list(c) for c in np.asarray(corners, dtype=float)]}
        return self._one(self._call("set_roi", dict(args, view=_view_value(view))))

    def add_scribble(self, object_id: int, ras_points, positive: bool = True, view: ViewLike = "axial"):
        return self._one(self._call("add_scribble", self._stroke(object_id, ras_points, positive, view)))

    def add_lasso(self, object_id: int, ras_points, positive: bool = True, view: ViewLike = "axial"):
        return self._one(self._call("add_lasso", self._stroke(object_id, ras_points, positive, view)))

    def set_class(self, object_id: int, class_name: str) -> VolumeUpdate:
        return self._one(self._call("set_class", {"object_id": int(object_id), "class_name": str(class_name)}))

    def clear_object(self, object_id: int) -> list[VolumeUpdate]:
        return self._volume_updates(self._call("clear_object", {"object_id": int(object_id)}))

    def undo(self) -> list[VolumeUpdate]:
        return self._volume_updates(self._call("undo", {}))

    def redo(self) -> list[VolumeUpdate]:
        return self._volume_updates(self._call("redo", {}))

    def propagate(self, *args, **kwargs):
        raise PromptError(
            f"{self.model} answers in 3D already: there is nothing to propagate. "
            "Click on the slices where the result needs correcting."
        )

    plan_propagation = plan_roi = propagate

    def embedding(self, plane) -> None:
        """Nothing to prefetch: the model takes the whole volume at its first interaction."""

    def is_encoded(self, plane) -> bool:
        return True

    @staticmethod
    def _stroke(object_id: int, ras_points, positive: bool, view: ViewLike) -> dict:
        points = [_ras_list(p) for p in np.asarray(ras_points, dtype=np.float64).reshape(-1, 3)]
        return {"object_id": int(object_id), "ras_points": points, "positive": bool(positive),
                "view": _view_value(view)}  # fmt: skip


def open_remote_session(
    connection: ServerConnection, volume: Volume, model: str, window: Window | None = None,
    isotropic: bool | None = None,
) -> RemoteSession:  # fmt: skip
    """A remote session of the kind the server's model is: slice (SAM family) or 3D (nnInteractive, VISTA3D)."""
    offered = {m.get("name"): m for m in connection.check().get("models", []) if isinstance(m, dict)}
    if offered.get(model, {}).get("kind") == "volume":
        return RemoteVolumeSession(connection, volume, model, window, isotropic)
    return RemoteSession(connection, volume, model, window, isotropic)
