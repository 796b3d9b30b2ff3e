"""Server-side sessions: one per uploaded volume, isolated, bounded in memory, and expiring.

A session holds a :class:`~MedFMLib.session.Session` (the same class the
Slicer module and the CLI use locally) with its own embedding cache, plus
what the server needs around it: a lock, the box of every voxel ever sent to
the client per object (to send only changed regions), propagation results
waiting to be applied, and background propagation jobs.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from ...errors import MedFMError
from ...interaction.background import PropagationJob
from ...interaction.cache import EmbeddingCache
from ...interaction.session import Session

#: propagation results kept per session for ``apply_propagation`` (older ones are dropped)
KEPT_RESULTS = 8


class ServerFull(MedFMError):
    """The server's total memory budget would be exceeded."""


class TooLarge(MedFMError):
    """One session's memory budget would be exceeded."""


class SessionGone(MedFMError):
    """The session expired or never existed (the server restarted, or it was closed)."""


@dataclass
class ServerSession:
    id: str
    session: Session
    model: str
    cache_budget: int
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

    @property
    def nbytes(self) -> int:
        """Memory this session may use: its volume, one mask per object, and its whole cache budget."""
        voxels = self.session.volume.array.size
        return self.session.volume.array.nbytes + voxels * len(self.session.objects) + self.cache_budget

    @property
    def busy(self) -> bool:
        """A propagation job is running: the session is in use even if no request comes."""
        return any(not job.finished for job in self.jobs.values())

    def keep_result(self, result) -> int:
        result_id = self.next_result
        self.next_result += 1
        self.results[result_id] = result
        while len(self.results) > KEPT_RESULTS:
            del self.results[min(self.results)]
        return result_id

    def start_job(self, work) -> str:
        for job_id in [j for j, job in self.jobs.items() if job.finished and job.collected]:
            del self.jobs[job_id]
        job_id = secrets.token_hex(8)
        job = PropagationJob(work)
        job.collected = False
        self.jobs[job_id] = job
        return job_id

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel()
        self.session.cache.clear()


class SessionManager:
    """Creates, finds and expires sessions within per-session and total memory limits."""

    def __init__(self, ttl_seconds: float, max_session_bytes: int, max_total_bytes: int, cache_bytes: int) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self.cache_bytes = cache_bytes
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in list(self._sessions.values()))

    def check_volume(self, volume_bytes: int, voxels: int) -> None:
        """Refuse, before decoding it, a volume this server cannot hold."""
        needed = volume_bytes + voxels + self.cache_bytes  # the volume, a first object's mask, the cache
        if needed > self.max_session_bytes:
            raise TooLarge(
                f"This volume needs {needed / 2**20:.0f} MiB on the server, above its per-session limit "
                f"({self.max_session_bytes / 2**20:.0f} MiB); crop it, or ask for a higher --max-session-mb."
            )
        if self.nbytes + needed > self.max_total_bytes:
            raise ServerFull(
                f"The server is full ({len(self)} sessions, {self.nbytes / 2**20:.0f} of "
                f"{self.max_total_bytes / 2**20:.0f} MiB); try again later, or close other sessions."
            )

    def create(self, session_factory, model: str) -> ServerSession:
        session = session_factory(EmbeddingCache(self.cache_bytes))
        served = ServerSession(secrets.token_urlsafe(18), session, model, self.cache_bytes)
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

    def close(self, session_id: str) -> bool:
        with self._lock:
            served = self._sessions.pop(session_id, None)
        if served is not None:
            served.close()
        return served is not None

    def expire(self) -> list[str]:
        """Close sessions idle longer than the time to live (a running job counts as use)."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for session_id, served in list(self._sessions.items()):
                if served.busy:
                    served.last_used = now
                elif now - served.last_used > self.ttl_seconds:
                    expired.append(self._sessions.pop(session_id))
        for served in expired:
            served.close()
        return [served.id for served in expired]

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for served in sessions:
            served.close()
