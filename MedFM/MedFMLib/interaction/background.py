"""Encoding slices off the GUI thread.

Slicer's GUI must stay responsive while an encoder runs for seconds, and
scrolling to the next slice should find its embedding ready. One worker
thread encodes the planes it is asked for, most urgent first, into the
session's shared, thread-safe cache; an item is a plane, or (plane, crop) for the crop
the small-object zoom wants around a box (zoom.py). It never touches MRML or Qt: the GUI
polls ``is_ready`` / ``failure`` from its own thread (a QTimer) and acts there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from ..imaging.geometry import SlicePlane
from .session import Session


class BackgroundEncoder:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._pending: list[SlicePlane] = []
        self._running: SlicePlane | None = None
        self._failures: dict[SlicePlane, BaseException] = {}
        self._condition = threading.Condition()
        self._stopped = False
        self.encoded = 0
        self._thread = threading.Thread(target=self._work, name="MedFM encoder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- GUI thread
    def request(self, planes: Sequence[SlicePlane]) -> None:
        """Encode these planes, in this order, replacing what was queued before.

        Planes already encoded are skipped. The plane being encoded now runs to
        its end: a network's forward pass cannot be interrupted halfway.
        """
        with self._condition:
            self._pending = [p for p in dict.fromkeys(planes) if not self.is_ready(p)]
            for plane in self._pending:
                self._failures.pop(plane, None)
            self._condition.notify()

    def neighbours(self, plane: SlicePlane, reach: int = 2) -> list[SlicePlane]:
        """The plane, then the planes next to it, nearest first (within the volume)."""
        count = self.session.volume.dimensions[plane.axis]
        planes = [plane]
        for step in range(1, reach + 1):
            for index in (plane.index + step, plane.index - step):
                if 0 <= index < count:
                    planes.append(SlicePlane(plane.axis, index))
        return planes

    def cancel(self) -> None:
        """Drop everything queued (the GUI gets control back at once)."""
        with self._condition:
            self._pending.clear()

    def is_ready(self, plane: SlicePlane | tuple) -> bool:
        return self.session.is_encoded(*plane) if isinstance(plane, tuple) else self.session.is_encoded(plane)

    def is_busy(self) -> bool:
        with self._condition:
            return self._running is not None or bool(self._pending)

    def failure(self, plane: SlicePlane) -> BaseException | None:
        """The error that encoding this plane raised, if it failed."""
        with self._condition:
            return self._failures.get(plane)

    def wait(self, plane: SlicePlane, timeout: float | None = None) -> bool:
        """Block until the plane is encoded or has failed (for scripts and tests, not the GUI)."""
        with self._condition:
            return self._condition.wait_for(
                lambda: self.is_ready(plane) or plane in self._failures or self._stopped, timeout
            )

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._pending.clear()
            self._condition.notify_all()
        self._thread.join(timeout=60)

    # ---------------------------------------------------------- worker thread
    def _work(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._stopped)
                if self._stopped:
                    return
                plane = self._pending.pop(0)
                self._running = plane
            try:
                if not self.is_ready(plane):
                    self.session.embedding(*plane) if isinstance(plane, tuple) else self.session.embedding(plane)
                    self.encoded += 1
            except BaseException as exc:  # reported to the GUI thread, which shows it
                with self._condition:
                    self._failures[plane] = exc
            finally:
                with self._condition:
                    self._running = None
                    self._condition.notify_all()


class PropagationJob:
    """Runs one propagation on a worker thread; the GUI thread polls ``done``, ``total`` and ``finished``.

    ``work(progress, cancelled)`` computes and returns a
    ``PropagationResult`` without changing the session (``Propagator.run``);
    the GUI thread applies it with ``Session.apply_propagation`` once
    ``finished`` is true, and must not change the session meanwhile.
    """

    def __init__(self, work, executor=None) -> None:
        """``executor``: a shared, bounded pool (a server's) to run on; by default a thread of its own."""
        self.done = 0
        self.total = 0
        self.plane = None
        self.result = None
        self.failure: BaseException | None = None
        #: time.monotonic() when it finished, for servers that forget old results
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._ended = threading.Event()
        if executor is None:
            threading.Thread(target=self._run, args=(work,), name="MedFM-propagation", daemon=True).start()
        else:
            executor.submit(self._run, work)

    def _run(self, work) -> None:
        try:
            self.result = work(self._progress, self._cancel.is_set)
        except BaseException as exc:  # reported to the GUI thread, never raised on this one
            self.failure = exc
        finally:
            self.finished_at = time.monotonic()
            self._ended.set()

    def _progress(self, done: int, total: int, plane) -> None:
        self.done, self.total, self.plane = done, total, plane

    @property
    def finished(self) -> bool:
        return self._ended.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)
