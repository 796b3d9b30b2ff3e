"""Fine-tuning jobs on the server: ``POST /v1/finetune``, ``GET`` and ``DELETE /v1/finetune/{job}``.

A client uploads labelled cases in one frame (the volume upload's encoding: a JSON header, then each case's
image and label map as compressed arrays) with the base model, the new model's name and the settings. The
header is checked before any voxel is read: the base must be a SAM-family model this server offers, the name
new, each label map of its image's shape, and there must be two cases at least. The cases are then written to
a work folder of the job's own under the server's home (readable by the server's user only) and the job waits
for the one fine-tuning worker: jobs run one at a time, beside the interactive sessions.

The job trains with :func:`MedFMLib.training.run.finetune` and registers the model in the server's store with
its model card (counts and figures only, no case names: the cases reach the server unnamed). The work folder,
the uploaded cases and their embeddings with it, is deleted when the job ends, however it ends; a server that
was killed removes what its jobs left at its next start. With ``--publish-finetunes`` a finished job's model
is offered to every user at once; without it, it is saved but not served, and the job's status says how the
administrator can publish it.

The server has one token and no per-user identity: a job is reached through its id, which is random and
known to the client that created it only, like a session's.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ...errors import MedFMError, ModelError, ProtocolError, VolumeError
from ...imaging.volume import Volume
from ...training.embeddings import MemoryCase
from ...training.run import finetune, split_cases
from ...training.trainer import FinetuneConfig
from ..protocol import declared_bytes, decode_array
from .schemas import FinetuneHeader
from .sessions import LimitReached, SessionGone
from .upload import UploadReader

log = logging.getLogger("medfm.server")

FINETUNE_PATH = "/v1/finetune"
#: the jobs' work folders, under the server's home: one folder per server process, one per job in it
JOBS_FOLDER = "finetune-jobs"
#: jobs waiting for the worker, all clients together
MAX_QUEUED = 8
#: finished jobs whose status is kept (for their clients to read), and for how long at most
MAX_FINISHED = 64
LABEL_DTYPES = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32"})
FINISHED = ("done", "failed", "stopped")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_JOB_PATH = re.compile(r"(/v1/finetune/)([A-Za-z0-9_-]{6})[A-Za-z0-9_-]+")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)$")


class JobGone(SessionGone):
    """The fine-tuning job is not on the server (it never existed, ended long ago, or the server restarted)."""


def short_job_path(path: str) -> str:
    """A request path with its fine-tuning job id cut to 6 characters, for the log."""
    return _JOB_PATH.sub(r"\1\2…", path)


@dataclass
class FinetuneJob:
    id: str
    base: str
    name: str
    settings: object  # FinetuneSettings
    folder: Path
    matrices: list
    split: tuple[int, int]
    status: str = "queued"
    phase: str = ""
    done: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    val_dice: float | None = None
    history: list = field(default_factory=list)
    note: str | None = None
    error: dict | None = None
    card: dict | None = None
    published: bool | None = None
    message: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: float = field(default_factory=time.monotonic)
    ended: float | None = None
    _embedded_sets: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def report(self, phase: str, done: int, total: int, info: dict) -> None:
        """The fine-tuning run's progress callback: the status follows the phase."""
        with self.lock:
            if phase == "note":
                self.note = str(info.get("note"))
                return
            self.phase, self.done, self.total = phase, int(done), int(total)
            epoch = _EPOCH.match(phase)
            if phase == "embedding":
                self.status = "embedding"
                if total and done >= total:
                    self._embedded_sets += 1
                    if self._embedded_sets >= 2:  # both sets embedded: the validation Dice before training
                        self.status = "evaluating"
            elif epoch is not None:
                self.epoch = int(epoch.group(1))
                if "val_dice" in info:  # the epoch's record, after its validation
                    self.history.append(dict(info))
                    self.loss, self.val_dice = info.get("loss"), info.get("val_dice")
                    self.status = "training" if self.epoch < int(epoch.group(2)) else "evaluating"
                else:
                    self.loss = info.get("loss")
                    self.status = "evaluating" if total and done >= total else "training"

    def state(self, position: int | None = None) -> dict:
        with self.lock:
            return {
                "job": self.id,
                "status": self.status,
                "finished": self.finished,
                "base": self.base,
                "name": self.name,
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "epoch": self.epoch,
                "epochs": self.settings.epochs,
                "loss": self.loss,
                "val_dice": self.val_dice,
                "history": [dict(record) for record in self.history],
                "cases": {"training": self.split[0], "validation": self.split[1]},
                "queue_position": position,
                "stop_requested": self.stop.is_set(),
                "note": self.note,
                "error": self.error,
                "card": self.card,
                "published": self.published,
                "message": self.message,
            }

    def end(self, status: str, message: str | None = None, error: dict | None = None) -> None:
        with self.lock:
            self.status, self.message, self.error, self.ended = status, message, error, time.monotonic()


@dataclass
class _Named:
    name: str


class FinetuneJobs:
    """The server's fine-tuning jobs and the one worker thread that runs them, oldest first."""

    def __init__(self, config, registry) -> None:
        self.config = config
        self.registry = registry
        self.store = registry.store
        self.root = Path(self.store.home) / JOBS_FOLDER / f"server-{os.getpid()}"
        self._jobs: dict[str, FinetuneJob] = {}
        self._queue: deque[FinetuneJob] = deque()
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        self._running: FinetuneJob | None = None
        self._closed = False
        remove_leftovers(self.root.parent)

    # ------------------------------------------------------------ checks
    def check(self, header: dict) -> FinetuneHeader:
        """The job's header, checked before any voxel is read: one clear line for what is wrong."""
        spec = FinetuneHeader.model_validate(header)
        count = len(spec.cases)
        if count < 2:
            raise VolumeError(f"Fine-tuning needs at least 2 cases (one to train on, one to validate); this job "
                              f"has {count}.")  # fmt: skip
        if len(spec.parts) != 2 * count:
            raise ProtocolError("A fine-tuning upload has two parts per case: the image, then its label map.")
        self._check_base(spec.base)
        box_only = tuple(self.store.info(spec.base).prompts) == ("box",)
        settings = spec.config
        try:
            self._finetune_config(settings).check(box_only)
        except MedFMError as exc:
            raise ProtocolError(str(exc).replace("--prompts", "prompts")) from None
        self._check_name(spec.name)
        limit, total = self.config.max_session_mb * 2**20, 0
        for number, case in enumerate(spec.cases, 1):
            image, labels = case.image, case.labels
            if image.get("dtype") == "bool":
                raise VolumeError(f"Case {number}: the image must hold numbers, not booleans.")
            if labels.get("dtype") not in LABEL_DTYPES:
                raise VolumeError(f"Case {number}: a label map holds integers ({', '.join(sorted(LABEL_DTYPES))}), "
                                  f"not {labels.get('dtype')!r}.")  # fmt: skip
            shape = image.get("shape")
            if not isinstance(shape, list) or len(shape) != 3:
                raise VolumeError(f"Case {number}: the image must be a 3D array (K, J, I).")
            if labels.get("shape") != shape:
                raise VolumeError(f"Case {number}: the label map's shape {labels.get('shape')} is not the image's "
                                  f"{shape}; give each case a label map of its image's shape (K, J, I).")  # fmt: skip
            image_bytes = declared_bytes(image.get("dtype"), shape)
            declared_bytes(labels.get("dtype"), shape)
            if image_bytes > limit:
                raise VolumeError(f"Case {number}: the image ({image_bytes / 2**20:.1f} MiB) is larger than the "
                                  f"{limit / 2**20:.0f} MiB this server takes per volume.")  # fmt: skip
            total += image_bytes + 4 * math.prod(shape)
        if total > self.config.max_total_mb * 2**20:
            raise VolumeError(f"The cases hold {total / 2**20:.0f} MiB, more than the {self.config.max_total_mb} MiB "
                              "this server takes in one job; send fewer or smaller cases.")  # fmt: skip
        return spec

    def _check_base(self, base: str) -> None:
        offered = self.config.models
        if base not in offered:
            raise ModelError(f"This server does not offer '{base}'; it fine-tunes one of the models it offers: "
                             f"{', '.join(offered)}.")  # fmt: skip
        if self.store.info(base).engine not in ("sam", "sam2"):
            raise ModelError(f"'{base}' is not a SAM-family model: fine-tuning takes SAM, MedSAM, LiteMedSAM, "
                             "MobileSAM, SAM 2 or MedSAM2.")  # fmt: skip
        if not self.store.is_ready(base):
            raise ModelError(f"'{base}' is not downloaded on the server; its administrator can run "
                             f"`medfm models download {base}` there.")  # fmt: skip

    def _check_name(self, name: str) -> None:
        if not _SAFE_NAME.match(name) or ".." in name:
            raise ProtocolError(f"'{name}' cannot name a model: use letters, digits and . _ + - (at most 100, "
                                "starting with a letter or digit).")  # fmt: skip
        if name in self.config.models:
            raise ModelError(f"This server already offers a model named '{name}'; choose another name.")
        with self._condition:
            if any(job.name == name and not job.finished for job in self._jobs.values()):
                raise ModelError(f"A fine-tuning job on this server is already making '{name}'; choose another name.")
        self.store.check_new_name(name)

    @staticmethod
    def _finetune_config(settings) -> FinetuneConfig:
        return FinetuneConfig(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                              prompts=tuple(settings.prompts), seed=settings.seed)  # fmt: skip

    # ------------------------------------------------------------ jobs
    def create(self, spec: FinetuneHeader, blobs: list) -> dict:
        """Decode and check the cases, write them to the job's folder, and queue the job."""
        job_id = secrets.token_urlsafe(16)
        folder = self.root / job_id
        try:
            (folder / "cases").mkdir(parents=True)
            os.chmod(self.root, 0o700)
            matrices = []
            for number, case in enumerate(spec.cases, 1):
                image = decode_array(case.image, blobs[2 * number - 2], max_bytes=self.config.max_session_mb * 2**20)
                labels = decode_array(case.labels, blobs[2 * number - 1], max_bytes=4 * image.size)
                matrix = np.array(case.ijk_to_ras, dtype=np.float64)
                Volume(image, matrix, name=f"Case {number}")  # the volume's own checks: geometry, voxel type
                if labels.dtype != bool and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
                    raise VolumeError(f"Case {number}: label values must be 0 (background) or positive integers.")
                if not labels.any():
                    raise VolumeError(f"Case {number}: the label map is empty; there is no object to train on.")
                np.save(folder / "cases" / f"{number:04d}_image.npy", image)
                np.save(folder / "cases" / f"{number:04d}_labels.npy", labels.astype(np.int32))
                matrices.append(matrix)
                del image, labels
            settings = spec.config
            train, val = split_cases([_Named(f"case{n:04d}") for n in range(len(matrices))], settings.val_fraction,
                                     settings.seed)  # fmt: skip
            job = FinetuneJob(job_id, spec.base, spec.name, settings, folder, matrices, (len(train), len(val)))
            with self._condition:
                if self._closed:
                    raise MedFMError("The server is shutting down; send the job again when it is back.")
                if len(self._queue) >= MAX_QUEUED:
                    raise LimitReached(f"{len(self._queue)} fine-tuning jobs wait on this server already; "
                                       "try again later.")  # fmt: skip
                self._check_name(spec.name)  # another job may have taken the name while this one uploaded
                self._forget_old()
                self._jobs[job_id] = job
                self._queue.append(job)
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="MedFM fine-tuning", daemon=True)
                    self._worker.start()
                self._condition.notify_all()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("fine-tune job %s queued: %s -> %s, %d cases (%d training, %d validation), %d epochs",
                 job_id[:6], spec.base, spec.name, len(matrices), *job.split, settings.epochs)  # fmt: skip
        return self.state(job_id)

    def describe(self) -> dict:
        """For the server's description: whether fine-tunes are published, and the jobs under way."""
        with self._condition:
            return {"publish": bool(self.config.publish_finetunes), "running": self._running is not None,
                    "queued": len(self._queue), "max_queued": MAX_QUEUED}  # fmt: skip

    def get(self, job_id: str) -> FinetuneJob:
        with self._condition:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobGone("This fine-tuning job is not on the server (it ended long ago, or the server restarted).")
        return job

    def state(self, job_id: str) -> dict:
        job = self.get(job_id)
        with self._condition:
            position = next((n for n, queued in enumerate(self._queue, 1) if queued is job), None)
        return job.state(position)

    def stop(self, job_id: str) -> dict:
        """Stop a job: a queued one at once, a running one at its next step (the best weights so far are kept)."""
        job = self.get(job_id)
        job.stop.set()
        with self._condition:
            waiting = job in self._queue
            if waiting:
                self._queue.remove(job)
        if waiting:
            shutil.rmtree(job.folder, ignore_errors=True)
            job.end("stopped", "Stopped before it started; nothing was trained.")
            log.info("fine-tune job %s stopped before it started", job_id[:6])
        return self.state(job_id)

    def close(self) -> None:
        """At shutdown: stop every job, wait a little for the running one, and delete the work folders."""
        with self._condition:
            self._closed = True
            jobs = list(self._jobs.values())
            self._queue.clear()
            self._condition.notify_all()
        for job in jobs:
            job.stop.set()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
        shutil.rmtree(self.root, ignore_errors=True)

    def _forget_old(self) -> None:
        """Finished jobs are kept for a while for their clients to read; the oldest go first."""
        finished = sorted((job for job in self._jobs.values() if job.finished and job.ended is not None),
                          key=lambda job: job.ended)  # fmt: skip
        now = time.monotonic()
        for number, job in enumerate(finished):
            if len(finished) - number > MAX_FINISHED or now - job.ended > self.config.session_ttl_seconds:
                del self._jobs[job.id]

    # ------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._running = job
            with job.lock:
                job.status = "embedding"
            started = time.monotonic()
            log.info("fine-tune job %s started on %s", job.id[:6], self.config.device)
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - the worker must carry on with the next job
                log.error("fine-tune job %s failed: %s", job.id[:6], type(exc).__name__, exc_info=exc)
                message = "Fine-tuning failed on the server; its log has details."
                job.end("failed", message, {"error": "InternalError", "message": message})
            finally:
                shutil.rmtree(job.folder, ignore_errors=True)
                if job.folder.exists():
                    log.warning("fine-tune job %s: its work folder could not be deleted", job.id[:6])
                with self._condition:
                    self._running = None
            log.info("fine-tune job %s %s after %.0f s", job.id[:6], job.status, time.monotonic() - started)

    def _run(self, job: FinetuneJob) -> None:
        try:
            run = self._train(job)
        except MedFMError as exc:
            if job.stop.is_set() and job.epoch == 0:
                job.end("stopped", "Stopped while preparing the cases; nothing was trained.")
            else:
                job.end("failed", str(exc), {"error": type(exc).__name__, "message": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - the job fails, the server carries on; the log has no data
            log.error("fine-tune job %s failed: %s", job.id[:6], type(exc).__name__, exc_info=exc)
            text = "The server ran out of memory." if "out of memory" in str(exc).lower() else "Its log has details."
            job.end("failed", f"Fine-tuning failed on the server. {text}",
                    {"error": "InternalError", "message": f"Fine-tuning failed on the server. {text}"})  # fmt: skip
            return
        result = run.result
        published = bool(self.config.publish_finetunes)
        if published:
            self.registry.publish(job.name)
        dice = run.card.get("validation_dice", {})
        summary = (f"validation Dice {dice.get('before')} before, {dice.get('after')} after (best epoch "
                   f"{result.best_epoch})")  # fmt: skip
        if published:
            where = f"'{job.name}' is published: every user of this server can choose it now."
        else:
            models = ",".join([*self.config.models, job.name])
            where = (f"'{job.name}' is saved in the server's model store but not served: this server publishes "
                     f"fine-tunes only with --publish-finetunes. Its administrator can publish it by restarting "
                     f"the server with --models {models} (or with --publish-finetunes, which publishes the "
                     "fine-tunes finished from then on).")  # fmt: skip
        with job.lock:
            job.card, job.published = run.card, published
        if result.stopped:
            job.end("stopped", f"Stopped after {len(result.history)} of {job.settings.epochs} epochs; the best "
                               f"weights were kept: {summary}. {where}")  # fmt: skip
        else:
            job.end("done", f"Trained: {summary}. {where}")

    def _train(self, job: FinetuneJob):
        cases_folder = job.folder / "cases"
        cases = []
        for number, matrix in enumerate(job.matrices, 1):
            image = np.load(cases_folder / f"{number:04d}_image.npy", mmap_mode="r")
            labels = np.load(cases_folder / f"{number:04d}_labels.npy", mmap_mode="r")
            name = f"case{number - 1:04d}"
            cases.append(MemoryCase(name, Volume(image, matrix, name=name), labels))
        settings = job.settings
        train, val = split_cases(cases, settings.val_fraction, settings.seed)
        config = self._finetune_config(settings)
        return finetune(train, val, job.base, job.name, self.store, config, job.folder / "work",
                        device=self.config.device, progress=job.report, stop=job.stop.is_set)  # fmt: skip


def remove_leftovers(folder: Path) -> None:
    """Work folders of server processes that no longer run (killed mid-job): patient data must not linger."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        pid = entry.name.removeprefix("server-")
        if not entry.is_dir() or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform that cannot tell: leave its folder
    return True


def add_finetune_routes(app, jobs: FinetuneJobs, failure) -> None:
    """The three routes; every failure is one JSON line, as on the other routes."""

    @app.post(FINETUNE_PATH)
    async def post_finetune(request: Request):
        """The header is checked before the cases are read; they stream into one buffer."""
        reader = UploadReader(request, jobs.config.max_upload_mb * 2**20)
        try:
            spec = await run_in_threadpool(jobs.check, await reader.header())
            blobs = await reader.parts()
            return await run_in_threadpool(jobs.create, spec, blobs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one JSON line
            return failure(exc)

    @app.get(FINETUNE_PATH + "/{job_id}")
    async def get_finetune(job_id: str):
        try:
            return jobs.state(job_id)
        except Exception as exc:  # noqa: BLE001
            return failure(exc)

    @app.delete(FINETUNE_PATH + "/{job_id}")
    async def delete_finetune(job_id: str):
        try:
            return await run_in_threadpool(jobs.stop, job_id)
        except Exception as exc:  # noqa: BLE001
            return failure(exc)
