"""`medfm bench --server URL`: what a click costs through a MedFM server, next to the same click in-process.

Both sessions get the same volume and the same clicks, one after the other,
so machine load affects both alike; medians and their ratio come from one
run. Bytes are counted on the wire (HTTP lines, headers and bodies).
"""

from __future__ import annotations

import platform
import time

import numpy as np

from ..engines import create_engine
from ..imaging.intensity import preset_window
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..imaging.volume import Volume
from ..interaction.session import Session
from ..remote.client import RemoteSession, ServerConnection
from .clicks import _percentile


def run_remote_benchmark(
    url: str,
    token: str,
    model: str = "classic",
    device: str = "auto",
    random_weights: bool = False,
    checkpoint: str | None = None,
    ca_cert: str | None = None,
    size: int = 512,
    slices: int = 100,
    first_clicks: int = 3,
    clicks: int = 20,
) -> dict:
    """Upload a size×size×slices CT-like phantom once, then time first and further clicks both ways."""
    matrix = make_ijk_to_ras(spacing=(0.7, 0.7, 1.5), origin=(-180.0, -180.0, 0.0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    organ = Ellipsoid(tuple(centre), (60.0, 45.0, 200.0), 60.0)
    volume, _ = render((size, size, slices), matrix, [organ], background=-100.0, noise_sd=10.0, name="bench")
    volume = Volume(np.rint(volume.array).astype(np.int16), volume.ijk_to_ras, name="bench")  # CT-like 16-bit
    window = preset_window("soft_tissue")

    local = Session(volume, create_engine(model, checkpoint, device, random_weights), window=window)
    connection = ServerConnection(url, token, ca_cert=ca_cert)
    # The server loads a model on its first session: do that first, so the upload is timed alone.
    warm_up = Volume(np.zeros((1, 16, 16), np.int16), np.eye(4), name="warm-up")
    RemoteSession(connection, warm_up, model, window=window).close()
    connection.traffic.sent = 0
    started = time.perf_counter()
    remote = RemoteSession(connection, volume, model, window=window)
    upload_ms = (time.perf_counter() - started) * 1000
    upload_bytes = connection.traffic.sent

    use_box = local.engine.prompt_types == ("box",)
    half = size / 16

    def point(k: int, dx: float, dy: float) -> np.ndarray:
        return volume.ijk_to_ras_points(np.array([size / 2 + dx, size / 2 + dy, k]))

    def click(session, object_id: int, k: int, dx: float, dy: float, positive: bool) -> float:
        started = time.perf_counter()
        if use_box:
            session.set_box(object_id, point(k, dx - half, dy - half), point(k, dx + half, dy + half))
        else:
            session.add_point(object_id, point(k, dx, dy), positive=positive)
        return (time.perf_counter() - started) * 1000

    timings: dict[str, list[float]] = {"local_first": [], "remote_first": [], "local": [], "remote": []}
    sent, received = [], []

    def both(kind: str, k: int, dx: float, dy: float, positive: bool, objects: tuple[int, int]) -> None:
        timings[f"local{kind}"].append(click(local, objects[0], k, dx, dy, positive))
        before_sent, before_received = connection.traffic.sent, connection.traffic.received
        timings[f"remote{kind}"].append(click(remote, objects[1], k, dx, dy, positive))
        if not kind:
            sent.append(connection.traffic.sent - before_sent)
            received.append(connection.traffic.received - before_received)

    middle = slices // 2
    for k in range(middle, middle + min(first_clicks, slices - middle)):
        both("_first", k, 0.0, 0.0, True, (local.add_object(), remote.add_object()))
    rng = np.random.default_rng(0)
    objects = (local.add_object(), remote.add_object())
    for n in range(clicks):
        if n % 5 == 0:
            objects = (local.add_object(), remote.add_object())
        dx, dy = rng.uniform(-size / 12, size / 12, size=2)
        both("", middle, float(dx), float(dy), n % 5 == 0 or n % 3 != 2, objects)

    identical = sum(bool(np.array_equal(local.mask(o), remote.mask(o))) for o in local.objects)
    remote.close()
    local_p50, remote_p50 = _percentile(timings["local"], 50), _percentile(timings["remote"], 50)
    return {
        "server": connection.url,
        "server_version": connection.info["version"],
        "model": model,
        "remote_device": remote.engine.device,
        "local_device": local.engine.device,
        "random_weights": random_weights,
        "image_size": [size, size],
        "slices": slices,
        "codec": connection.codec,
        "volume_mb": round(volume.array.nbytes / 2**20, 2),
        "upload_mb": round(upload_bytes / 2**20, 2),
        "upload_ms": round(upload_ms, 1),
        "first_clicks": len(timings["local_first"]),
        "local_first_click_ms": round(float(np.median(timings["local_first"])), 1),
        "remote_first_click_ms": round(float(np.median(timings["remote_first"])), 1),
        "local_click_ms_p50": round(local_p50, 2),
        "remote_click_ms_p50": round(remote_p50, 2),
        "remote_click_ms_p95": round(_percentile(timings["remote"], 95), 2),
        "remote_overhead_ms_p50": round(_percentile(np.subtract(timings["remote"], timings["local"]).tolist(), 50), 2),
        "remote_to_local_ratio": round(remote_p50 / max(local_p50, 1e-6), 2),
        "clicks": clicks,
        "bytes_sent_per_click_p50": int(np.median(sent)),
        "bytes_received_per_click_p50": int(np.median(received)),
        "identical_masks": f"{identical}/{len(local.objects)}",
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def format_remote_report(result: dict) -> str:
    rows, cols = result["image_size"]
    weights = " (random weights)" if result["random_weights"] else ""
    return "\n".join(
        [
            f"model {result['model']}{weights}, image {rows}×{cols}×{result['slices']}, "
            f"server {result['server']} (MedFM {result['server_version']}, {result['remote_device']}), "
            f"local {result['local_device']}",
            f"  upload (once):           {result['volume_mb']} MiB volume as {result['upload_mb']} MiB "
            f"({result['codec']}) in {result['upload_ms']:.0f} ms",
            f"  first click (median):    local {result['local_first_click_ms']:.1f} ms, "
            f"remote {result['remote_first_click_ms']:.1f} ms ({result['first_clicks']} slices)",
            f"  further click (p50):     local {result['local_click_ms_p50']:.2f} ms, "
            f"remote {result['remote_click_ms_p50']:.2f} ms (p95 {result['remote_click_ms_p95']:.2f} ms), "
            f"{result['clicks']} clicks",
            f"  remote / local:          {result['remote_to_local_ratio']:.2f}× "
            f"(overhead p50 {result['remote_overhead_ms_p50']:.2f} ms)",
            f"  bytes per click (p50):   {result['bytes_sent_per_click_p50']} sent, "
            f"{result['bytes_received_per_click_p50']} received",
            f"  masks identical to local: {result['identical_masks']} objects",
        ]
    )
