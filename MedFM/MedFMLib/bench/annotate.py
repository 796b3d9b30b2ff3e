"""`medfm bench --annotate DATASET`: cases per minute of `medfm annotate`, in this process and through Ray Data.

Both runs annotate the same labelled dataset from its labels' boxes, into temporary folders, and their files
are compared voxel for voxel. The in-process time includes loading the model; the Ray time includes starting
the actors and loading the model in each (a local cluster's own start is reported apart: a real job runs on a
cluster that is already up). On one machine without GPUs, Ray pays its start-up for no extra model; its
figures show what the pipeline costs, and how far reading and writing on other cores hide behind the model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..console import StepProgress
from ..scale.annotate import DONE, AnnotationJob, annotate_local, label_names, plan, worker_env


def run_annotate_benchmark(
    dataset: str,
    model: str = "classic",
    device: str = "auto",
    checkpoint: str | None = None,
    random_weights: bool = False,
    runtime: str = "auto",
    fast: bool = False,
    gpus: int | None = None,
) -> dict:
    from ..scale.annotate_ray import actor_pool, annotate_on_ray
    from ..scale.cluster import import_ray, ray_cluster

    import_ray()
    dataset = str(Path(dataset).resolve())
    with tempfile.TemporaryDirectory(prefix="medfm-bench-annotate-") as folder:

        def job(name: str) -> AnnotationJob:
            return AnnotationJob(dataset=dataset, out=str(Path(folder) / name), model=model, mode="labels",
                                 checkpoint=checkpoint, device=device, runtime=runtime, fast=fast,
                                 random_weights=random_weights, label_names=label_names(dataset),
                                 env=worker_env())  # fmt: skip

        local = plan(job("local"))
        bar = StepProgress("in this process")
        started = time.perf_counter()
        engine = local.job.create_engine()
        loaded = time.perf_counter() - started
        rows = annotate_local(local, bar, engine=engine)
        local_seconds = time.perf_counter() - started
        bar.finish()
        engine_device = getattr(engine, "device", device)
        del engine
        started = time.perf_counter()
        with ray_cluster() as info:
            cluster_seconds = time.perf_counter() - started
            remote = plan(job("ray"))
            bar = StepProgress("on Ray")
            started = time.perf_counter()
            ray_rows = annotate_on_ray(remote, info.gpus, gpus, bar)
            ray_seconds = time.perf_counter() - started
            bar.finish()
            actors, gpus_each = actor_pool(gpus, info.gpus, len(remote.todo))
        identical, agreement = _compare_outputs(Path(folder) / "local", Path(folder) / "ray", rows)
    cases = len(rows)
    done = sum(row["status"] == DONE for row in rows)
    return {
        "model": model,
        "device": engine_device,
        "random_weights": random_weights,
        "dataset": dataset,
        "cases": cases,
        "done": done,
        "failed": cases - done,
        "in_process": {"seconds": round(local_seconds, 2), "model_load_seconds": round(loaded, 2),
                       "cases_per_minute": _per_minute(cases, local_seconds)},  # fmt: skip
        "ray": {"seconds": round(ray_seconds, 2), "cluster_start_seconds": round(cluster_seconds, 2),
                "cases_per_minute": _per_minute(cases, ray_seconds), "actors": actors, "gpus_per_actor": gpus_each,
                "cluster_cpus": info.cpus, "cluster_gpus": info.gpus, "local_cluster": info.started,
                "done": sum(row["status"] == DONE for row in ray_rows)},  # fmt: skip
        "identical": identical,
        "agreement_dice": agreement,
    }


def _per_minute(cases: int, seconds: float) -> float:
    return round(60.0 * cases / seconds, 2) if seconds > 0 else 0.0


def _compare_outputs(first: Path, second: Path, rows: list[dict]) -> tuple[bool, float | None]:
    """Whether both runs wrote the same segments (names, voxels, geometry) for every case done, and the mean
    Dice between their segments (below 1 where torch ran on another number of threads and the model's
    answer is that sensitive, as random weights are)."""
    import slicerio

    identical, scores = True, []
    for row in rows:
        if row["status"] != DONE:
            continue
        paths = [folder / row["output"] for folder in (first, second)]
        if not all(path.is_file() for path in paths):
            return False, None
        a, b = (slicerio.read_segmentation(str(path)) for path in paths)
        names = [s["name"] for s in a["segments"]]
        if names != [s["name"] for s in b["segments"]] or not np.allclose(a["ijkToLPS"], b["ijkToLPS"]):
            return False, None
        identical = identical and np.array_equal(a["voxels"], b["voxels"])
        for first_mask, second_mask in zip(_masks(a), _masks(b)):
            total = int(first_mask.sum() + second_mask.sum())
            scores.append(1.0 if total == 0 else 2.0 * float((first_mask & second_mask).sum()) / total)
    return identical, round(float(np.mean(scores)), 4) if scores else None


def _masks(segmentation: dict) -> list[np.ndarray]:
    voxels = segmentation["voxels"] if segmentation["voxels"].ndim == 4 else segmentation["voxels"][None]
    return [voxels[s.get("layer", 0)] == s["labelValue"] for s in segmentation["segments"]]


def format_annotate_report(result: dict) -> str:
    weights = ", random weights" if result["random_weights"] else ""
    local, ray = result["in_process"], result["ray"]
    where = "a local cluster" if ray["local_cluster"] else "a running cluster"
    lines = [
        f"medfm annotate (boxes from labels): {result['model']} on {result['device']}{weights}, {result['cases']} "
        f"cases of {result['dataset']} ({result['failed']} failed)",
        f"  in this process: {local['cases_per_minute']:.1f} cases/min ({local['seconds']:.1f} s, model load "
        f"{local['model_load_seconds']:.1f} s of it)",
        f"  Ray Data:        {ray['cases_per_minute']:.1f} cases/min ({ray['seconds']:.1f} s with actors starting; "
        f"{ray['actors']} model actor(s), {ray['gpus_per_actor']:g} GPU each, on {where} of {ray['cluster_cpus']:g} "
        f"CPUs and {ray['cluster_gpus']:g} GPUs that took {ray['cluster_start_seconds']:.1f} s to start)",
        f"  same files both ways: {'yes' if result['identical'] else 'NO'} (mean Dice between the two runs' "
        f"segments {result['agreement_dice']})",
    ]  # fmt: skip
    return "\n".join(lines)
