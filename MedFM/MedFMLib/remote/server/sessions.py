"""Server-side sessions: one per uploaded volume, isolated, bounded in memory, and expiring.

A session holds a :class:`~MedFMLib.interaction.session.Session` (the same
class the Slicer module and the CLI use locally) with its own embedding cache,
plus what the server needs around it: a lock, the box of every voxel ever sent
to the client per object (to send only changed regions), propagation results
waiting to be applied, and its propagation job.

Memory is counted as it is used: each session's volume, one mask per object,
its slice states and undo history, and what its cache holds now. Admission
checks and reserves in one step, under one lock, so concurrent uploads cannot
together pass a limit each alone would pass. Caches share what is left: a
cache grows only into free memory and otherwise evicts its own oldest entries.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from ...errors import MedFMError
from ...interaction.background import PropagationJob
from ...interaction.cache import EmbeddingCache
from ...interaction.session import Session
from ...interaction.volume_session import VolumeSession

#: propagation results kept per session for ``apply_propagation`` (older ones are dropped)
KEPT_RESULTS = 8
#: a finished job nobody collected is forgotten after this many seconds
FINISHED_JOB_SECONDS = 300.0
#: a new session must have room for its volume, a first mask and this much cache
MIN_CACHE_BYTES = 64 * 2**20


def new_session_id() -> str:
    """A session's id: it is also its key, so it is long and random."""
    return secrets.token_urlsafe(18)


def needed_bytes(volume_bytes: int, voxels: int, cache_bytes: int, max_session_bytes: int) -> int:
    """What a new session needs at least (the volume, a first object's mask, a little cache), within its limit."""
    needed = volume_bytes + voxels + min(cache_bytes, MIN_CACHE_BYTES)
    if needed > max_session_bytes:
        raise TooLarge(
            f"This volume needs {needed / 2**20:.0f} MiB on the server, above its per-session limit "
            f"({max_session_bytes / 2**20:.0f} MiB); crop it, or ask for a higher --max-session-mb."
        )
    return needed


class ServerFull(MedFMError):
    """The server's total memory budget would be exceeded."""


class TooLarge(MedFMError):
    """One session's memory budget would be exceeded."""


class SessionGone(MedFMError):
    """The session expired or never existed (the server restarted, or it was closed)."""


class LimitReached(MedFMError):
    """A per-session count (objects, prompts) or a running job would exceed the server's limits."""


@dataclass
class ServerSession:
    id: str
    session: Session | VolumeSession
    model: str
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: per object: array slices around every voxel ever set (what the client may hold)
    extents: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    jobs: dict = field(default_factory=dict)
    #: the last call's sequence number and reply: a retried request gets the reply again, not a second action
    last_sequence: int | None = None
    last_reply: bytes | None = None
    next_result: int = 1
    #: slice states and undo history, measured after each change (``Session.state_nbytes``)
    state_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Memory this session uses: its volume, one mask per object, its slice states and history, its cache."""
        volume = self.session.volume.array
        masks = volume.size * len(self.session.objects)
        cache = getattr(self.session, "cache", None)  # a 3D model's session has no slice embeddings
        return volume.nbytes + masks + self.state_bytes + (cache.nbytes if cache is not None else 0)

    @property
    def busy(self) -> bool:
        """A propagation job is queued or running: the session is in use even if no request comes."""
        return any(not job.finished for job in self.jobs.values())

    def keep_result(self, result) -> int:
        result_id = self.next_result
        self.next_result += 1
        self.results[result_id] = result
        while len(self.results) > KEPT_RESULTS:
            del self.results[min(self.results)]
        return result_id

    def start_job(self, work, executor) -> str:
        """Run ``work`` on the shared pool, holding this session's lock: calls wait for it, never overlap it."""
        if self.busy:
            raise LimitReached("A propagation is already running on this session; wait for it, or cancel it.")
        self.prune_jobs()
        job_id = secrets.token_hex(8)

        def locked(progress, cancelled):
            with self.lock:
                return work(progress, cancelled)

        job = PropagationJob(locked, executor)
        job.collected = False
        self.jobs[job_id] = job
        return job_id

    def prune_jobs(self, now: float | None = None) -> None:
        """Forget collected jobs, and finished ones nobody collected in time."""
        now = time.monotonic() if now is None else now
        for job_id, job in list(self.jobs.items()):
            if job.finished and (job.collected or now - job.finished_at > FINISHED_JOB_SECONDS):
                del self.jobs[job_id]

    def measure(self) -> None:
        self.state_bytes = self.session.state_nbytes()

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel()
        if hasattr(self.session, "cache"):
            self.session.cache.clear()
        if hasattr(self.session, "close"):
            self.session.close()


class SessionManager:
    """Creates, finds and expires sessions within per-session and total memory limits."""

    def __init__(
        self, ttl_seconds: float, max_session_bytes: int, max_total_bytes: int, cache_bytes: int, max_jobs: int = 2
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self.cache_bytes = cache_bytes
        self._sessions: dict[str, ServerSession] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        #: every session's propagation jobs share these threads
        self.jobs = ThreadPoolExecutor(max_workers=max(1, max_jobs), thread_name_prefix="MedFM-job")

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        """Memory in use by all sessions, plus what admissions in progress have reserved."""
        return sum(s.nbytes for s in list(self._sessions.values())) + self._reserved

    def free_bytes(self) -> int:
        return self.max_total_bytes - self.nbytes

    def needed_bytes(self, volume_bytes: int, voxels: int) -> int:
        return needed_bytes(volume_bytes, voxels, self.cache_bytes, self.max_session_bytes)

    @contextmanager
    def admission(self, volume_bytes: int, voxels: int):
        """Check and reserve room for a new session in one step; the reservation ends with the block."""
        needed = self.needed_bytes(volume_bytes, voxels)
        with self._lock:
            if self.nbytes + needed > self.max_total_bytes:
                raise ServerFull(
                    f"The server is full ({len(self)} sessions, {self.nbytes / 2**20:.0f} of "
                    f"{self.max_total_bytes / 2**20:.0f} MiB in use); try again later, or close other sessions."
                )
            self._reserved += needed
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= needed

    def create(self, session_factory, model: str, session_id: str | None = None) -> ServerSession:
        """A new session (within an ``admission`` block): its cache grows only into the server's free memory."""
        cache = EmbeddingCache(self.cache_bytes, headroom=self.free_bytes)
        served = ServerSession(session_id or new_session_id(), session_factory(cache), model)
        served.measure()
        with self._lock:
            self._sessions[served.id] = served
        return served

    def get(self, session_id: str) -> ServerSession:
        """The session, unless idle past its time to live (the sweeper closes the others)."""
        served = self._sessions.get(session_id)
        if served is not None and not served.busy and time.monotonic() - served.last_used > self.ttl_seconds:
            self.close(session_id)
            served = None
        if served is None:
            raise SessionGone("This session is not on the server (it expired or the server restarted); upload again.")
        served.last_used = time.monotonic()
        return served

    def check_object_budget(self, served: ServerSession) -> None:
        voxels = served.session.volume.array.size
        if served.nbytes + voxels > self.max_session_bytes:
            raise TooLarge(
                f"Another object would take this session above its {self.max_session_bytes / 2**20:.0f} MiB limit; "
                "apply or remove objects first."
            )
        if self.nbytes + voxels > self.max_total_bytes:
            raise ServerFull("The server is full; apply or remove objects, or try again later.")

    def settle(self, served: ServerSession) -> None:
        """After a change: count the session's states again; past its limit, forget its oldest undo steps."""
        served.measure()
        while served.nbytes > self.max_session_bytes and served.session.drop_oldest_undo():
            served.measure()

    def close(self, session_id: str) -> ServerSession | None:
        with self._lock:
            served = self._sessions.pop(session_id, None)
        if served is not None:
            served.close()
        return served

    def expire(self) -> list[ServerSession]:
        """Close sessions idle longer than the time to live (a running job counts as use); forget old jobs."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for session_id, served in list(self._sessions.items()):
                if served.busy:
                    served.last_used = now
                elif now - served.last_used > self.ttl_seconds:
                    expired.append(self._sessions.pop(session_id))
                else:
                    served.prune_jobs(now)
        for served in expired:
            served.close()
        return expired

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for served in sessions:
            served.close()
        self.jobs.shutdown(wait=False, cancel_futures=True)
