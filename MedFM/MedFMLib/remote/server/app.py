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

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ... import __version__
from ..protocol import FRAME_CONTENT_TYPE, MAX_HEADER_BYTES, PROTOCOL_VERSION, available_codecs
from .finetune_jobs import FINETUNE_PATH, FinetuneJobs, add_finetune_routes, short_job_path
from .gpu_queue import GpuQueue
from .guard import short_path
from .operations import (  # noqa: F401 - ServerConfig and ModelRegistry are imported from here too
    LocalSessions,
    ModelRegistry,
    ServerConfig,
    error_reply,
    upload_plan,
)
from .sessions import SessionManager
from .upload import BODY_IDLE_SECONDS, UploadReader

log = logging.getLogger("medfm.server")


class LocalBackend:
    """The plain server's sessions: all in this process, sharing one GPU queue and one memory budget."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry) -> None:
        self.config, self.registry = config, registry
        self.manager = SessionManager(
            config.session_ttl_seconds,
            config.max_session_mb * 2**20,
            config.max_total_mb * 2**20,
            config.cache_mb * 2**20,
            config.max_jobs,
        )
        self.sessions = LocalSessions(config, registry, self.manager)
        self._stop_sweeping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._sweep, name="MedFM session sweeper", daemon=True).start()

    def stop(self) -> None:
        self._stop_sweeping.set()
        self.manager.close_all()

    def _sweep(self) -> None:
        interval = max(0.2, min(30.0, self.config.session_ttl_seconds / 4))
        while not self._stop_sweeping.wait(interval):
            for served in self.manager.expire():
                log.info("session %s expired after %.0f s idle; %d in use", served.id[:6],
                         self.config.session_ttl_seconds, len(self.manager))  # fmt: skip

    def describe(self) -> dict:
        return {"sessions": len(self.manager), "memory_mb": round(self.manager.nbytes / 2**20, 1)}

    async def open(self, header: dict, reader) -> dict:
        """Room is reserved and the model loaded before the voxels are read; they stream into one buffer."""
        spec, meta, volume_bytes, voxels = upload_plan(header)
        with self.manager.admission(volume_bytes, voxels):
            engine = await run_in_threadpool(self.registry.engine, spec.model)  # a wrong model costs no upload
            (blob,) = await reader.parts()
            return await run_in_threadpool(self.sessions.create_session, spec, meta, blob, engine)

    async def close(self, session_id: str) -> bool:
        closed = self.manager.close(session_id)
        if closed is not None:
            log.info("session %s closed by its client; %d in use", session_id[:6], len(self.manager))
        return closed is not None

    async def call(self, session_id: str, body: bytes, codec: str) -> bytes:
        return await run_in_threadpool(self.sessions.call, session_id, body, codec)

    async def encode(self, session_id: str, body: bytes) -> dict:
        return await run_in_threadpool(self.sessions.encode, session_id, body)

    async def start_job(self, session_id: str, body: bytes) -> dict:
        return await run_in_threadpool(self.sessions.start_job, session_id, body)

    async def job_state(self, session_id: str, job_id: str, cancel: bool = False) -> dict:
        return await run_in_threadpool(self.sessions.job_state, session_id, job_id, cancel)


# ------------------------------------------------------------------- app
def create_app(config: ServerConfig, store=None, backend=None):
    """The ASGI application (FastAPI); ``medfm serve`` runs it with uvicorn, ``--ray`` on Ray Serve.

    ``backend`` holds the sessions: in this process (the default), or in Ray actors.
    """
    queue = GpuQueue(config.max_batch)
    registry = ModelRegistry(config, queue, store)
    backend = backend if backend is not None else LocalBackend(config, registry)
    # Fine-tuning jobs run beside the plain server's sessions; a backend elsewhere (Ray) says where they run.
    finetunes = FinetuneJobs(config, registry) if getattr(backend, "runs_finetunes", True) else None

    @asynccontextmanager
    async def lifespan(app):
        backend.start()
        yield
        if finetunes is not None:
            finetunes.close()
        backend.stop()
        queue.stop()

    app = FastAPI(title="MedFM", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend, app.state.registry, app.state.queue = backend, registry, queue

    def error(status: int, kind: str, message: str):
        return JSONResponse({"error": kind, "message": message}, status_code=status, headers=_version_headers())

    def is_upload(request: Request) -> bool:
        return request.method == "POST" and request.url.path.rstrip("/") in ("/v1/sessions", FINETUNE_PATH)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Token, protocol version and body size, before any route reads anything; one log line per request."""
        started = time.monotonic()
        response = await check_and_call(request, call_next)
        path = short_path(short_job_path(request.url.path))
        log.info("%s %s %d (%.0f ms)", request.method, path, response.status_code,
                 1000 * (time.monotonic() - started))  # fmt: skip
        return response

    async def check_and_call(request: Request, call_next):
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
        limit = config.max_upload_mb * 2**20 if is_upload(request) else MAX_HEADER_BYTES
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return error(413, "TooLarge", f"The request is larger than the {limit / 2**20:.2f} MiB this route accepts.")
        if request.method in ("POST", "PUT", "PATCH") and not is_upload(request):  # an upload streams to its route
            body = bytearray()
            try:
                chunks = request.stream().__aiter__()
                while True:
                    try:
                        body += await asyncio.wait_for(chunks.__anext__(), BODY_IDLE_SECONDS)
                    except StopAsyncIteration:
                        break
                    if len(body) > limit:
                        return error(413, "TooLarge", f"The request is larger than the {limit / 2**20:.2f} MiB allowed")
            except (ClientDisconnect, asyncio.TimeoutError):
                log.warning("a client went away or stalled before its request was complete")
                return error(400, "ClientDisconnect", "The client went away before its request was complete.")
            request.state.body = bytes(body)
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - survive anything, log no data
            log.exception("internal error on %s %s", request.method, short_path(request.url.path))
            return error(500, "InternalError", "The server failed on this request; its log has the details.")
        response.headers.update(_version_headers())
        return response

    def failure(exc: BaseException):
        reply = error_reply(exc)
        if reply is not None:
            return error(*reply)
        if isinstance(exc, ClientDisconnect):
            return error(400, "ClientDisconnect", "The client went away before its request was complete.")
        log.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return error(500, "InternalError", "The server failed on this request; its log has the details.")

    async def guarded(awaitable):
        try:
            return await awaitable
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
            **backend.describe(),
            "limits": {
                "max_session_mb": config.max_session_mb,
                "max_total_mb": config.max_total_mb,
                "max_upload_mb": config.max_upload_mb,
                "session_ttl_seconds": config.session_ttl_seconds,
                "max_objects": config.max_objects,
                "max_prompts": config.max_prompts,
                "max_undo": config.max_undo,
                "max_jobs": config.max_jobs,
            },
            "queue": dict(vars(queue.stats), pending=queue.pending),
            "finetune": finetunes.describe() if finetunes is not None else backend.finetune_description(),
        }

    @app.post("/v1/sessions")
    async def post_session(request: Request):
        """The header is checked (and room reserved) before the voxels are read."""
        reader = UploadReader(request, config.max_upload_mb * 2**20)
        try:
            return await backend.open(await reader.header(), reader)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one JSON line
            return failure(exc)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        return await guarded(_closed(backend.close(session_id)))

    @app.post("/v1/sessions/{session_id}/call")
    async def post_call(session_id: str, request: Request):
        reply = await guarded(backend.call(session_id, request.state.body, _reply_codec(request)))
        return reply if not isinstance(reply, bytes) else frame_response(reply)

    @app.post("/v1/sessions/{session_id}/encode")
    async def post_encode(session_id: str, request: Request):
        return await guarded(backend.encode(session_id, request.state.body))

    @app.post("/v1/sessions/{session_id}/jobs")
    async def post_job(session_id: str, request: Request):
        return await guarded(backend.start_job(session_id, request.state.body))

    @app.get("/v1/sessions/{session_id}/jobs/{job_id}")
    async def get_job(session_id: str, job_id: str):
        return await guarded(backend.job_state(session_id, job_id))

    @app.delete("/v1/sessions/{session_id}/jobs/{job_id}")
    async def cancel_job(session_id: str, job_id: str):
        return await guarded(backend.job_state(session_id, job_id, True))

    if finetunes is not None:
        add_finetune_routes(app, finetunes, failure)
    else:

        @app.api_route(FINETUNE_PATH, methods=["POST"])
        @app.api_route(FINETUNE_PATH + "/{job_id}", methods=["GET", "DELETE"])
        async def no_finetune(request: Request):
            return error(501, "NotSupported", backend.finetune_description()["message"])

    return app


async def _closed(closing) -> dict:
    return {"closed": await closing}


def _version_headers() -> dict:
    return {"X-MedFM-Version": __version__, "X-MedFM-Protocol": str(PROTOCOL_VERSION)}


def _reply_codec(request) -> str:
    wanted = request.headers.get("x-medfm-codec", "zlib")
    return wanted if wanted in available_codecs() else "zlib"
