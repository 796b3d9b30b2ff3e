"""`medfm bench --propagate`: what carrying a mask through the volume costs, per slice.

A phantom of ``slices + 1`` slices of size×size is segmented on its middle
slice, then propagated through every other slice twice: first with nothing
encoded yet (each slice costs an encode and a decode), then again with every
embedding in the cache (a decode only). Stop criteria are switched off, so
the walk always covers every slice whatever the (possibly random) weights
predict. Medians per slice come from the progress callback's timestamps.
"""

from __future__ import annotations

import time

import numpy as np

from ..engines import create_engine
from ..imaging.intensity import preset_window
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..interaction.propagation import PropagationOptions, StopCriteria
from ..interaction.session import Session
from .clicks import device_synchronizer, peak_rss_mb

# Walk to the volume's edge whatever the masks look like: this measures cost, not quality.
_COST_ONLY = PropagationOptions(criteria=StopCriteria(0, 0.0, -np.inf, 0.0, np.inf, 0, min_object_fraction=0.0))


def _timed_propagation(session: Session, object_id: int, synchronize) -> tuple[list[float], float]:
    stamps = [time.perf_counter()]

    def progress(done, total, plane):
        synchronize()
        stamps.append(time.perf_counter())

    session.propagate(object_id, "both", options=_COST_ONLY, progress=progress)
    synchronize()
    return [1000.0 * (b - a) for a, b in zip(stamps, stamps[1:])], 1000.0 * (time.perf_counter() - stamps[0])


def run_propagation_benchmark(
    model: str,
    device: str = "auto",
    checkpoint: str | None = None,
    random_weights: bool = False,
    size: int = 512,
    slices: int = 100,
) -> dict:
    """Per-slice cost of propagation with and without cached embeddings, and memory."""
    engine = create_engine(model, checkpoint=checkpoint, device=device, random_weights=random_weights)
    matrix = make_ijk_to_ras(spacing=(0.7, 0.7, 1.5), angles_deg=(0, 0, 0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    organ = Ellipsoid(tuple(centre), (size * 0.2, size * 0.15, slices * 1.5 * 0.6), 60.0)
    volume, _ = render((size, size, slices + 1), matrix, [organ], background=-100.0, noise_sd=10.0, name="bench")
    session = Session(volume, engine, window=preset_window("soft_tissue"))

    synchronize = device_synchronizer(engine)
    object_id = session.add_object()
    if engine.prompt_types == ("box",):  # box-only models (MedSAM, LiteMedSAM): the organ's box on the middle slice
        low, high = (size * 0.2, size * 0.25, slices / 2), (size * 0.8, size * 0.75, slices / 2)
        corner = volume.ijk_to_ras_points(np.array([low, high]))
        session.set_box(object_id, corner[0], corner[1])
    else:
        session.add_point(object_id, centre)
    if engine.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    uncached, uncached_total = _timed_propagation(session, object_id, synchronize)
    cached, cached_total = _timed_propagation(session, object_id, synchronize)
    result = {
        "model": model,
        "device": engine.device,
        "random_weights": random_weights,
        "size": size,
        "slices": len(uncached),
        "uncached_ms_p50": float(np.median(uncached)),
        "uncached_total_s": uncached_total / 1000.0,
        "cached_ms_p50": float(np.median(cached)),
        "cached_total_s": cached_total / 1000.0,
        "speedup": float(np.median(uncached) / np.median(cached)),
        "memory_tracking": bool(getattr(engine, "tracks_with_memory", False)),
        "cache_mib": session.cache.nbytes / 2**20,
        "cache_evictions": session.cache.stats.evictions,
        "peak_rss_mib": peak_rss_mb(),
    }
    if engine.device.startswith("cuda"):
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def format_propagation_report(result: dict) -> str:
    weights = " (random weights)" if result["random_weights"] else ""
    how = "SAM 2 memory tracking" if result["memory_tracking"] else "slice-by-slice prompting (box, point, mask)"
    lines = [
        f"model {result['model']} on {result['device']}{weights}, propagation through {result['slices']} slices "
        f"of {result['size']}×{result['size']} ({how})",
        f"  uncached (encode + decode): p50 {result['uncached_ms_p50']:.1f} ms/slice, "
        f"{result['uncached_total_s']:.1f} s in all",
        f"  cached (no encoding):       p50 {result['cached_ms_p50']:.1f} ms/slice, "
        f"{result['cached_total_s']:.1f} s in all",
        f"  uncached / cached:          {result['speedup']:.1f}×",
    ]
    lines.append(
        f"  embedding cache:            {result['cache_mib']:.1f} MiB held, {result['cache_evictions']} evictions"
    )
    if result.get("peak_rss_mib") is not None:
        lines.append(f"  peak memory:                {result['peak_rss_mib']:.1f} MiB RSS")
    if result.get("peak_gpu_mib") is not None:
        lines.append(f"  peak GPU memory:            {result['peak_gpu_mib']:.1f} MiB")
    return "\n".join(lines)
