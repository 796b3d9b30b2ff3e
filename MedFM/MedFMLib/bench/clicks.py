"""`medfm bench`: how long a click takes, measured the way a user feels it.

A *further click* is the whole path from an RAS prompt to the updated 3D mask:
prompt mapping, cache lookup, decoding, upsampling and writing the slice. The
*first click* on a slice adds the encoder. Medians are reported, and the ratio
of the two is taken within one run so that machine load affects both alike.
"""

from __future__ import annotations

import platform
import sys
import time

import numpy as np

from ..engines import create_engine
from ..imaging.intensity import preset_window
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..interaction.session import Session


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process, in MiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    except ImportError:  # Windows
        try:
            import psutil

            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / (1024 * 1024)
        except ImportError:
            return None


def device_synchronizer(engine):
    """A function that waits for the engine's GPU work to finish, so that timings include it."""

    def synchronize() -> None:
        if engine.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    return synchronize


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_benchmark(
    model: str,
    device: str = "auto",
    checkpoint: str | None = None,
    random_weights: bool = False,
    size: int = 512,
    first_clicks: int = 3,
    further_clicks: int = 20,
    background: bool = False,
    runtime: str = "torch",
    fast: bool = False,
    zoom: bool | None = None,
) -> dict:
    """Time first clicks (encode + decode) and further clicks (decode only) on a size×size phantom.

    With ``background``, also encode one more slice on the Slicer effect's
    worker thread and measure how late a 10 ms timer on the main (GUI) thread
    fires meanwhile, then the first click on that prefetched slice.
    """
    timed_slices = max(first_clicks, 1)
    # As many again to time first clicks without the small-object zoom, and one more for the background encode.
    slices = 2 * timed_slices + (1 if background else 0)
    matrix = make_ijk_to_ras(spacing=(0.7, 0.7, 1.5), origin=(-180.0, -180.0, 0.0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    organ = Ellipsoid(tuple(centre), (60.0, 45.0, 200.0), 60.0)
    volume, _ = render((size, size, slices), matrix, [organ], background=-100.0, noise_sd=10.0, name="bench")

    started = time.perf_counter()
    engine = create_engine(
        model, checkpoint=checkpoint, device=device, random_weights=random_weights, runtime=runtime, fast=fast,
        zoom=zoom,
    )
    load_ms = (time.perf_counter() - started) * 1000
    session = Session(volume, engine, window=preset_window("soft_tissue"))

    synchronize = device_synchronizer(engine)

    def slice_point(k: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        return volume.ijk_to_ras_points(np.array([size / 2 + dx, size / 2 + dy, k]))

    use_box = engine.prompt_types == ("box",)
    half = size / 16

    def click(object_id: int, k: int, dx: float, dy: float, positive: bool) -> None:
        if use_box:
            # Box-only models: a further click is a redrawn box.
            session.set_box(object_id, slice_point(k, dx - half, dy - half), slice_point(k, dx + half, dy + half))
        else:
            session.add_point(object_id, slice_point(k, dx, dy), positive=positive)

    def first_click_ms(slice_indices) -> list[float]:
        times = []
        for k in slice_indices:
            object_id = session.add_object()
            synchronize()
            started = time.perf_counter()
            click(object_id, k, 0.0, 0.0, True)
            synchronize()
            times.append((time.perf_counter() - started) * 1000)
        return times

    first_ms = first_click_ms(range(timed_slices))
    zoom_crops = sum(key.crop is not None for key in session.cache.keys())
    unzoomed_ms = []
    if session.zoom is not None:  # the same first click on other slices, the whole slice's answer only
        zoom, session.zoom = session.zoom, None
        unzoomed_ms = first_click_ms(range(timed_slices, 2 * timed_slices))
        session.zoom = zoom

    rng = np.random.default_rng(0)
    next_ms = []
    object_id = session.add_object()
    for n in range(further_clicks):
        if n % 5 == 0:
            object_id = session.add_object()  # a fresh object: 1 to 5 clicks each, as users do
        dx, dy = rng.uniform(-size / 12, size / 12, size=2)
        synchronize()
        started = time.perf_counter()
        # Each object starts with a positive click; every third further click is negative.
        click(object_id, 0, float(dx), float(dy), positive=(n % 5 == 0 or n % 3 != 2))
        synchronize()
        next_ms.append((time.perf_counter() - started) * 1000)

    extra: dict = {}
    if background:
        extra = _background_figures(session, slices - 1, lambda k: click(session.add_object(), k, 0.0, 0.0, True))

    result = {
        **extra,
        "model": model,
        "device": engine.device,
        "runtime": getattr(engine, "runtime", "torch"),
        "random_weights": random_weights,
        "image_size": [size, size],
        "load_ms": round(load_ms, 1),
        "first_click_ms": round(float(np.median(first_ms)), 1),
        "first_click_runs": len(first_ms),
        "first_clicks_zoomed": zoom_crops,
        "first_click_without_zoom_ms": round(float(np.median(unzoomed_ms)), 1) if unzoomed_ms else None,
        "next_click_ms_p50": round(_percentile(next_ms, 50), 2),
        "next_click_ms_p95": round(_percentile(next_ms, 95), 2),
        "next_click_runs": len(next_ms),
        "first_to_next_ratio": round(float(np.median(first_ms)) / max(_percentile(next_ms, 50), 1e-6), 1),
        "cache_hits": session.cache.stats.hits,
        "cache_misses": session.cache.stats.misses,
        "zoom_crops_encoded": sum(key.crop is not None for key in session.cache.keys()),
        "peak_rss_mb": None if peak_rss_mb() is None else round(peak_rss_mb(), 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import torch

        result["torch"] = torch.__version__
        result["torch_threads"] = torch.get_num_threads()
        if engine.device.startswith("cuda"):
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1024 * 1024), 1)
            result["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return result


def _background_figures(session: Session, k: int, click_on_slice) -> dict:
    from ..imaging.geometry import SlicePlane
    from ..interaction.background import BackgroundEncoder

    plane = SlicePlane(2, k)
    encoder = BackgroundEncoder(session)
    try:
        encoder.request([plane])
        gaps, last = [], time.perf_counter()
        while True:
            time.sleep(0.01)  # the GUI's event loop, stood in for by a 10 ms timer
            now = time.perf_counter()
            gaps.append((now - last) * 1000)
            last = now
            if encoder.is_ready(plane) or encoder.failure(plane):
                break
        started = time.perf_counter()
        click_on_slice(k)
        prefetched_ms = (time.perf_counter() - started) * 1000
    finally:
        encoder.stop()
    return {
        "gui_tick_ms_p50_during_encode": round(_percentile(gaps, 50), 1),
        "gui_tick_ms_max_during_encode": round(max(gaps), 1),
        "gui_ticks_during_encode": len(gaps),
        "click_on_prefetched_slice_ms": round(prefetched_ms, 1),
    }


def format_report(result: dict) -> str:
    rows, cols = result["image_size"]
    weights = " (random weights)" if result["random_weights"] else ""
    lines = [
        f"model {result['model']} on {result['device']} ({result['runtime']}){weights}, image {rows}×{cols}",
        f"  first click (encode + decode): {result['first_click_ms']:.1f} ms (median of {result['first_click_runs']})",
        f"  further click (decode only):   p50 {result['next_click_ms_p50']:.2f} ms, "
        f"p95 {result['next_click_ms_p95']:.2f} ms ({result['next_click_runs']} clicks)",
        f"  first / further click:         {result['first_to_next_ratio']:.1f}×",
        *(
            [
                f"  small-object zoom:             {result['first_clicks_zoomed']} of {result['first_click_runs']} "
                f"first clicks encoded a crop too; without the zoom {result['first_click_without_zoom_ms']:.1f} ms; "
                f"{result['zoom_crops_encoded']} crops encoded in all"
            ]
            if result.get("first_click_without_zoom_ms") is not None
            else []
        ),
        f"  peak memory:                   {result['peak_rss_mb']} MiB RSS"
        + (f", {result['peak_gpu_mb']} MiB GPU" if "peak_gpu_mb" in result else ""),
        f"  model load:                    {result['load_ms']:.0f} ms",
    ]
    if "gui_tick_ms_max_during_encode" in result:
        lines += [
            "  GUI thread while encoding:     10 ms timer fired after "
            f"p50 {result['gui_tick_ms_p50_during_encode']} ms, worst {result['gui_tick_ms_max_during_encode']} ms "
            f"({result['gui_ticks_during_encode']} ticks)",
            f"  first click, prefetched slice: {result['click_on_prefetched_slice_ms']:.1f} ms",
        ]
    return "\n".join(lines)
