"""Streaming downloads that resume, report progress, verify SHA-256 and never leave a half file.

Only the HTTP request itself is sent: no telemetry, no extra headers beyond
what resuming needs. The file grows as ``NAME.part`` beside its destination and
is renamed into place atomically once its checksum matches. A lock file keeps
two processes from downloading the same model at once: the second waits, then
finds the verified file.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import ModelError

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int | None
    bytes_per_second: float


ProgressCallback = Callable[[Progress], None]


class DownloadError(ModelError):
    """A download failed; the message says why and what to do."""


def sha256_of(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path, timeout_seconds: float = 3600.0):
    """An exclusive lock held through an OS file lock (released even if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")
    deadline = time.monotonic() + timeout_seconds
    try:
        while True:
            try:
                if os.name == "nt":
                    import msvcrt

                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"Another MedFM process has held {path.name} for too long; retry later."
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        if os.name != "nt":
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _explain(url: str, exc: BaseException) -> str:
    host = urllib.request.urlparse(url).netloc
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 404:
            return (
                f"{url} was not found (HTTP 404); the catalog entry may be outdated: update MedFM or import the file."
            )
        return f"the server {host} answered HTTP {exc.code} {exc.reason}; try again later or import the file."
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve {host}: this computer seems to be offline; connect, or import the file."
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection: the server is down or the address is wrong; retry later."
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"{host} did not answer in time; check the network and retry (the download resumes)."
    return f"cannot reach {host} ({reason}); check the network and retry (the download resumes)."


def download(
    url: str,
    destination: Path,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = TIMEOUT_SECONDS,
    lock: bool = True,
) -> Path:
    """Download ``url`` to ``destination``, resuming a partial file, and verify it.

    With ``sha256`` the file is checked before it is put in place, and deleted
    on a mismatch. Returns the destination path. ``lock=False``: the caller
    already holds ``destination``'s lock (the model store does).
    """
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".part")
    with file_lock(destination.with_name(destination.name + ".lock")) if lock else nullcontext():
        if destination.exists():
            return destination  # another process finished it while we waited
        try:
            _fetch(url, partial, expected_size, progress, timeout)
        except http.client.HTTPException as exc:
            raise DownloadError(
                f"Download failed: the connection broke ({type(exc).__name__}); retry (the download resumes)."
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"The disk holding {partial.parent} is full; free space or set MEDFM_HOME to another disk, "
                    "then retry (the download resumes)."
                ) from None
            if isinstance(exc, urllib.error.URLError) or isinstance(exc, (socket.timeout, ConnectionError)):
                raise DownloadError(f"Download failed: {_explain(url, exc)}") from None
            raise DownloadError(f"Download failed: {exc}; retry (the download resumes).") from None
        if expected_size is not None and partial.stat().st_size != expected_size:
            size = partial.stat().st_size
            partial.unlink()
            raise DownloadError(
                f"Downloaded {size} bytes from {url}, but the catalog says {expected_size}; the file was deleted. "
                "Retry; if it persists, the catalog entry is outdated."
            )
        if sha256 is not None:
            actual = sha256_of(partial)
            if actual != sha256.lower():
                partial.unlink()
                raise DownloadError(
                    f"Checksum mismatch for {destination.name} (got {actual[:12]}…, expected {sha256[:12]}…); "
                    "the damaged file was deleted. Retry the download; if it persists, report it."
                )
        os.replace(partial, destination)
    return destination


def _fetch(url: str, partial: Path, expected_size: int | None, progress: ProgressCallback | None, timeout: float):
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have >= expected_size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": f"MedFM/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: what we have is the whole file
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected_size
        started, done = time.monotonic(), have
        with open(partial, "ab" if have else "wb") as handle:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                done += len(chunk)
                if progress is not None:
                    elapsed = max(time.monotonic() - started, 1e-6)
                    progress(Progress(done, total, (done - have) / elapsed))
        if total is not None and done < total:
            raise urllib.error.URLError(f"the connection closed after {done} of {total} bytes")
