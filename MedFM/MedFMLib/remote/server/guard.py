"""What stands between the network and the server's routes: connections, request heads, logs.

- A connection must send a complete request head within ``HEADER_SECONDS`` of opening (or of sending the
  first byte of its next request); idle keep-alive connections close after ``KEEP_ALIVE_SECONDS``.
- At most ``MAX_WAITING`` connections may wait for their request head at once: a new one closes the
  oldest waiting one, so connections that dribble or say nothing cannot crowd out real clients, whose
  heads arrive in milliseconds. All connections together stay below the process's file limit.
- Logs never flood: a message repeated within ``LOG_INTERVAL_SECONDS`` is counted, not written.
- Session ids are shortened wherever a request path is logged.

Built on uvicorn's own HTTP/1.1 protocol class; only the timing and the counting are added.
"""

from __future__ import annotations

import logging
import re
import resource
import time
from collections import OrderedDict

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5.0
MAX_WAITING = 64
#: file descriptors kept free for the models, logs and the sessions' own files
SPARE_FILES = 64
LOG_INTERVAL_SECONDS = 10.0

log = logging.getLogger("medfm.server")
_SESSION_ID = re.compile(r"(/v1/sessions/)([A-Za-z0-9_-]{6})[A-Za-z0-9_-]+")


def short_path(path: str) -> str:
    """A request path with its session id cut to 6 characters (the whole id grants access to the session)."""
    return _SESSION_ID.sub(r"\1\2…", path)


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the connections it can afford."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(16, min(soft, 65536) - SPARE_FILES)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on request heads and caps on waiting and open connections."""

    header_seconds = HEADER_SECONDS
    max_waiting = MAX_WAITING
    max_connections = 1024
    #: connections waiting for a complete request head, oldest first (one event loop: no lock needed)
    waiting: OrderedDict = OrderedDict()
    dropped = {"slow": 0, "crowded": 0, "over limit": 0}

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        if len(self.connections) > self.max_connections:
            self._drop("over limit")
            return
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._wait_for_head()  # bytes of a request head, not all of it yet
        else:
            self._stop_waiting()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_seconds, self._drop, "slow")
        type(self).waiting[self] = None
        while len(type(self).waiting) > self.max_waiting:
            oldest = next(iter(type(self).waiting))
            oldest._drop("crowded")

    def _stop_waiting(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None
        type(self).waiting.pop(self, None)

    def _drop(self, why: str) -> None:
        self._stop_waiting()
        type(self).dropped[why] += 1
        log.warning("dropped connections that sent no complete request in time, or too many at once (%s)", why)
        if not self.transport.is_closing():
            self.transport.close()


class OncePerInterval(logging.Filter):
    """Lets a message through once per interval; repeats are counted and reported with the next one let through."""

    def __init__(self, interval_seconds: float = LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.interval = interval_seconds
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True  # the audit trail and request lines are not troubles
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        repeats = self._suppressed.pop(key, 0)
        if repeats:
            record.msg = f"{record.msg} ({repeats} more like it in the last {self.interval:.0f} s)"
        if record.exc_info and repeats:
            record.exc_info = None  # the first one had the traceback
        return True


def log_config() -> dict:
    """uvicorn's logging: one stderr handler, rate-limited, for uvicorn, asyncio and MedFM's own audit trail."""
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "plain",
        "filters": ["once_per_interval"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"once_per_interval": {"()": OncePerInterval}},
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": handler},
        "loggers": {
            name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "asyncio", "medfm")
        },
    }
