"""`medfm annotate --ray`: the same per-case steps as in-process, as a Ray Data pipeline.

    cases ─ from_items ─▶ map(load): read the image (and labels) on CPU workers
          ─▶ map_batches(Segmenter, batch_size=1, num_gpus=1 or 0, compute=ActorPoolStrategy(size=N)):
             the model, loaded once per actor, segments a case at a time
          ─▶ map(write): the .seg.nrrd written by a worker, which returns the case's summary row

The driver only counts the rows coming out (the progress bar) and rewrites summary.csv after each one.
Every stage turns a case's error into a failed row that the next stages pass on: one bad case never fails
the dataset. Volumes and masks travel between stages as bytes (a binary column): Arrow's tensor
columns need one shape and type per block, and cases differ in both. The bytes are numpy's .npz format read
without pickle: nothing a case holds can run code.

Paths are absolute and the outputs are written by the workers: on a cluster of several machines, the dataset
and the output folder must be on storage they all share. Ray is imported only here, inside the functions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MedFMError
from ..imaging.io import SegmentData
from ..imaging.volume import Volume
from .annotate import (
    DONE,
    FAILED,
    AnnotationJob,
    Plan,
    failure_reason,
    load_case,
    measure,
    segment_case,
    summary_row,
    write_case,
)

if TYPE_CHECKING:
    import pyarrow

#: CPUs a reading or writing task asks for
IO_CPUS = 0.5


def actor_pool(requested: int | None, cluster_gpus: float, cases: int) -> tuple[int, float]:
    """(actors, GPUs per actor): an actor per GPU asked for (default: every GPU of the cluster), each holding one;
    a cluster without GPUs runs ``requested`` (default 1) actors on CPUs. Never more actors than cases."""
    if requested is not None and requested < 1:
        raise MedFMError(f"--gpus {requested}: give 1 or more (the number of model actors).")
    if cluster_gpus >= 1:
        size = requested or int(cluster_gpus)
        if size > cluster_gpus:
            raise MedFMError(f"--gpus {size}, but the Ray cluster has {cluster_gpus:g} GPU(s); give at most that.")
        return max(1, min(size, cases)), 1.0
    return max(1, min(requested or 1, cases)), 0.0


# ---------------------------------------------------------------------------------------------- stages
def pack(**arrays) -> bytes:
    """Arrays as .npz bytes (no pickle), for a binary column."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(payload: bytes) -> dict:
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _failed(row: dict, reason: str) -> dict:
    return dict(row, status=FAILED, reason=reason, payload=b"")


def load_stage(row: dict, job: AnnotationJob) -> dict:
    """Read a case on a CPU worker; the volume (and labels) go on as bytes."""
    started = time.perf_counter()
    # Every column from the start, typed: each stage's batches keep one schema.
    row = dict(row, status="", reason="", payload=b"", seconds=0.0, segments=0, volume_ml=0.0)
    try:
        volume, labels = load_case(row, job.needs_labels)
        arrays = {"image": volume.array, "ijk_to_ras": volume.ijk_to_ras, "name": np.array(volume.name)}
        if labels is not None:
            arrays["labels"] = labels
        row["payload"] = pack(**arrays)
    except Exception as exc:  # noqa: BLE001 - the case fails, the dataset goes on
        row = _failed(row, failure_reason(exc, row["case"]))
    row["seconds"] = time.perf_counter() - started
    return row


class Segmenter:
    """A model actor: the engine is loaded once, then segments each case it is handed."""

    def __init__(self, job: AnnotationJob) -> None:
        # The cluster's workers started with the environment of whoever started it, not this command's.
        os.environ.update(job.env)
        self.job = job
        self.error: str | None = None
        try:
            self.engine = job.create_engine()
        except Exception as exc:  # noqa: BLE001 - each case says why, rather than the actor dying in a loop
            self.engine, self.error = None, f"the model could not be loaded on a Ray worker: {failure_reason(exc, '')}"

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        import pyarrow as pa

        return pa.Table.from_pylist([self.segment(row) for row in batch.to_pylist()], schema=batch.schema)

    def segment(self, row: dict) -> dict:
        if row["status"] == FAILED:
            return row
        if self.error is not None:
            return _failed(row, self.error)
        started = time.perf_counter()
        try:
            arrays = unpack(row["payload"])
            array, ijk_to_ras, labels = arrays["image"], arrays["ijk_to_ras"], arrays.get("labels")
            volume = Volume(array, ijk_to_ras, name=str(arrays["name"]))
            segments = segment_case(self.engine, volume, labels, self.job.prompts.get(row["case"]), self.job)
            count, millilitres = measure(segments, ijk_to_ras)
            described = json.dumps([{"name": s.name, "color": [float(c) for c in s.color]} for s in segments])
            masks = {f"mask{i}": np.packbits(s.mask.astype(bool), axis=None) for i, s in enumerate(segments)}
            payload = pack(shape=np.array(array.shape), ijk_to_ras=ijk_to_ras, segments=np.array(described), **masks)
            row = dict(row, payload=payload, segments=int(count), volume_ml=float(millilitres))
        except Exception as exc:  # noqa: BLE001
            row = _failed(row, failure_reason(exc, row["case"]))
        row["seconds"] += time.perf_counter() - started
        return row


def write_stage(row: dict, job: AnnotationJob) -> dict:
    """Write a case's .seg.nrrd on a worker; the case's summary row comes out."""
    name, seconds = row["case"], row["seconds"]
    if row["status"] == FAILED:
        return summary_row(name, FAILED, job.model, seconds=seconds, reason=row["reason"])
    started = time.perf_counter()
    try:
        arrays = unpack(row["payload"])
        shape, ijk_to_ras = tuple(int(n) for n in arrays["shape"]), arrays["ijk_to_ras"]
        size = int(np.prod(shape))
        segments = [
            SegmentData(d["name"], np.unpackbits(arrays[f"mask{i}"], count=size).reshape(shape).astype(bool),
                        tuple(d["color"]))
            for i, d in enumerate(json.loads(str(arrays["segments"])))
        ]  # fmt: skip
        # Writing needs only the grid: its voxels stayed with the segmenter.
        grid = Volume(np.zeros(shape, np.uint8), ijk_to_ras, name=name)
        written = write_case(job.out, name, segments, grid)
    except Exception as exc:  # noqa: BLE001
        return summary_row(name, FAILED, job.model, seconds=seconds + time.perf_counter() - started,
                           reason=failure_reason(exc, name))  # fmt: skip
    return summary_row(name, DONE, job.model, row["segments"], row["volume_ml"],
                       seconds + time.perf_counter() - started, written.name)  # fmt: skip


# ---------------------------------------------------------------------------------------------- driver
def annotate_on_ray(run: Plan, cluster_gpus: float, gpus: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[dict]:  # fmt: skip
    """Run the cases still to do through Ray Data on the cluster this process is connected to."""
    from .cluster import import_ray

    ray = import_ray()
    total = len(run.cases)
    done = total - len(run.todo)
    size, gpus_each = actor_pool(gpus, cluster_gpus, len(run.todo))
    if progress is not None:
        progress(done, total)
    if not run.todo:
        return run.ordered()
    fetch_weights(run.job)
    context = ray.data.DataContext.get_current()
    # The command's own bar counts cases; Ray Data's bars and plan printout would cover it.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    job = run.job
    rows = [{key: case[key] for key in ("case", "image", "label", "npz")} for case in run.todo]
    dataset = (
        ray.data.from_items(rows, override_num_blocks=len(rows))
        # Reading and writing mostly wait on storage: half a CPU each. Asking for other resources than the
        # model actor also keeps Ray Data from fusing them into it (cases would then be read one at a time
        # in the actor, the model waiting): they run on CPU workers, ahead of and behind the model.
        .map(load_stage, fn_kwargs={"job": job}, num_cpus=IO_CPUS)
        .map_batches(Segmenter, batch_size=1, batch_format="pyarrow", fn_constructor_kwargs={"job": job},
                     num_gpus=gpus_each, compute=ray.data.ActorPoolStrategy(size=size))  # fmt: skip
        .map(write_stage, fn_kwargs={"job": job}, num_cpus=IO_CPUS)
    )
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # Ray Data's notes on execution would break the progress line
    try:
        for row in dataset.iter_rows():
            run.record({key: row[key] for key in row})
            done += 1
            if progress is not None:
                progress(done, total)
    except MedFMError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's own failures (a worker lost) end the run in one line
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MedFMError(f"The Ray pipeline stopped ({text}); the cases done are in {job.out}/summary.csv: rerun "
                         "with --resume to do the rest.") from None  # fmt: skip
    finally:
        quiet.setLevel(level)
    return run.ordered()


def fetch_weights(job: AnnotationJob) -> None:
    """Download the model once, here, before the actors start: not once per actor, all at the same time."""
    if job.checkpoint or job.random_weights:
        return
    from ..console import ProgressBar
    from ..models.store import ModelStore

    store = ModelStore()
    if store.info(job.model).needs_weights:
        store.checkpoint(job.model, progress=ProgressBar())
