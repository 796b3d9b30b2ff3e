"""`medfm bench --server URL --clients N`: many annotators on one server at once.

Each simulated user uploads its own small CT-like volume, clicks on a few slices (points, a negative
point, an undo), then closes its session; all start together. Reported: click latency percentiles
across every user, upload time, errors (anything but a mask), and whether the server's session count
came back to where it was.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..imaging.intensity import preset_window
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..imaging.volume import Volume
from ..remote.client import RemoteSession, ServerConnection
from .clicks import _percentile


def _volume(index: int, size: int, slices: int) -> tuple[Volume, np.ndarray]:
    matrix = make_ijk_to_ras(spacing=(0.8, 0.8, 2.0), origin=(-100.0 + index, -100.0, 0.0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    organ = Ellipsoid(tuple(centre), (size * 0.2, size * 0.15, slices * 0.8), 60.0)
    volume, _ = render((size, size, slices), matrix, [organ], background=-100.0, noise_sd=8.0, seed=index)
    return Volume(np.rint(volume.array).astype(np.int16), volume.ijk_to_ras, name=f"user{index}"), centre


def run_load_benchmark(
    url: str,
    token: str,
    clients: int = 20,
    model: str = "classic",
    clicks: int = 10,
    size: int = 128,
    slices: int = 24,
    ca_cert: str | None = None,
    progress=None,
) -> dict:
    """``clients`` users at once, each with its own volume and ``clicks`` clicks; latencies in ms."""
    before = ServerConnection(url, token, ca_cert=ca_cert).check()
    volumes = [_volume(index, size, slices) for index in range(clients)]
    latencies: list[float] = []
    uploads: list[float] = []
    errors: list[str] = []
    finished = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def user(index: int) -> None:
        volume, centre = volumes[index]
        try:
            start.wait()
            began = time.perf_counter()
            remote = RemoteSession(ServerConnection(url, token, ca_cert=ca_cert), volume, model,
                                   window=preset_window("soft_tissue"))  # fmt: skip
            uploaded = (time.perf_counter() - began) * 1000
            own = []
            object_id = remote.add_object()
            for n in range(clicks):
                k = (n // 4) * 2 - 2  # a few slices around the middle
                point = centre + volume.ijk_to_ras[:3, :3] @ np.array([n % 3 - 1.0, 0.0, float(k)])
                began = time.perf_counter()
                if n % 5 == 4:
                    remote.undo()
                else:
                    remote.add_point(object_id, point, positive=n % 4 != 3)
                own.append((time.perf_counter() - began) * 1000)
            if not remote.mask(object_id).any():
                raise RuntimeError("an empty mask")
            remote.close()
            with lock:
                latencies.extend(own)
                uploads.append(uploaded)
                finished.append(index)
        except Exception as exc:  # noqa: BLE001 - counted and reported, one line each
            with lock:
                errors.append(f"user {index}: {exc}")
        if progress is not None:
            progress(len(finished) + len(errors), clients)

    began = time.perf_counter()
    threads = [threading.Thread(target=user, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    after = ServerConnection(url, token, ca_cert=ca_cert).check()
    return {
        "server": url,
        "server_version": after["version"],
        "model": model,
        "clients": clients,
        "served": len(finished),
        "errors": len(errors),
        "error_examples": errors[:3],
        "clicks_per_client": clicks,
        "image": [size, size, slices],
        "click_ms_p50": round(_percentile(latencies, 50), 1) if latencies else None,
        "click_ms_p95": round(_percentile(latencies, 95), 1) if latencies else None,
        "upload_ms_p50": round(_percentile(uploads, 50), 1) if uploads else None,
        "wall_seconds": round(wall, 2),
        "sessions_before": before["sessions"],
        "sessions_after": after["sessions"],
    }


def format_load_report(result: dict) -> str:
    users = f"{result['clients']} client{'s' if result['clients'] != 1 else ''}"
    image = "×".join(map(str, result["image"]))
    lines = [
        f"{users} at once on {result['server']} (MedFM {result['server_version']}), model {result['model']}, "
        f"{result['clicks_per_client']} clicks each on {image}",
        f"  served:          {result['served']}/{result['clients']} clients, {result['errors']} errors, "
        f"in {result['wall_seconds']:.1f} s",
        f"  click latency:   p50 {result['click_ms_p50']} ms, p95 {result['click_ms_p95']} ms",
        f"  upload (p50):    {result['upload_ms_p50']} ms",
        f"  sessions:        {result['sessions_before']} before, {result['sessions_after']} after",
    ]
    lines += [f"  error: {example}" for example in result["error_examples"]]
    return "\n".join(lines)
