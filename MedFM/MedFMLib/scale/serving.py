"""`medfm serve --ray`: the same HTTP API, with each session in its own actor on a Ray cluster.

The front end is the plain server's FastAPI app (the same token, protocol, limits and replies) run as a
Ray Serve deployment; it keeps no session state, so it can have several replicas. Its session routes
go to :class:`RayBackend`, which creates one :class:`~MedFMLib.scale.session_actor.SessionActor` per
session and routes each call to it by the session id (a cached handle, else a lookup by name).

Why not pin sessions to Serve replicas: model multiplexing sends a request elsewhere after a second or
when a replica is busy, the consistent-hash router is alpha, and state dies with its replica.

Admission: a new session needs a GPU share (and its memory limit, as Ray's ``memory`` resource). When
none is free it gets 503 at once; creation has a timeout, after which the actor is ended and the
answer is 503 too. A session whose actor died (a lost node, out of memory) gets 410: the client
uploads again and replays its journal, as after a server restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from ..errors import MedFMError, ModelError
from .cluster import NAMESPACE, import_ray, ray_cluster
from .session_actor import ACTOR_PREFIX, METHOD_GROUPS, Failure, actor_name, session_actor_class

log = logging.getLogger("medfm.server")

APP_NAME = "medfm"
#: a GPU share per session where the cluster has GPUs: four sessions per GPU
DEFAULT_GPU_SHARE = 0.25
FINETUNE_MESSAGE = (
    "Fine-tuning jobs run on a plain `medfm serve` (without --ray); on a cluster, run `medfm finetune` on a GPU node."
)


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local cluster for the server's life
    gpus_per_session: float | None = None  # None: DEFAULT_GPU_SHARE if the cluster has GPUs, else 0
    replicas: int = 1
    start_timeout_seconds: float = 60.0
    #: MEDFM_* variables the actors need (the models' home and catalog): a cluster started earlier lacks them
    env: dict = field(default_factory=dict)


def medfm_environment() -> dict:
    """This process's MEDFM_* settings for the actors, except the token (it stays with the front end)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MEDFM_") and k != "MEDFM_TOKEN"}


class ForwardedError(MedFMError):
    """An error a session actor answered with: its HTTP status and kind pass through unchanged."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.status, self.kind = failure.status, failure.kind


class RayBackend:
    """The session routes' side on Ray: creates session actors and forwards calls to them."""

    runs_finetunes = False

    def __init__(self, config, options: RayOptions) -> None:
        self.config, self.options = config, options
        self._handles: dict = {}
        self._actor_class = None

    # ------------------------------------------------------------ lifetime
    def start(self) -> None:
        import_ray()

    def stop(self) -> None:
        self._handles.clear()  # sessions outlive a front-end replica: they end on DELETE or when idle

    def gpu_share(self) -> float:
        import ray

        if self.options.gpus_per_session is not None:
            return self.options.gpus_per_session
        return DEFAULT_GPU_SHARE if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def describe(self) -> dict:
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        sessions = sum(1 for a in named if a["namespace"] == NAMESPACE and a["name"].startswith(ACTOR_PREFIX))
        total, free = ray.cluster_resources(), ray.available_resources()
        return {
            "sessions": sessions,
            "cluster": {
                "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
                "gpus": total.get("GPU", 0.0),
                "free_gpus": free.get("GPU", 0.0),
                "gpus_per_session": self.gpu_share(),
            },
        }

    def finetune_description(self) -> dict:
        return {"publish": False, "running": False, "queued": 0, "max_queued": 0, "available": False,
                "message": FINETUNE_MESSAGE}  # fmt: skip

    # ------------------------------------------------------------ sessions
    def _check_admission(self, header: dict) -> float:
        """Before any voxel is read: the model is offered, the volume fits a session, a GPU share is free."""
        import ray

        from ..remote.server.operations import upload_plan
        from ..remote.server.sessions import ServerFull, needed_bytes

        spec, _, volume_bytes, voxels = upload_plan(header)
        config = self.config
        if spec.model not in config.models:
            raise ModelError(f"This server does not offer '{spec.model}'; it offers {', '.join(config.models)}.")
        needed_bytes(volume_bytes, voxels, config.cache_mb * 2**20, config.max_session_mb * 2**20)
        share = self.gpu_share()
        free = ray.available_resources()
        if share > 0 and free.get("GPU", 0.0) + 1e-9 < share:
            raise ServerFull("The server is full: every GPU share is taken by a session; try again later.")
        if free.get("memory", float("inf")) < config.max_session_mb * 2**20:
            raise ServerFull("The server is full: the cluster's memory is taken by sessions; try again later.")
        return share

    async def open(self, header: dict, reader) -> dict:
        import ray

        from ..remote.server.sessions import ServerFull, new_session_id

        share = self._check_admission(header)
        (blob,) = await reader.parts()
        if self._actor_class is None:
            self._actor_class = session_actor_class()
        session_id = new_session_id()
        actor = self._actor_class.options(
            name=actor_name(session_id), namespace=NAMESPACE, lifetime="detached", max_restarts=0,
            num_gpus=share, num_cpus=0, memory=self.config.max_session_mb * 2**20,
            runtime_env={"env_vars": dict(self.options.env)} if self.options.env else None,
        ).remote(self.config, session_id)  # fmt: skip
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                self._method(actor, "open").remote(header, bytes(blob)), self.options.start_timeout_seconds
            )
        except asyncio.TimeoutError:
            ray.kill(actor)
            raise ServerFull(
                f"The server is full: no GPU share came free in {self.options.start_timeout_seconds:.0f} s; "
                "try again later."
            ) from None
        except ray.exceptions.RayActorError:
            raise ServerFull("The session's worker could not start on the cluster; try again later.") from None
        if isinstance(reply, Failure):
            ray.kill(actor)
            raise ForwardedError(reply)
        self._method(actor, "watch").remote()  # the actor's idle timer: it ends itself
        self._handles[session_id] = actor
        worker = reply.pop("worker", {})
        log.info("session %s started in %.1f s on node %s (pid %s, GPUs %s)", session_id[:6],
                 time.monotonic() - started, str(worker.get("node", "?"))[:8], worker.get("pid"),
                 ",".join(worker.get("gpus", [])) or "none")  # fmt: skip
        return reply

    def _method(self, actor, name: str):
        return getattr(actor, name).options(concurrency_group=METHOD_GROUPS[name])

    def _actor(self, session_id: str):
        import ray

        from ..remote.server.sessions import SessionGone

        handle = self._handles.get(session_id)
        if handle is None:  # created by another replica, or before this one restarted
            try:
                handle = ray.get_actor(actor_name(session_id), namespace=NAMESPACE)
            except ValueError:
                raise SessionGone(
                    "This session is not on the server (it expired or was closed); upload again."
                ) from None
            self._handles[session_id] = handle
        return handle

    async def _ask(self, session_id: str, method: str, *args):
        import ray

        from ..remote.server.operations import SessionLost
        from ..remote.server.sessions import SessionGone

        actor = self._actor(session_id)
        try:
            reply = await self._method(actor, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            self._handles.pop(session_id, None)
            if "INTENDED_USER_EXIT" in str(exc):  # it ended itself: idle past its time to live, or closed
                raise SessionGone("This session expired on the server; upload again.") from None
            log.warning("session %s lost: its actor died", session_id[:6])
            raise SessionLost(
                "The server lost this session (its worker stopped: a lost node or out of memory); upload again."
            ) from None
        if isinstance(reply, Failure):
            raise ForwardedError(reply)
        return reply

    async def close(self, session_id: str) -> bool:
        from ..remote.server.sessions import SessionGone

        try:
            actor = self._actor(session_id)
        except SessionGone:
            return False
        self._handles.pop(session_id, None)
        try:
            await self._method(actor, "close").remote()
        except Exception:  # noqa: BLE001 - exit_actor ends the call with the actor: that is the point
            pass
        log.info("session %s closed by its client", session_id[:6])
        return True

    async def call(self, session_id: str, body: bytes, codec: str) -> bytes:
        return await self._ask(session_id, "call", body, codec)

    async def encode(self, session_id: str, body: bytes) -> dict:
        return await self._ask(session_id, "encode", body)

    async def start_job(self, session_id: str, body: bytes) -> dict:
        return await self._ask(session_id, "start_job", body)

    async def job_state(self, session_id: str, job_id: str, cancel: bool = False) -> dict:
        return await self._ask(session_id, "job_state", job_id, cancel)


class MedFMFrontEnd:
    """The Serve deployment: its ASGI app is built on each replica (nothing with threads crosses the cluster)."""

    def __init__(self, config, options: RayOptions) -> None:
        self.config, self.options = config, options

    def __serve_build_asgi_app__(self):
        from ..remote.server.app import create_app

        return create_app(self.config, backend=RayBackend(self.config, self.options))


def deploy(config, options: RayOptions, host: str, port: int, tls_cert: str | None = None,
           tls_key: str | None = None) -> None:  # fmt: skip
    """Start Serve's HTTP proxy on host:port and run the front end there (the cluster must be joined)."""
    from ray import serve

    http = {"host": host, "port": port}
    if tls_cert:
        http.update(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    serve.start(http_options=http)
    listening = _serve_port()
    if listening is not None and listening != port:  # Serve runs once per cluster, on the port it started with
        raise MedFMError(
            f"Ray Serve already runs on this cluster on port {listening}; give --port {listening}, or stop the "
            "other Serve application first."
        )
    actor_options = {"num_cpus": 0}
    if options.env:
        actor_options["runtime_env"] = {"env_vars": dict(options.env)}
    front_end = serve.deployment(num_replicas=options.replicas, ray_actor_options=actor_options)(
        serve.ingress()(MedFMFrontEnd)
    )
    serve.run(front_end.bind(config, options), name=APP_NAME, route_prefix="/", blocking=False)


def _serve_port() -> int | None:
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except (ImportError, AttributeError, TypeError, ValueError):  # a private detail of Ray: not checked then
        return None


def undeploy(started_cluster: bool) -> None:
    """Take the front end down; Serve itself too where nothing else runs on it (its port is then free again)."""
    from ray import serve

    if started_cluster:
        return  # the cluster's shutdown ends Serve with every other process (serve.shutdown would only add noise)
    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
        log.warning("could not stop the front end cleanly: %s", str(exc).splitlines()[0] if str(exc) else exc)


def _stop_on_sigterm() -> None:
    """`kill PID` ends the server as Ctrl-C does (after ray.init: Ray's own handler would only print a stack)."""
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)


def serve_on_ray(config, options: RayOptions, host: str = "127.0.0.1", port: int = 8000,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:  # fmt: skip
    """Run until Ctrl-C or SIGTERM; a cluster started here is stopped, leaving no Ray process behind."""
    import_ray()
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise MedFMError("`medfm serve --ray` needs FastAPI; install it with: pip install 'medfm[ray]'") from None
    if bool(tls_cert) != bool(tls_key):
        raise MedFMError("TLS needs both --tls-cert and --tls-key.")
    if not options.env:
        options.env = medfm_environment()
    with ray_cluster(options.address) as cluster:
        _stop_on_sigterm()
        where = f"the Ray cluster at {cluster.address}" if not cluster.started else "a local Ray cluster"
        print(f"medfm serve: starting on {where} ({cluster.gpus:g} GPUs, {cluster.cpus:g} CPUs)", file=sys.stderr,
              flush=True)  # fmt: skip
        try:
            deploy(config, options, host, port, tls_cert, tls_key)
            scheme = "https" if tls_cert else "http"
            print(f"MedFM server on {scheme}://{host}:{port} offering {', '.join(config.models)} "
                  f"(Ray: a session per actor)", file=sys.stderr, flush=True)  # fmt: skip
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("medfm serve: stopping", file=sys.stderr, flush=True)
        finally:
            undeploy(cluster.started)
