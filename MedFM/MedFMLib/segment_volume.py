"""`medfm segment` with a native 3D model (nnInteractive, VISTA3D): prompts in, named 3D segments out.

Points, boxes, scribbles and lassos go to the model as they are; class prompts
(``--class liver``, ``--class everything``) give one named segment per class.
Scribbles and lassos come from files: a Slicer markups file (``.mrk.json``: a
curve, closed curve or point list, in RAS or LPS), or a JSON list of RAS points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .console import StepProgress, note
from .errors import MedFMError, PromptError


def read_stroke_file(path: str | Path) -> list[np.ndarray]:
    """The strokes (each an (N, 3) RAS array) in a markups file or a JSON list of RAS points."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedFMError(
            f"Cannot read the stroke file {path} ({exc}); give a Slicer markups .mrk.json or a JSON list of "
            "[R, A, S] points."
        ) from None
    strokes: list[np.ndarray] = []
    if isinstance(document, dict) and "markups" in document:
        for markup in document["markups"]:
            points = [p["position"] for p in markup.get("controlPoints", []) if "position" in p]
            flip = np.array([-1.0, -1.0, 1.0]) if markup.get("coordinateSystem", "LPS") == "LPS" else np.ones(3)
            if points:
                strokes.append(np.asarray(points, dtype=np.float64) * flip)
    elif isinstance(document, list) and document and isinstance(document[0], list | tuple) and isinstance(
        document[0][0], list | tuple
    ):
        strokes = [np.asarray(stroke, dtype=np.float64) for stroke in document]
    elif isinstance(document, list):
        strokes = [np.asarray(document, dtype=np.float64)]
    if not strokes or any(s.ndim != 2 or s.shape[1] != 3 or not np.all(np.isfinite(s)) for s in strokes):
        raise MedFMError(
            f"{path} holds no usable stroke: give a markups curve (.mrk.json) or a JSON list of [R, A, S] points."
        )
    return strokes


def segment_with_volume_engine(args: argparse.Namespace, session, boxes, points, negatives) -> list:
    """Run the prompts of ``medfm segment`` through a 3D model's session; returns the segments to write."""
    from .imaging.io import SegmentData

    engine = session.engine
    classes = [c.strip() for text in args.classes for c in text.split(",") if c.strip()]
    scribbles = [(s, True) for f in args.scribble for s in read_stroke_file(f)]
    scribbles += [(s, False) for f in args.negative_scribble for s in read_stroke_file(f)]
    lassos = [s for f in args.lasso for s in read_stroke_file(f)]
    if not (classes or points or boxes or scribbles or lassos):
        raise MedFMError("Give a --point, --box, --scribble, --lasso or --class to segment.")
    if args.propagate:
        note(f"{engine.model_name} answers in 3D already: --propagate is not needed and was ignored")
    if classes and "class" not in engine.interactions:
        raise PromptError(f"{engine.model_name} takes no class prompts; click on the object instead.")
    if len(classes) > 1 or (classes and classes[0].lower() == "everything"):
        if points or negatives or boxes or scribbles or lassos:
            raise MedFMError("Several classes (or everything) take no clicks; segment one --class to refine it.")
        return _class_segments(session, classes)
    name = args.name if not classes or args.name != "Segment_1" else classes[0]
    object_id = session.add_object(name, color=_class_color(engine, classes[0]) if classes else None)
    if classes:
        session.set_class(object_id, classes[0])
    for box in boxes:
        session.set_box(object_id, box[:3], box[3:], view=args.view, keep_other_slices=True)
        _say(session)
    for stroke, positive in scribbles:
        session.add_scribble(object_id, stroke, positive=positive, view=args.view)
    for stroke in lassos:
        session.add_lasso(object_id, stroke, view=args.view)
    for point in points:
        session.add_point(object_id, point, positive=True)
    for point in negatives:
        session.add_point(object_id, point, positive=False)
    obj = session.objects[object_id]
    return [SegmentData(obj.name, obj.mask, obj.color)]


def _say(session) -> None:
    if session.note:
        note(session.note)


def _class_color(engine, name: str) -> tuple[float, float, float] | None:
    colors = getattr(engine, "class_colors", {}) or {}
    color = colors.get(name.lower())
    return tuple(float(c) for c in color) if color is not None else None


def _class_segments(session, classes: list[str]) -> list:
    """One named segment per class: in one sliding-window pass where the model runs here."""
    from .imaging.io import SegmentData

    engine = session.engine
    bar = StepProgress(f"segmenting {', '.join(classes)}")
    if hasattr(engine, "segment_classes"):
        engine.set_volume(session.volume)
        masks = engine.segment_classes(classes, progress=bar)
    elif any(c.lower() == "everything" for c in classes):
        raise MedFMError("`--class everything` runs where the model is loaded; on a server, name the classes.")
    else:  # a server: one object per class
        masks = {}
        for done, name in enumerate(classes):
            object_id = session.add_object(name)
            session.set_class(object_id, name)
            masks[name] = session.objects[object_id].mask
            bar(done + 1, len(classes))
    bar.finish()
    segments = [SegmentData(name, mask, _class_color(engine, name) or (0.8, 0.8, 0.2)) for name, mask in masks.items()]
    found = sum(1 for s in segments if s.mask.any())
    print(f"{found} of {len(segments)} classes found", file=sys.stderr)
    return segments
