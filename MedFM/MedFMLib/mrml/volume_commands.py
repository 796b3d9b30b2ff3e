"""Scribbles, lassos and class prompts in the slice views, for the controller.

3D models that take them (nnInteractive: scribbles and lassos; VISTA3D: class
prompts) get them as they are. A slice model gets a scribble as a few clicks
sampled along it, and a lasso as the box around it, and the user is told so.
"""

from __future__ import annotations

import numpy as np

from ..errors import MedFMError
from .controls import sliceNormal

#: clicks a slice model gets along a scribble: enough to say where the object is, few enough to decode fast
SCRIBBLE_CLICKS = 5


def addStroke(controller, kind: str, points, sliceNode=None, positive: bool = True) -> None:
    """A scribble or lasso (RAS points, in drawing order) drawn in a slice view."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    session = controller._sessionOrReport()
    if session is None or len(points) == 0:
        return
    name = controller.settings.modelName
    if not getattr(session, "volumetric", False):
        _strokeOnSliceModel(controller, kind, points, sliceNode, positive)
        return
    if kind not in session.engine.prompt_types:
        controller.setStatus(f"{name} takes no {kind}s; use {', '.join(session.engine.prompt_types)}.")
        return
    view = sliceNormal(sliceNode) if sliceNode is not None else "axial"
    add = session.add_scribble if kind == "scribble" else session.add_lasso
    try:
        add(controller.objectId, points, positive=positive, view=view)
    except MedFMError as error:
        controller.setStatus(str(error))
        return
    controller.refreshPreview()
    controller.setStatus(session.note or "")


def _strokeOnSliceModel(controller, kind: str, points, sliceNode, positive: bool) -> None:
    if kind == "scribble":
        picks = np.linspace(0, len(points) - 1, min(SCRIBBLE_CLICKS, len(points))).round().astype(int)
        chosen = points[np.unique(picks)]
        for point in chosen:
            controller.addPoint(point, positive=positive, sliceNode=sliceNode)
        _say(controller, f"{controller.settings.modelName} is a slice model: the scribble became {len(chosen)} "
                         "clicks along it.")  # fmt: skip
        return
    if len(points) < 3:
        controller.setStatus("A lasso needs at least three points around the object; draw it again.")
        return
    # The box around the lasso, on its slice: the corners that span the points' extent in the view.
    controller.setBox(points.min(axis=0), points.max(axis=0), sliceNode)
    _say(controller, f"{controller.settings.modelName} is a slice model: the lasso became the box around it.")


def _say(controller, note: str) -> None:
    """Now, or once the prompts are decoded (their slices may still be encoding): decoding resets the status."""
    if controller.encoding:
        controller.pendingNote = note
    else:
        controller.setStatus(note)


def setClass(controller, className: str) -> None:
    """A class prompt: the model segments that class in the whole volume; clicks refine it after."""
    session = controller._sessionOrReport()
    if session is None:
        return
    if "class" not in session.engine.prompt_types:
        controller.setStatus(f"{controller.settings.modelName} takes no class prompts; click on the object.")
        return
    controller.setStatus(f"Segmenting {className}...")
    try:
        session.set_class(controller.objectId, className)
    except MedFMError as error:
        controller.setStatus(str(error))
        return
    controller.refreshPreview()
    found = session.mask(controller.objectId).any()
    controller.setStatus(f"{className}: {'segmented' if found else 'not found in this volume'}.")


def modelKind(info) -> str:
    """What model lists show for a catalog entry or a server's model: slice, 3D, or 3D + classes."""
    if isinstance(info, dict):
        volumetric, prompts = info.get("kind") == "volume", info.get("prompts", [])
    else:
        volumetric, prompts = info.kind == "volume", info.prompts
    if not volumetric:
        return "slice"
    return "3D + classes" if "class" in prompts else "3D"
