"""A call's reply frame: the changed slices' prompts, the changed mask regions, and the value itself."""

from __future__ import annotations

import numpy as np

from ...imaging.geometry import SlicePlane
from ...interaction.objects import SliceState, SliceUpdate
from ...interaction.volume_session import VolumeUpdate
from ..protocol import changed_region, encode_array, grow_extent, pack_frame
from .sessions import ServerSession


def state_summary(state: SliceState | None) -> dict | None:
    if state is None:
        return None
    return {
        "points": [[p.id, *p.ras, p.positive] for p in state.points],
        "box": None if state.box is None else [state.box.id, list(state.box.corner_a), list(state.box.corner_b)],
        "score": float(state.score),
        "origin": state.origin,
        "roi": None if state.roi_corners is None else np.asarray(state.roi_corners).tolist(),
        "has_mask": state.mask is not None,
    }


def propagation_summary(result, result_id: int | None = None) -> dict:
    return {
        "object": result.object_id,
        "axis": result.axis,
        "stops": [list(stop) for stop in result.stops],
        "slices_written": result.slices_written,
        "result": result_id,
    }


def build_reply(served: ServerSession, value, codec: str) -> bytes:
    """The frame for a call's return value: changed slices, changed mask regions, and the value itself.

    A plan (a dict) changes nothing yet: it goes into the header as it is.
    """
    from ...interaction.propagation import PropagationResult

    session = served.session
    header: dict = dict(value) if isinstance(value, dict) else {}
    changed: dict[int, set[tuple[int, int]]] = {}
    if isinstance(value, SliceUpdate) or (isinstance(value, list) and all(isinstance(v, SliceUpdate) for v in value)):
        updates = [value] if isinstance(value, SliceUpdate) else value
        header["updates"] = [[u.object_id, u.plane.axis, u.plane.index, float(u.score), u.note] for u in updates]
        for update in updates:
            changed.setdefault(update.object_id, set()).add((update.plane.axis, update.plane.index))
    elif isinstance(value, PropagationResult):
        header["propagation"] = propagation_summary(value)
        planes = {(plane.axis, plane.index) for plane in value.states}
        if planes:
            changed[value.object_id] = planes
    elif isinstance(value, (int, str)):
        header["value"] = value
    parts: list[bytes] = []
    if isinstance(value, np.ndarray):
        meta, blob = encode_array(value, codec)
        header["array"] = meta
        parts.append(blob)
    regions = []
    if isinstance(value, VolumeUpdate) or (isinstance(value, list) and value and isinstance(value[0], VolumeUpdate)):
        # A 3D model's answer: send exactly the region that changed, compressed.
        updates = [value] if isinstance(value, VolumeUpdate) else value
        header["volume_updates"] = [[u.object_id, list(u.offset), list(u.mask.shape),
                                     None if u.score is None else float(u.score)] for u in updates]  # fmt: skip
        for update in updates:
            if update.mask.size and update.object_id in session.objects:
                meta, blob = encode_array(session.objects[update.object_id].mask[update.region], codec)
                regions.append({"object": update.object_id, "start": list(update.offset), "mask": meta})
                parts.append(blob)
    if hasattr(session, "volume_prompts"):
        header["volume_prompts"] = {str(o): [[p.id, p.kind, [list(r) for r in p.ras], p.positive, p.class_name,
                                              p.axis] for p in session.volume_prompts(o)]
                                    for o in session.objects}  # fmt: skip
        header["note"] = session.note
    slices = []
    for object_id, planes in changed.items():
        obj = session.objects.get(object_id)
        if obj is None:
            continue
        ordered = sorted(planes)
        for axis, index in ordered:
            slices.append([object_id, axis, index, state_summary(obj.slices.get(SlicePlane(axis, index)))])
        extent = grow_extent(served.extents.get(object_id), obj.mask, ordered)
        served.extents[object_id] = extent
        region = changed_region(obj.mask, ordered, extent)
        if region is None:
            continue
        meta, blob = encode_array(obj.mask[region], codec)
        regions.append({"object": object_id, "start": [s.start for s in region], "mask": meta})
        parts.append(blob)
    header.update(
        slices=slices,
        regions=regions,
        objects=[[o.id, o.name, list(o.color)] for o in session.objects.values()],
        can_undo=session.can_undo,
        can_redo=session.can_redo,
    )
    return pack_frame(header, parts)
