"""One interactive session on a Ray cluster: a named, detached actor holding everything the session is.

The actor holds the volume, the embedding cache, the masks and the undo history, through the same
:class:`~MedFMLib.remote.server.operations.LocalSessions` the plain server uses, with one session in it.
It takes a share of a GPU, so Ray places it where a share is free and ``CUDA_VISIBLE_DEVICES`` names
that GPU; the model is loaded once in the actor's process.

Why detached: a session must outlive the front-end replica that created it (a replica may restart or
scale down). Detached actors are never collected, so the actor ends itself after its time to live
idle, and at once on DELETE. ``max_restarts=0``: a restart would only rerun ``__init__``, an empty
session; the front end answers 410 instead and the client uploads again and replays its journal.

Calls run in the "compute" group, one at a time, as one session's calls must; progress polls, the
idle watch and DELETE run in "io", so they are never blocked by a running propagation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace

log = logging.getLogger("medfm.server")

#: an actor's name holds a hash of the session id, never the id itself (the id is the session's key)
ACTOR_PREFIX = "medfm-session-"
CONCURRENCY_GROUPS = {"io": 4, "compute": 1}


def actor_name(session_id: str) -> str:
    return ACTOR_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Failure:
    """An error crossing back to the front end as plain data: (HTTP status, kind, one line)."""

    status: int
    kind: str
    message: str


def _failure(exc: BaseException) -> Failure:
    from ..remote.server.operations import error_reply

    reply = error_reply(exc)
    if reply is None:
        log.error("internal error in a session actor: %s", type(exc).__name__, exc_info=exc)
        reply = (500, "InternalError", "The server failed on this request; its log has the details.")
    return Failure(*reply)


class SessionActor:
    """A Ray actor class (made one by :func:`session_actor_class`): one session, its model and its lifetime."""

    def __init__(self, config, session_id: str) -> None:
        from ..remote.server.gpu_queue import GpuQueue
        from ..remote.server.operations import LocalSessions, ModelRegistry
        from ..remote.server.sessions import SessionManager

        # Ray sets OMP_NUM_THREADS=1 in an actor that takes no CPU: torch (not imported yet) would then run a
        # CPU model on one thread, slower than the plain server and with sums in another order.
        os.environ.pop("OMP_NUM_THREADS", None)
        # The token stays with the front end; the session's own limits bound this actor.
        self.config = replace(config, token="")
        self.session_id = session_id
        self.queue = GpuQueue(config.max_batch)
        self.registry = ModelRegistry(self.config, self.queue)
        session_bytes = config.max_session_mb * 2**20
        self.manager = SessionManager(config.session_ttl_seconds, session_bytes, session_bytes,
                                      config.cache_mb * 2**20, max_jobs=1)  # fmt: skip
        self.sessions = LocalSessions(self.config, self.registry, self.manager)
        self.opened = threading.Event()

    def _guarded(self, work):
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
            return _failure(exc)

    # ------------------------------------------------------------ compute
    def open(self, header: dict, blob: bytes) -> dict | Failure:
        """Load the model and the volume; the session then exists."""
        from ..remote.server.operations import upload_plan

        def work():
            spec, meta_checked, volume_bytes, voxels = upload_plan(header)
            with self.manager.admission(volume_bytes, voxels):
                engine = self.registry.engine(spec.model)
                reply = self.sessions.create_session(spec, meta_checked, blob, engine, self.session_id)
            self.opened.set()
            return dict(reply, worker=self.worker())

        return self._guarded(work)

    def call(self, body: bytes, codec: str) -> bytes | Failure:
        return self._guarded(lambda: self.sessions.call(self.session_id, body, codec))

    def encode(self, body: bytes) -> dict | Failure:
        return self._guarded(lambda: self.sessions.encode(self.session_id, body))

    def start_job(self, body: bytes) -> dict | Failure:
        return self._guarded(lambda: self.sessions.start_job(self.session_id, body))

    # ------------------------------------------------------------ io
    def job_state(self, job_id: str, cancel: bool = False) -> dict | Failure:
        return self._guarded(lambda: self.sessions.job_state(self.session_id, job_id, cancel))

    def worker(self) -> dict:
        """Where this session runs: its process, node and GPUs (for the log, the tests and the benchmark)."""
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node": context.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def close(self) -> bool:
        """End the session and this actor now (DELETE)."""
        import ray

        self.manager.close_all()
        self.queue.stop()
        ray.actor.exit_actor()
        return True  # not reached: exit_actor ends the process

    def watch(self) -> None:
        """Runs for the actor's life: after the time to live idle (a running job counts as use), end the actor."""
        import ray

        interval = max(0.2, min(30.0, self.config.session_ttl_seconds / 4))
        self.opened.wait()
        while True:
            time.sleep(interval)
            self.manager.expire()
            if len(self.manager) == 0:
                log.info("session actor ended after %.0f s idle", self.config.session_ttl_seconds)
                self.queue.stop()
                ray.actor.exit_actor()


def session_actor_class():
    """The Ray actor class, with its concurrency groups (Ray imported only here)."""
    from .cluster import import_ray

    return import_ray().remote(concurrency_groups=CONCURRENCY_GROUPS)(SessionActor)


#: methods and the group each runs in
METHOD_GROUPS = {
    "open": "compute", "call": "compute", "encode": "compute", "start_job": "compute",
    "job_state": "io", "worker": "io", "close": "io", "watch": "io",
}  # fmt: skip
