"""The MedFM inference server: FastAPI routes over server-side sessions.

A client uploads a volume once (``POST /v1/sessions``), then calls session
methods by name with JSON arguments (``POST /v1/sessions/{id}/call``). Each
reply carries the changed slices' prompts and, per changed object, only the
region of its mask that changed, bit-packed and compressed. Propagation can
also run as a job the client polls for progress and may cancel.

FastAPI is imported at the top: this module is only loaded by ``medfm serve``.

Security: every route needs the bearer token; bodies are size-limited before
they are read; nothing is unpickled; arguments are validated (422 with the
field named); the log never holds voxels, names or prompts.
"""

from __future__ import annotations

import hmac
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ... import __version__
from ...errors import MedFMError, ModelError, PromptError, ProtocolError, VolumeError
from ...imaging.geometry import SlicePlane
from ...imaging.intensity import Window
from ...imaging.volume import Volume
from ...interaction.objects import SliceState, SliceUpdate
from ...interaction.session import Session
from ..protocol import (
    ARRAY_DTYPES,
    FRAME_CONTENT_TYPE,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    available_codecs,
    changed_region,
    decode_array,
    encode_array,
    grow_extent,
    pack_frame,
    parse_json,
    unpack_frame,
)
from .gpu_queue import GpuQueue, QueuedEngine
from .schemas import JOB_METHODS, METHODS, EncodePlanes, VolumeHeader
from .sessions import ServerFull, ServerSession, SessionGone, SessionManager, TooLarge

log = logging.getLogger("medfm.server")

#: HTTP status per error a client can cause
_STATUS = {
    SessionGone: 404,
    TooLarge: 413,
    ServerFull: 503,
    ProtocolError: 400,
    PromptError: 400,
    VolumeError: 400,
    ModelError: 409,
}


@dataclass
class ServerConfig:
    token: str
    models: list[str] = field(default_factory=lambda: ["classic"])
    device: str = "auto"
    random_weights: bool = False
    session_ttl_seconds: float = 1800.0
    max_session_mb: int = 4096
    max_total_mb: int = 16384
    cache_mb: int = 1024
    max_upload_mb: int = 1024
    max_batch: int = 4


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
                    name, device=self.config.device, random_weights=self.config.random_weights, store=self.store
                )
                self._engines[name] = QueuedEngine(engine, self.queue)
            return self._engines[name]


# ------------------------------------------------------------------ replies
def _state_summary(state: SliceState | None) -> dict | None:
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


def _propagation_summary(result, result_id: int | None = None) -> dict:
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
        header["updates"] = [[u.object_id, u.plane.axis, u.plane.index, float(u.score)] for u in updates]
        for update in updates:
            changed.setdefault(update.object_id, set()).add((update.plane.axis, update.plane.index))
    elif isinstance(value, PropagationResult):
        header["propagation"] = _propagation_summary(value)
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
    slices, regions = [], []
    for object_id, planes in changed.items():
        obj = session.objects.get(object_id)
        if obj is None:
            continue
        ordered = sorted(planes)
        for axis, index in ordered:
            slices.append([object_id, axis, index, _state_summary(obj.slices.get(SlicePlane(axis, index)))])
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


def _arguments(args) -> dict:
    """Validated arguments as the session method takes them (options as PropagationOptions)."""
    values = {name: getattr(args, name) for name in type(args).model_fields}
    if "options" in values:
        values["options"] = None if args.options is None else args.options.to_options()
    return values


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
        return {"propagation": _propagation_summary(result, served.keep_result(result))}
    return getattr(session, method)(**values)


# ------------------------------------------------------------------- app
def create_app(config: ServerConfig, store=None):
    """The ASGI application (FastAPI); ``medfm serve`` runs it with uvicorn."""

    queue = GpuQueue(config.max_batch)
    registry = ModelRegistry(config, queue, store)
    manager = SessionManager(
        config.session_ttl_seconds, config.max_session_mb * 2**20, config.max_total_mb * 2**20, config.cache_mb * 2**20
    )
    stop_sweeping = threading.Event()

    def sweep() -> None:
        interval = max(0.2, min(30.0, config.session_ttl_seconds / 4))
        while not stop_sweeping.wait(interval):
            for session_id in manager.expire():
                log.info("session %s expired", session_id[:6])

    @asynccontextmanager
    async def lifespan(app):
        sweeper = threading.Thread(target=sweep, name="MedFM session sweeper", daemon=True)
        sweeper.start()
        yield
        stop_sweeping.set()
        manager.close_all()
        queue.stop()

    app = FastAPI(title="MedFM", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager, app.state.registry, app.state.queue = manager, registry, queue

    def error(status: int, kind: str, message: str):
        return JSONResponse({"error": kind, "message": message}, status_code=status, headers=_version_headers())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Token, protocol version and body size, before any route reads anything."""
        supplied = request.headers.get("authorization", "")
        if not supplied.startswith("Bearer "):
            return error(401, "Unauthorized", "This MedFM server needs a token: give the one `medfm serve` showed.")
        if not hmac.compare_digest(supplied[7:].encode(), config.token.encode()):
            return error(401, "Unauthorized", "Wrong token for this MedFM server; check it with the administrator.")
        client_protocol = request.headers.get("x-medfm-protocol")
        if client_protocol is not None and client_protocol != str(PROTOCOL_VERSION):
            client_version = request.headers.get("x-medfm-version", "?")
            return error(
                426,
                "VersionMismatch",
                f"This server runs MedFM {__version__} (protocol {PROTOCOL_VERSION}) and the client MedFM "
                f"{client_version} (protocol {client_protocol}); install the same MedFM version on both.",
            )
        is_upload = request.method == "POST" and request.url.path.rstrip("/") == "/v1/sessions"
        limit = config.max_upload_mb * 2**20 if is_upload else MAX_HEADER_BYTES
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413, "TooLarge", f"The request is larger than the {limit / 2**20:.2f} MiB this route accepts.")
        if request.method in ("POST", "PUT", "PATCH"):
            # Read the body here, bounded, so that a chunked upload without a length is limited too.
            body = bytearray()
            try:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        return error(
                            413, "TooLarge", f"The request is larger than the {limit / 2**20:.2f} MiB allowed."
                        )
            except ClientDisconnect:
                log.info("a client disconnected during %s %s", request.method, request.url.path)
                return error(400, "ClientDisconnect", "The client went away before its request was complete.")
            request.state.body = bytes(body)
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - survive anything, log no data
            log.exception("internal error on %s %s", request.method, request.url.path)
            return error(500, "InternalError", "The server failed on this request; its log has the details.")
        response.headers.update(_version_headers())
        return response

    def failure(exc: BaseException):
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            return error(422, "InvalidArgument", f"Invalid '{where}': {first['msg']}.")
        if isinstance(exc, MedFMError):
            status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)
            return error(status, type(exc).__name__, str(exc))
        text = str(exc).lower()
        if "out of memory" in text:
            return error(503, "OutOfMemory", "The server's GPU ran out of memory; try again in a moment.")
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return error(500, "InternalError", "The server failed on this request; its log has the details.")

    async def guarded(function, *args):
        try:
            return await run_in_threadpool(function, *args)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one JSON line
            return failure(exc)

    def frame_response(data: bytes):
        return Response(content=data, media_type=FRAME_CONTENT_TYPE)

    @app.get("/v1")
    async def describe():
        return {
            "server": "medfm",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "models": registry.describe(),
            "codecs": available_codecs(),
            "sessions": len(manager),
            "memory_mb": round(manager.nbytes / 2**20, 1),
            "limits": {
                "max_session_mb": config.max_session_mb,
                "max_total_mb": config.max_total_mb,
                "max_upload_mb": config.max_upload_mb,
                "session_ttl_seconds": config.session_ttl_seconds,
            },
            "queue": dict(vars(queue.stats), pending=queue.pending),
        }

    def create_session(body: bytes) -> dict:
        header, parts = unpack_frame(body)
        spec = VolumeHeader.model_validate(header)
        if len(parts) != 1:
            raise ProtocolError("A volume upload is one frame with one part: the voxels.")
        meta = spec.array
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ProtocolError("The volume must be a 3D array (K, J, I) with at least one voxel along each axis.")
        if meta.get("dtype") == "bool":
            raise ProtocolError("The volume must hold numbers, not booleans.")
        voxels = int(np.prod(shape))
        itemsize = np.dtype(meta["dtype"]).itemsize if meta.get("dtype") in ARRAY_DTYPES else 1
        manager.check_volume(voxels * itemsize, voxels)
        engine = registry.engine(spec.model)  # before decoding: a wrong model name costs nothing
        array = decode_array(meta, parts[0], max_bytes=manager.max_session_bytes)
        volume = Volume(array, np.array(spec.ijk_to_ras, dtype=np.float64), name="remote")
        window = None if spec.window is None else Window(*spec.window)
        served = manager.create(lambda cache: Session(volume, engine, window, cache, spec.isotropic), spec.model)
        log.info(
            "session %s: %s, volume %s %s (%.0f MiB)", served.id[:6], spec.model, "x".join(map(str, shape)),
            meta["dtype"], array.nbytes / 2**20,
        )  # fmt: skip
        return {
            "session": served.id,
            "model": spec.model,
            "device": engine.device,
            "prompt_types": list(engine.prompt_types),
            "ttl_seconds": config.session_ttl_seconds,
            "window": [served.session.window.width, served.session.window.level],
        }

    @app.post("/v1/sessions")
    async def post_session(request: Request):
        return await guarded(create_session, request.state.body)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        closed = manager.close(session_id)
        if closed:
            log.info("session %s closed", session_id[:6])
        return {"closed": closed}

    def call(session_id: str, body: bytes, codec: str) -> bytes:
        message = parse_json(body)
        method, sequence = message.get("method"), message.get("seq")
        if method not in METHODS:
            raise ProtocolError(f"Unknown method {method!r}; the server knows {', '.join(sorted(METHODS))}.")
        if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool)):
            raise ProtocolError("'seq' must be an integer.")
        args = METHODS[method].model_validate(message.get("args") or {})
        served = manager.get(session_id)
        with served.lock:
            if sequence is not None and sequence == served.last_sequence and served.last_reply is not None:
                return served.last_reply  # a retry after a lost reply: the action ran already
            if method == "add_object":
                manager.check_object_budget(served)
            reply = build_reply(served, call_method(served, method, args), codec)
            served.last_sequence, served.last_reply = sequence, reply
        return reply

    @app.post("/v1/sessions/{session_id}/call")
    async def post_call(session_id: str, request: Request):
        codec = _reply_codec(request)
        reply = await guarded(call, session_id, request.state.body, codec)
        return reply if not isinstance(reply, bytes) else frame_response(reply)

    def encode(session_id: str, body: bytes) -> dict:
        planes = EncodePlanes.model_validate(parse_json(body)).planes
        served = manager.get(session_id)
        session = served.session
        count = 0
        for axis, index in planes:
            if axis > 2 or index >= session.volume.dimensions[axis]:
                raise PromptError(f"Slice {index} on axis {axis} is outside the volume.")
            session.embedding(SlicePlane(axis, index))
            count += 1
        return {"encoded": count}

    @app.post("/v1/sessions/{session_id}/encode")
    async def post_encode(session_id: str, request: Request):
        return await guarded(encode, session_id, request.state.body)

    def start_job(session_id: str, body: bytes) -> dict:
        message = parse_json(body)
        method = message.get("method")
        if method not in JOB_METHODS:
            raise ProtocolError(f"Only {' and '.join(JOB_METHODS)} run as jobs, not {method!r}.")
        args = METHODS[method].model_validate(message.get("args") or {})
        served = manager.get(session_id)
        values = _arguments(args)
        planner = getattr(served.session, method)
        job_id = served.start_job(lambda progress, cancelled: planner(**values, progress=progress, cancel=cancelled))
        return {"job": job_id}

    @app.post("/v1/sessions/{session_id}/jobs")
    async def post_job(session_id: str, request: Request):
        return await guarded(start_job, session_id, request.state.body)

    def job_state(session_id: str, job_id: str, cancel: bool = False) -> dict:
        served = manager.get(session_id)
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
                state["propagation"] = _propagation_summary(job.result, job.result_id)
        return state

    @app.get("/v1/sessions/{session_id}/jobs/{job_id}")
    async def get_job(session_id: str, job_id: str):
        return await guarded(job_state, session_id, job_id)

    @app.delete("/v1/sessions/{session_id}/jobs/{job_id}")
    async def cancel_job(session_id: str, job_id: str):
        return await guarded(job_state, session_id, job_id, True)

    return app


def _version_headers() -> dict:
    return {"X-MedFM-Version": __version__, "X-MedFM-Protocol": str(PROTOCOL_VERSION)}


def _reply_codec(request) -> str:
    wanted = request.headers.get("x-medfm-codec", "zlib")
    return wanted if wanted in available_codecs() else "zlib"
