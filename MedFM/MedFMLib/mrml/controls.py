"""What the controller's front ends share: keys, modes, settings, and the stroke tool for 3D models.

Kept apart from the controller so that each stays a small module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: keys in the slice views, shared by the effect and the app
KEY_ACTIONS = {
    "p": "positive",
    "n": "negative",
    "b": "box",
    "s": "scribble",
    "l": "lasso",
    "z": "undo",
    "y": "redo",
    "Return": "apply",
    "KP_Enter": "apply",
}
#: scribbles and lassos: drawn strokes, for the 3D models that take them (nnInteractive)
STROKE_MODES = ("scribble", "lasso")
MODES = ("positive", "negative", "box", *STROKE_MODES)
NEIGHBOURS_TO_PREFETCH = 3
GRAB_RADIUS_PIXELS = 6  # a press this close to a control point drags it instead of adding a new one
DRAG_DECODE_SECONDS = 0.12  # decode at most ~8 times a second while a point is dragged
#: a stroke keeps a point only this far (in slice pixels) from the one before: a drag sends many moves
STROKE_SPACING_PIXELS = 2.0


@dataclass
class ControllerSettings:
    """What the user chose in the module panel or the app's settings."""

    modelName: str = "classic"
    device: str = "auto"
    intensity: str = "viewer"  # the viewer's window/level, a preset name, or "auto"
    keepConnected: bool = False
    fillHoles: bool = False


def sliceNormal(sliceNode) -> list[float]:
    """The slice view's normal in RAS: the view a prompt placed there belongs to."""
    sliceToRas = sliceNode.GetSliceToRAS()
    return [sliceToRas.GetElement(row, 2) for row in range(3)]


class StrokeTool:
    """A scribble or lasso being drawn: the RAS points between press and release, shown as a markups curve.

    The curve (open for a scribble, closed for a lasso) stays on screen after the release, so the user sees
    what was drawn, until the next stroke or a reset.
    """

    def __init__(self, controller) -> None:
        self.controller = controller  # its scene is the editor node's, which a new scene replaces
        self.kind: str | None = None
        self.points: list[np.ndarray] = []
        self.positive = True
        self.sliceNode = None
        self.curveNode = None

    @property
    def active(self) -> bool:
        return self.kind is not None

    def start(self, kind: str, ras, sliceNode, positive: bool) -> None:
        self.kind, self.sliceNode, self.positive = kind, sliceNode, positive
        self.points = [np.asarray(ras, dtype=float)]
        self._show()

    def extend(self, ras) -> None:
        """A mouse move while drawing: keep the point if it moved far enough on the screen."""
        if not self.active:
            return
        ras = np.asarray(ras, dtype=float)
        spacing = STROKE_SPACING_PIXELS * self._millimetresPerPixel()
        if np.linalg.norm(ras - self.points[-1]) >= spacing:
            self.points.append(ras)
            self._show()

    def finish(self, ras=None):
        """The release: (kind, RAS points, slice node, positive), or None when no stroke was being drawn."""
        if not self.active:
            return None
        if ras is not None:
            self.extend(ras)
        stroke = (self.kind, np.array(self.points), self.sliceNode, self.positive)
        self.kind = None
        return stroke

    def clear(self) -> None:
        self.kind, self.points = None, []
        if self.curveNode is not None and self.curveNode.GetScene() is not None:
            self.curveNode.RemoveAllControlPoints()

    def remove(self) -> None:
        if self.curveNode is not None and self.curveNode.GetScene() is not None:
            self.curveNode.GetScene().RemoveNode(self.curveNode)
        self.curveNode = None

    def _millimetresPerPixel(self) -> float:
        if self.sliceNode is None:
            return 1.0
        return self.sliceNode.GetFieldOfView()[0] / max(self.sliceNode.GetDimensions()[0], 1)

    def _show(self) -> None:
        import vtk

        className = "vtkMRMLMarkupsClosedCurveNode" if self.kind == "lasso" else "vtkMRMLMarkupsCurveNode"
        if self.curveNode is None or self.curveNode.GetScene() is None or not self.curveNode.IsA(className):
            self.remove()
            self.curveNode = self.controller.scene.AddNewNodeByClass(className, f"MedFM {self.kind}")
            self.curveNode.SetSaveWithScene(False)
            self.curveNode.CreateDefaultDisplayNodes()
            display = self.curveNode.GetDisplayNode()
            display.SetPointLabelsVisibility(False)
            display.SetGlyphScale(0.5)
            self.curveNode.SetLocked(True)  # drawn by MedFM: a press on it starts a new stroke, not a drag
        color = (0.1, 0.9, 0.1) if self.positive else (0.95, 0.15, 0.15)
        self.curveNode.GetDisplayNode().SetSelectedColor(*color)
        self.curveNode.GetDisplayNode().SetColor(*color)
        points = vtk.vtkPoints()
        for point in self.points:
            points.InsertNextPoint(*point)
        self.curveNode.SetControlPointPositionsWorld(points)
