"""One queue for a server's GPU work, shared by every session.

Sessions run on the web server's worker threads, but the model runs on one
thread only: users' encodes, decodes and tracking steps wait their turn
instead of fighting over GPU memory. Encodes of same-sized slices that wait
together are run as one batch through the image encoder.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ...engines.base import Embedding, Prediction, Prompts2D


@dataclass
class _Task:
    engine: object
    kind: str  # "encode" or "call"
    future: Future = field(default_factory=Future)
    image: np.ndarray | None = None
    function: object = None


@dataclass
class QueueStats:
    tasks: int = 0
    batches: int = 0
    batched_encodes: int = 0
    largest_batch: int = 0


class GpuQueue:
    """A worker thread that runs model work in arrival order, batching waiting encodes."""

    def __init__(self, max_batch: int = 4) -> None:
        self.max_batch = max(1, max_batch)
        self.stats = QueueStats()
        self._tasks: deque[_Task] = deque()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="MedFM GPU queue", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._tasks)

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def encode(self, engine, image: np.ndarray) -> Embedding:
        return self._submit(_Task(engine, "encode", image=image))

    def call(self, engine, function):
        """Run ``function()`` on the worker (a decode, one tracking step); its result or exception comes back."""
        return self._submit(_Task(engine, "call", function=function))

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()

    def _submit(self, task: _Task):
        if self.on_worker():  # already on the worker: a tracking step that encodes a frame it needs
            return self._run_encodes([task])[0] if task.kind == "encode" else task.function()
        with self._condition:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._tasks.append(task)
            self._condition.notify()
        return task.future.result()

    def _take(self) -> list[_Task]:
        """The next task; with it, every waiting encode of the same engine and image shape (a batch)."""
        first = self._tasks.popleft()
        if first.kind != "encode":
            return [first]
        batch = [first]
        for task in list(self._tasks):
            if len(batch) >= self.max_batch:
                break
            if task.kind == "encode" and task.engine is first.engine and task.image.shape == first.image.shape:
                self._tasks.remove(task)
                batch.append(task)
        return batch

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._tasks and not self._stopped:
                    self._condition.wait()
                if self._stopped and not self._tasks:
                    return
                batch = self._take()
            self.stats.tasks += len(batch)
            if batch[0].kind == "call":
                task = batch[0]
                try:
                    task.future.set_result(task.function())
                except BaseException as exc:  # noqa: BLE001 - handed back to the waiting request
                    task.future.set_exception(exc)
                continue
            try:
                embeddings = self._run_encodes(batch)
            except BaseException as exc:  # noqa: BLE001
                for task in batch:
                    task.future.set_exception(exc)
                continue
            for task, embedding in zip(batch, embeddings):
                task.future.set_result(embedding)

    def _run_encodes(self, batch: list[_Task]) -> list[Embedding]:
        if len(batch) > 1:
            self.stats.batches += 1
            self.stats.batched_encodes += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return batch[0].engine.encode_batch([task.image for task in batch])


class QueuedEngine:
    """An engine whose model work goes through a GpuQueue; everything else is the engine's own.

    Sessions take it where they take an engine. Prompt checks and properties
    stay on the caller's thread; encodes, decodes and tracking steps queue.
    """

    def __init__(self, engine, queue: GpuQueue) -> None:
        self.engine = engine
        self.queue = queue

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def encode(self, image: np.ndarray) -> Embedding:
        return self.queue.encode(self.engine, image)

    def encode_batch(self, images: list[np.ndarray]) -> list[Embedding]:
        return [self.encode(image) for image in images]

    def decode(self, embedding: Embedding, prompts: Prompts2D, previous_logits: np.ndarray | None = None) -> Prediction:
        return self.queue.call(self.engine, lambda: self.engine.decode(embedding, prompts, previous_logits))

    def track(self, frames, *args, **kwargs):
        """SAM 2 tracking, one queued step per slice, so other users' clicks get in between slices."""
        steps = self.engine.track(frames, *args, **kwargs)
        finished = object()
        while True:
            result = self.queue.call(self.engine, lambda: next(steps, finished))
            if result is finished:
                return
            yield result
