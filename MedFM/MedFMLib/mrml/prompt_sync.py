"""Markups as prompts: keep a session object's prompts equal to what the viewers show.

The Segment Editor effect shows positive and negative clicks as markups
control points and the box as a markups ROI, so users drag and delete them
with Slicer's own tools. After any change, ``PromptSync.sync`` works out what
was added, moved or removed and replays exactly that on the session, which
re-runs the decoder. The view a point was placed in is remembered, because
that decides the slice axis it prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk

from ..errors import MedFMError
from ..imaging.geometry import ViewLike, plane_through, resolve_axis
from ..interaction.objects import BoxPrompt, SliceUpdate
from ..interaction.session import Session
from .bridge import control_points, roi_box_on_slice, roi_corners

_MOVE_TOLERANCE_MM = 1e-4


@dataclass
class _Tracked:
    prompt_id: int
    position: np.ndarray
    view: ViewLike


@dataclass(frozen=True)
class RejectedPrompt:
    """A control point that could not become a prompt, and why (shown to the user)."""

    node_id: str
    point_id: str
    message: str


class PromptSync:
    def __init__(self, session: Session, object_id: int, default_view: ViewLike = "axial") -> None:
        self.session = session
        self.object_id = object_id
        self.default_view = default_view
        self._points: dict[tuple[str, str], _Tracked] = {}
        self._box: tuple[int, tuple] | None = None  # (prompt id, corners) of the ROI now in the session
        self._views: dict[tuple[str, str], ViewLike] = {}

    def set_view(self, node, point_id: str, view: ViewLike) -> None:
        """Record the view (name or slice normal) a control point was placed in."""
        self._views[(node.GetID(), point_id)] = view

    def view_of(self, node, point_id: str) -> ViewLike:
        """The view a control point prompts in: where it was placed, else the default view."""
        return self._views.get((node.GetID(), point_id), self.default_view)

    def prompted_planes(self, *nodes) -> list:
        """The planes the control points of these markups lie on, each in its own view (unplaceable ones skipped)."""
        planes = []
        for node in nodes:
            for point_id, position in control_points(node) if node is not None else []:
                try:
                    planes.append(plane_through(self.session.volume, position, self.view_of(node, point_id)))
                except MedFMError:
                    pass  # sync() rejects it with a message
        return planes

    def sync(self, positive_node=None, negative_node=None) -> tuple[list[SliceUpdate], list[RejectedPrompt]]:
        """Replay on the session what changed in the markups since the last call."""
        updates: list[SliceUpdate] = []
        rejected: list[RejectedPrompt] = []
        seen: set[tuple[str, str]] = set()
        for node, positive in ((positive_node, True), (negative_node, False)):
            if node is None:
                continue
            for point_id, position in control_points(node):
                key = (node.GetID(), point_id)
                seen.add(key)
                tracked = self._points.get(key)
                try:
                    if tracked is None:
                        view = self.view_of(node, point_id)
                        update = self.session.add_point(self.object_id, position, positive=positive, view=view)
                        prompt_id = max(p.id for p in self.session.prompts(self.object_id))
                        self._points[key] = _Tracked(prompt_id, position, view)
                        updates.append(update)
                    elif np.abs(tracked.position - position).max() > _MOVE_TOLERANCE_MM:
                        updates += self.session.move_prompt(self.object_id, tracked.prompt_id, position)
                        tracked.position = position
                except MedFMError as exc:
                    rejected.append(RejectedPrompt(node.GetID(), point_id, str(exc)))
        for key in [k for k in self._points if k not in seen]:
            updates.append(self.session.remove_prompt(self.object_id, self._points.pop(key).prompt_id))
        return updates, rejected

    def sync_box(self, roi_node, view: ViewLike | None = None) -> SliceUpdate | None:
        """Make the ROI the object's box, on the slice through the ROI's centre in the view."""
        if roi_node is None or roi_node.GetNumberOfDefinedControlPoints() == 0:
            if self._box is not None:
                prompt_id, _ = self._box
                self._box = None
                return self.session.remove_prompt(self.object_id, prompt_id)
            return None
        signature = tuple(np.round(roi_corners(roi_node), 4).ravel())
        if self._box is not None and self._box[1] == signature:
            return None
        corner_a, corner_b, axis = self.box_of_roi(roi_node, view)
        update = self.session.set_box(self.object_id, corner_a, corner_b, view=axis)
        box = next(p for p in self.session.prompts(self.object_id) if isinstance(p, BoxPrompt))
        self._box = (box.id, signature)
        return update

    def box_of_roi(self, roi_node, view: ViewLike | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """The ROI's box on the slice through its centre in the view: (corner_a, corner_b, IJK axis)."""
        volume = self.session.volume
        axis = resolve_axis(volume.ijk_to_ras, view if view is not None else self.default_view)
        centre = volume.ras_to_ijk_points(roi_corners(roi_node).mean(axis=0, keepdims=True))[0]
        index = int(np.clip(np.rint(centre[axis]), 0, volume.dimensions[axis] - 1))
        corner_a, corner_b = roi_box_on_slice(volume, roi_node, axis, index)
        return corner_a, corner_b, axis

    def rebuild(self, positive_node, negative_node, roi_node=None) -> None:
        """Redraw the markups from the session's prompts (after the session's own undo or redo)."""
        from .bridge import set_roi_corners

        self._points.clear()
        for node in (positive_node, negative_node):
            if node is not None:
                node.RemoveAllControlPoints()
        self._box = None
        if getattr(self.session, "volumetric", False):
            self._rebuild_volume_prompts(positive_node, negative_node, roi_node)
            return
        for state in self.session.objects[self.object_id].slices.values():
            for point in state.points:
                node = positive_node if point.positive else negative_node
                index = node.AddControlPoint(vtk.vtkVector3d(*point.ras))
                key = (node.GetID(), node.GetNthControlPointID(index))
                self._views[key] = state.plane.axis
                self._points[key] = _Tracked(point.id, np.array(point.ras), state.plane.axis)
            if state.box is not None and roi_node is not None:
                set_roi_corners(roi_node, state.box.corner_a, state.box.corner_b)
                self._box = (state.box.id, tuple(np.round(roi_corners(roi_node), 4).ravel()))
        if self._box is None and roi_node is not None:
            roi_node.RemoveAllControlPoints()

    def _rebuild_volume_prompts(self, positive_node, negative_node, roi_node) -> None:
        """A 3D model's session has no slices: its points and box come as the prompts it lists."""
        from .bridge import set_roi_corners

        for prompt in self.session.prompts(self.object_id):
            if isinstance(prompt, BoxPrompt):
                if roi_node is not None:
                    set_roi_corners(roi_node, prompt.corner_a, prompt.corner_b)
                    self._box = (prompt.id, tuple(np.round(roi_corners(roi_node), 4).ravel()))
                continue
            node = positive_node if prompt.positive else negative_node
            index = node.AddControlPoint(vtk.vtkVector3d(*prompt.ras))
            key = (node.GetID(), node.GetNthControlPointID(index))
            self._points[key] = _Tracked(prompt.id, np.array(prompt.ras), self.view_of(node, key[1]))
        if self._box is None and roi_node is not None:
            roi_node.RemoveAllControlPoints()

    def touched_region(self) -> np.ndarray:
        """The voxels of every slice this object has prompts on: what Apply may change.

        A 3D model answers in the whole volume: all of it."""
        if getattr(self.session, "volumetric", False):
            return np.ones(self.session.volume.array.shape, dtype=bool)
        region = np.zeros(self.session.volume.array.shape, dtype=bool)
        for plane in self.session.objects[self.object_id].slices:
            region[plane.array_index()] = True
        return region
