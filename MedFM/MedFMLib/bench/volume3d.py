"""`medfm bench --model nninteractive|vista3d`: a 3D model's first and further interactions, and its memory.

The first interaction is what the user waits for after the first click on a
new volume: the model takes the volume (preprocessing, and nnInteractive's
normalisation) and answers. Further interactions are clicks on the same
object. Each size is a CT-like phantom with anisotropic voxels, so that
resampling (VISTA3D's 1.5 mm grid) costs what it costs on real scans.
Medians are reported; peak memory is the process's (CPU) and torch's (GPU).
"""

from __future__ import annotations

import platform
import sys
import time

import numpy as np

from ..engines import create_engine
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..interaction.volume_session import VolumeSession
from .clicks import device_synchronizer, peak_rss_mb

#: the issue's two sizes: a 128³ crop and a typical abdominal CT (I, J, K)
DEFAULT_SIZES = ((128, 128, 128), (256, 256, 160))


def parse_sizes(text: str | None) -> tuple[tuple[int, int, int], ...]:
    """``128,256x256x160`` → ((128, 128, 128), (256, 256, 160))."""
    from ..errors import MedFMError

    if not text:
        return DEFAULT_SIZES
    sizes = []
    for part in text.split(","):
        values = [v for v in part.lower().split("x") if v]
        try:
            numbers = [int(v) for v in values] * (3 if len(values) == 1 else 1)
        except ValueError:
            numbers = []
        if len(numbers) != 3 or min(numbers) < 16:
            raise MedFMError(f"Cannot read the volume size '{part}': give N (a cube) or IxJxK, at least 16 each.")
        sizes.append(tuple(numbers))
    return tuple(sizes)


def ct_phantom(dims: tuple[int, int, int]):
    """A CT-like body (soft tissue in air) with an organ and a lesion, 0.8×0.8×2 mm voxels; and the lesion's centre."""
    spacing = (0.8, 0.8, 2.0)
    matrix = make_ijk_to_ras(spacing, (0.0, 0.0, 0.0), (0, 0, 0), (-1, -1, 1))
    centre = matrix[:3, :3] @ (np.asarray(dims, float) / 2) + matrix[:3, 3]
    extent = np.asarray(dims) * np.asarray(spacing)
    body = Ellipsoid(tuple(centre), tuple(extent * 0.45), 1040.0)
    organ = Ellipsoid(tuple(centre + [-extent[0] * 0.12, 0, 0]), tuple(extent * [0.15, 0.15, 0.3]), 60.0)
    lesion_at = centre + [extent[0] * 0.15, extent[1] * 0.05, 0]
    lesion = Ellipsoid(tuple(lesion_at), (8.0, 8.0, 8.0), 90.0)
    volume, _ = render(dims, matrix, [body, organ, lesion], background=-1000.0, noise_sd=15.0, name="ct")
    volume.array = volume.array.astype(np.int16)
    return volume, lesion_at


def _gpu_peak_mb(device: str, reset: bool = False) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def run_volume_benchmark(
    model: str, device: str = "auto", checkpoint: str | None = None, random_weights: bool = False,
    sizes=DEFAULT_SIZES, further: int = 3, progress=None,
) -> dict:  # fmt: skip
    """Time a 3D model on each size: load, first interaction (volume + click), further clicks; peak memory."""
    started = time.perf_counter()
    engine = create_engine(model, checkpoint=checkpoint, device=device, random_weights=random_weights)
    load_s = time.perf_counter() - started
    synchronize = device_synchronizer(engine)
    rows = []
    for dims in sizes:
        volume, lesion_at = ct_phantom(dims)
        _gpu_peak_mb(engine.device, reset=True)
        session = VolumeSession(volume, engine)
        object_id = session.add_object("lesion")
        offsets = [np.array([d, -d, 0.0]) for d in (2.0, -2.0, 3.0, -3.0, 4.0, -4.0)]
        if progress is not None:
            progress(f"{model} on {engine.device}, {'x'.join(map(str, dims))}: first interaction")
        begin = time.perf_counter()
        session.add_point(object_id, lesion_at)
        synchronize()
        first_s = time.perf_counter() - begin
        times = []
        for index in range(further):
            if progress is not None:
                progress(f"{model} on {engine.device}, {'x'.join(map(str, dims))}: further {index + 1}/{further}")
            begin = time.perf_counter()
            session.add_point(object_id, lesion_at + offsets[index % len(offsets)], positive=index % 2 == 0)
            synchronize()
            times.append(time.perf_counter() - begin)
        rows.append({
            "size": list(dims), "first_s": first_s, "further_median_s": float(np.median(times)) if times else None,
            "further_s": times, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": _gpu_peak_mb(engine.device),
            "voxels_segmented": int(session.mask(object_id).sum()),
        })  # fmt: skip
        session.close()
    return {
        "model": model, "device": engine.device, "random_weights": random_weights, "load_s": load_s, "sizes": rows,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": sys.version.split()[0],
    }  # fmt: skip


def format_volume_report(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['device']} ({'random weights' if result['random_weights'] else 'weights'}); "
        f"model loaded in {result['load_s']:.1f} s; {result['machine']}",
        f"{'volume':<14} {'first (s)':>10} {'further p50 (s)':>16} {'peak RSS (MiB)':>15} {'peak GPU (MiB)':>15}",
    ]
    for row in result["sizes"]:
        further = f"{row['further_median_s']:.2f}" if row["further_median_s"] is not None else "-"
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "-"
        lines.append(f"{'x'.join(map(str, row['size'])):<14} {row['first_s']:>10.2f} {further:>16} {rss:>15} {gpu:>15}")
    if result["device"] == "cpu":
        lines.append("On a CPU these models are for a server: run `medfm serve` on a machine with a GPU.")
    return "\n".join(lines)
