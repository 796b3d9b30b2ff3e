"""What a MedFM server does with sessions, without the web framework: the same code behind uvicorn and Ray.

``LocalSessions`` holds sessions in this process: the plain server keeps all of its users' sessions in
one, and under ``--ray`` each session's actor holds one. Its methods take the request's bytes and
return the reply's; errors are :class:`~MedFMLib.errors.MedFMError` subclasses that
:func:`error_reply` turns into an HTTP status, a kind and one line.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from ...errors import MedFMError, ModelError, PromptError, ProtocolError, VolumeError
from ...imaging.geometry import SlicePlane
from ...imaging.intensity import Window
from ...imaging.volume import Volume
from ...interaction.session import Session
from ...interaction.volume_session import VolumeSession
from ..protocol import declared_bytes, decode_array, parse_json
from .gpu_queue import GpuQueue, QueuedEngine
from .replies import build_reply, propagation_summary
from .schemas import JOB_METHODS, METHODS, VOLUME_METHODS, EncodePlanes, VolumeHeader
from .sessions import LimitReached, ServerFull, ServerSession, SessionGone, SessionManager, TooLarge

log = logging.getLogger("medfm.server")


class SessionLost(MedFMError):
    """The session's worker died (its node was lost, or it ran out of memory): the client uploads again."""


#: HTTP status per error a client can cause
_STATUS = {
    SessionGone: 404,
    TooLarge: 413,
    ServerFull: 503,
    ProtocolError: 400,
    PromptError: 400,
    VolumeError: 400,
    ModelError: 409,
    LimitReached: 409,
    SessionLost: 410,
}


@dataclass
class ServerConfig:
    token: str
    models: list[str] = field(default_factory=lambda: ["classic"])
    device: str = "auto"
    #: what runs SAM-family encoders on a CPU: auto (OpenVINO when installed), torch, openvino; fast: bf16
    runtime: str = "auto"
    fast: bool = False
    #: the small-object zoom (interaction/zoom.py): None keeps each model's catalog setting
    zoom: bool | None = None
    random_weights: bool = False
    session_ttl_seconds: float = 1800.0
    max_session_mb: int = 4096
    max_total_mb: int = 16384
    cache_mb: int = 1024
    max_upload_mb: int = 1024
    max_batch: int = 4
    #: per session: objects, prompts (points and boxes) and undo steps
    max_objects: int = 64
    max_prompts: int = 2000
    max_undo: int = 50
    #: propagation jobs running at once, all sessions together (one per session at most)
    max_jobs: int = 2
    #: a finished fine-tuning job's model is offered to every user at once (else saved in the store only)
    publish_finetunes: bool = False


class ModelRegistry:
    """The models a server offers; each is loaded on first use and shared by all sessions through the queue."""

    def __init__(self, config: ServerConfig, queue: GpuQueue, store=None) -> None:
        from ...models.store import ModelStore

        self.config = config
        self.queue = queue
        self.store = store if store is not None else ModelStore()
        self._engines: dict[str, QueuedEngine] = {}
        self._lock = threading.Lock()
        for name in config.models:
            self.store.info(name)  # an unknown name stops the server at start, with the catalog's message

    def state(self, name: str) -> str:
        if name in self._engines:
            return "loaded"
        if self.config.random_weights or self.store.is_ready(name):
            return "ready"
        return "not downloaded"

    def describe(self) -> list[dict]:
        listed = []
        for name in self.config.models:
            info = self.store.info(name)
            listed.append(
                {
                    "name": name,
                    "state": self.state(name),
                    "engine": info.engine,
                    "kind": info.kind,
                    "prompts": list(info.prompts),
                    "license": info.license,
                    "commercial_use": info.commercial_use,
                }
            )
        return listed

    def engine(self, name: str) -> QueuedEngine:
        if name not in self.config.models:
            raise ModelError(f"This server does not offer '{name}'; it offers {', '.join(self.config.models)}.")
        with self._lock:  # one load per model, however many users ask at once
            if name not in self._engines:
                if self.state(name) == "not downloaded":
                    raise ModelError(
                        f"'{name}' is not downloaded on the server; its administrator can run "
                        f"`medfm models download {name}` there."
                    )
                from ...engines import create_engine

                log.info("loading model %s on %s", name, self.config.device)
                engine = create_engine(
                    name, device=self.config.device, random_weights=self.config.random_weights, store=self.store,
                    runtime=self.config.runtime, fast=self.config.fast, notify=log.info, zoom=self.config.zoom,
                )  # fmt: skip
                # A 3D engine holds one session's volume at a time (its lock): it does not batch through the queue.
                volumetric = getattr(engine, "kind", "slice") == "volume"
                self._engines[name] = engine if volumetric else QueuedEngine(engine, self.queue)
            return self._engines[name]

    def publish(self, name: str) -> None:
        """Offer a model from now on: a fine-tune this server made, with --publish-finetunes."""
        with self._lock:
            if name not in self.config.models:
                self.config.models.append(name)


def _arguments(args) -> dict:
    """Validated arguments as the session method takes them (options as PropagationOptions)."""
    values = {name: getattr(args, name) for name in type(args).model_fields}
    if "options" in values:
        values["options"] = None if args.options is None else args.options.to_options()
    return values


def check_counts(served: ServerSession, method: str, config: ServerConfig) -> None:
    """Objects and prompts per session are capped: every reply lists the objects, and each costs memory."""
    session = served.session
    if method == "add_object" and len(session.objects) >= config.max_objects:
        raise LimitReached(
            f"This session has {len(session.objects)} objects, the server's limit; apply or remove some first."
        )
    if method in VOLUME_METHODS and not getattr(session, "volumetric", False):
        raise PromptError(f"This session's model ({served.model}) takes no {method[4:].replace('_', ' ')}; "
                          "use a 3D model such as nninteractive.")  # fmt: skip
    if method in ("add_point", "set_box", "set_roi", "plan_roi", *VOLUME_METHODS):
        count = getattr(session, "volume_prompts", session.prompts)
        prompts = sum(len(count(object_id)) for object_id in session.objects)
        if prompts >= config.max_prompts:
            raise LimitReached(
                f"This session holds {prompts} prompts, the server's limit; apply or clear objects first."
            )


def call_method(served: ServerSession, method: str, args) -> object:
    """Run one validated session method; plans are kept for a later ``apply_propagation``."""
    session = served.session
    values = _arguments(args)
    if method == "apply_propagation":
        result = served.results.get(args.result)
        if result is None:
            raise PromptError(f"Propagation result {args.result} is not on the server any more; propagate again.")
        return session.apply_propagation(result)
    if method == "repropagate":
        axis, index = values.pop("plane")
        if axis > 2:
            raise PromptError(f"Axis {axis} does not exist; a plane's axis is 0, 1 or 2.")
        return session.repropagate(values["object_id"], SlicePlane(axis, index), values["options"])
    if method in ("plan_propagation", "plan_roi"):
        result = getattr(session, method)(**values)
        return {"propagation": propagation_summary(result, served.keep_result(result))}
    return getattr(session, method)(**values)


def error_reply(exc: BaseException) -> tuple[int, str, str] | None:
    """(HTTP status, kind, one line) for an error a client caused or may retry; None for a server fault."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return 422, "InvalidArgument", f"Invalid '{where}': {first['msg']}."
    if isinstance(exc, MedFMError) and isinstance(getattr(exc, "status", None), int):
        return exc.status, getattr(exc, "kind", type(exc).__name__), str(exc)  # forwarded from a session's worker
    if isinstance(exc, MedFMError):
        status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)
        return status, type(exc).__name__, str(exc)
    if "out of memory" in str(exc).lower():
        return 503, "OutOfMemory", "The server's GPU ran out of memory; try again in a moment."
    return None


def upload_plan(header: dict) -> tuple[VolumeHeader, dict, int, int]:
    """The upload's header, checked: (spec, array description, volume bytes, voxels), before any voxel is read."""
    spec = VolumeHeader.model_validate(header)
    if len(header["parts"]) != 1:
        raise ProtocolError("A volume upload is one frame with one part: the voxels.")
    meta = spec.array
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not isinstance(shape, list) or len(shape) != 3:
        raise ProtocolError("The volume must be a 3D array (K, J, I) with at least one voxel along each axis.")
    if meta.get("dtype") == "bool":
        raise ProtocolError("The volume must hold numbers, not booleans.")
    volume_bytes = declared_bytes(meta.get("dtype"), shape)  # Python integers: no wrap-around
    return spec, meta, volume_bytes, math.prod(shape)


class LocalSessions:
    """Sessions in this process: upload, calls, encodes and propagation jobs, within the config's limits."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry, manager: SessionManager) -> None:
        self.config, self.registry, self.manager = config, registry, manager

    def create_session(self, spec: VolumeHeader, meta: dict, blob, engine, session_id: str | None = None) -> dict:
        manager, config = self.manager, self.config
        array = decode_array(meta, blob, max_bytes=manager.max_session_bytes)
        volume = Volume(array, np.array(spec.ijk_to_ras, dtype=np.float64), name="remote")
        window = None if spec.window is None else Window(*spec.window)
        volumetric = getattr(engine, "kind", "slice") == "volume"
        if volumetric:
            factory = lambda cache: VolumeSession(volume, engine, max_undo=config.max_undo)  # noqa: E731
        else:
            factory = lambda cache: Session(volume, engine, window, cache, spec.isotropic, max_undo=config.max_undo)  # noqa: E731
        served = manager.create(factory, spec.model, session_id)
        log.info(
            "session %s created: %s, volume %s %s (%.1f MiB); %d sessions, %.0f MiB in use", served.id[:6],
            spec.model, "x".join(map(str, array.shape)), meta["dtype"], array.nbytes / 2**20, len(manager),
            manager.nbytes / 2**20,
        )  # fmt: skip
        # A 3D model takes raw intensities: no window to compute (percentiles of a whole CT cost seconds).
        window = None if volumetric else served.session.window
        return {
            "session": served.id,
            "model": spec.model,
            "kind": "volume" if volumetric else "slice",
            "device": engine.device,
            "prompt_types": list(engine.prompt_types),
            "classes": sorted(getattr(engine, "classes", {}) or {}),
            "ttl_seconds": config.session_ttl_seconds,
            "window": None if window is None else [window.width, window.level],
        }

    def call(self, session_id: str, body: bytes, codec: str) -> bytes:
        manager, config = self.manager, self.config
        message = parse_json(body)
        method, sequence = message.get("method"), message.get("seq")
        if method not in METHODS:
            raise ProtocolError(f"Unknown method {method!r}; the server knows {', '.join(sorted(METHODS))}.")
        if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool)):
            raise ProtocolError("'seq' must be an integer.")
        args = METHODS[method].model_validate(message.get("args") or {})
        served = manager.get(session_id)
        if served.busy:  # its job holds the session: calls never overlap it
            raise LimitReached("A propagation is running on this session; wait for it, or cancel it.")
        with served.lock:
            if sequence is not None and sequence == served.last_sequence and served.last_reply is not None:
                return served.last_reply  # a retry after a lost reply: the action ran already
            check_counts(served, method, config)
            if method == "add_object":
                manager.check_object_budget(served)
            value = call_method(served, method, args)
            manager.settle(served)
            reply = build_reply(served, value, codec)
            served.last_sequence, served.last_reply = sequence, reply
        return reply

    def encode(self, session_id: str, body: bytes) -> dict:
        planes = EncodePlanes.model_validate(parse_json(body)).planes
        session = self.manager.get(session_id).session
        count = 0
        if getattr(session, "volumetric", False):
            return {"encoded": 0}  # a 3D model takes the whole volume at its first interaction
        for axis, index in planes:
            if axis > 2 or index >= session.volume.dimensions[axis]:
                raise PromptError(f"Slice {index} on axis {axis} is outside the volume.")
            session.embedding(SlicePlane(axis, index))
            count += 1
        return {"encoded": count}

    def start_job(self, session_id: str, body: bytes) -> dict:
        message = parse_json(body)
        method = message.get("method")
        if method not in JOB_METHODS:
            raise ProtocolError(f"Only {' and '.join(JOB_METHODS)} run as jobs, not {method!r}.")
        args = METHODS[method].model_validate(message.get("args") or {})
        served = self.manager.get(session_id)
        check_counts(served, method, self.config)
        values = _arguments(args)
        planner = getattr(served.session, method)
        job_id = served.start_job(
            lambda progress, cancelled: planner(**values, progress=progress, cancel=cancelled), self.manager.jobs
        )
        return {"job": job_id}

    def job_state(self, session_id: str, job_id: str, cancel: bool = False) -> dict:
        served = self.manager.get(session_id)
        job = served.jobs.get(job_id)
        if job is None:
            raise SessionGone("This propagation job is not on the server (it ended long ago, or the server restarted).")
        if cancel:
            job.cancel()
        plane = None if job.plane is None else [job.plane.axis, job.plane.index]
        state = {"done": job.done, "total": job.total, "plane": plane, "finished": job.finished}
        if job.finished:
            if job.failure is not None:
                if isinstance(job.failure, MedFMError):
                    state["error"] = {"error": type(job.failure).__name__, "message": str(job.failure)}
                else:
                    log.error("propagation job failed: %s", type(job.failure).__name__, exc_info=job.failure)
                    state["error"] = {"error": "InternalError", "message": "Propagation failed on the server."}
            else:
                with served.lock:
                    if not job.collected:
                        job.result_id, job.collected = served.keep_result(job.result), True
                state["propagation"] = propagation_summary(job.result, job.result_id)
        return state
