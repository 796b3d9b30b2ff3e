"""`medfm bench --finetune`: what fine-tuning a SAM-family model costs on this machine.

- The one-off embedding: seconds per slice for the frozen image encoder (the median of a few slices).
- An epoch: seconds per 100 slices (one object each) of decoder training on the cached embeddings,
  with the default prompt mix (boxes, points, and correction clicks: three decoder passes each).
- Memory: the process's peak (CPU) or torch's peak (GPU), and the cache's bytes per slice on disk.

The decoder's cost does not depend on what the image shows, so the training set repeats the embedded
slices' features up to the slice count: every pass is a real decoder pass on real cached features.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ..engines import create_engine
from .clicks import peak_rss_mb


def _phantom_case(slices: int, size: int):
    from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
    from ..training.embeddings import MemoryCase

    matrix = make_ijk_to_ras((0.8, 0.8, 3.0), (0.0, 0.0, 0.0), (0, 0, 0), (-1, -1, 1))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    volume, masks = render((size, size, slices), matrix, [Ellipsoid(tuple(centre), (60.0, 45.0, 200.0), 300.0)],
                           background=40.0, noise_sd=20.0, name="bench")  # fmt: skip
    return MemoryCase("bench", volume, masks[0].astype(np.int32))


def run_finetune_benchmark(
    model: str,
    device: str = "auto",
    checkpoint: str | None = None,
    random_weights: bool = False,
    slices: int = 100,
    encode_slices: int = 3,
    size: int = 512,
) -> dict:
    import torch

    from ..training.embeddings import EmbeddingSet, embed_cases
    from ..training.trainer import FinetuneConfig, FineTuner

    engine = create_engine(model, checkpoint=checkpoint, device=device, random_weights=random_weights, runtime="torch")
    if not hasattr(engine, "decoder_forward"):
        from ..errors import MedFMError

        raise MedFMError(f"'{model}' is not a SAM-family model: `medfm bench --finetune` times SAM-family decoders.")
    case = _phantom_case(encode_slices, size)
    with tempfile.TemporaryDirectory(prefix="medfm-bench-finetune-") as folder:
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(done: int, total: int) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        embedded = embed_cases(engine, [case], Path(folder) / "cache", progress=tick)
        cache_bytes = embedded.nbytes() / max(1, embedded.slice_count)
        repeats = -(-slices // max(1, len(embedded.objects)))
        training = EmbeddingSet(embedded.folder, embedded.cases * repeats)
        training.objects = training.objects[:slices]
        validation = EmbeddingSet(embedded.folder, embedded.cases[:1])
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tuner = FineTuner(engine, training, validation, FinetuneConfig(epochs=1, batch_size=8), Path(folder) / "work")
        result = tuner.run()
    epoch = result.history[0]["seconds"]
    report = {
        "model": model,
        "weights": "random" if random_weights else "trained",
        "device": engine.device,
        "machine": f"{platform.processor() or platform.machine()}, {_cpu_count()} CPU threads",
        "image_size": engine.image_size,
        "slice_size": size,
        "embedding_seconds_per_slice_median": round(float(np.median(times)), 3),
        "epoch_seconds_per_100_slices": round(epoch * 100.0 / slices, 2),
        "slices_per_epoch": slices,
        "cache_mib_per_slice": round(cache_bytes / 2**20, 2),
        "peak_memory_mib": round(peak_rss_mb(), 1),
    }
    if engine.device.startswith("cuda"):
        report["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def format_finetune_report(report: dict) -> str:
    lines = [f"fine-tuning {report['model']} ({report['weights']} weights) on {report['device']}: {report['machine']}",
             f"  embedding (once per labelled slice, {report['slice_size']}² slice): "
             f"{report['embedding_seconds_per_slice_median']} s per slice (median)",
             f"  an epoch of decoder training on cached embeddings: {report['epoch_seconds_per_100_slices']} s "
             f"per 100 slices (box, points and 2 correction clicks mixed)",
             f"  cache on disk: {report['cache_mib_per_slice']} MiB per slice (float16); peak memory "
             f"{report['peak_memory_mib']} MiB"]  # fmt: skip
    if "peak_gpu_memory_mib" in report:
        lines.append(f"  peak GPU memory: {report['peak_gpu_memory_mib']} MiB")
    return "\n".join(lines)
