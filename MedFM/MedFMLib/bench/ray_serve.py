"""`medfm bench --ray-serve`: what Ray adds to a click, next to the plain server, in one run.

Both servers run here on loopback with the same model and limits: the plain one (uvicorn, sessions in
its process) and the Ray one (a Serve front end, each session in its own actor). The same volume gets
the same clicks on both, alternately, so machine load affects both alike. Also measured: how long a
new session takes to start on each, and what a session's actor process holds in memory.
"""

from __future__ import annotations

import platform
import secrets
import socket
import threading
import time

import numpy as np

from ..errors import MedFMError
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..imaging.volume import Volume
from .clicks import _percentile


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _PlainServer:
    """The plain server in a thread of this process."""

    def __init__(self, config) -> None:
        import uvicorn

        from ..remote.server.app import create_app

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, name="bench plain server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise MedFMError("The plain server did not start within 60 s.")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _wait_serving(connection, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.check()
            return
        except MedFMError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def run_ray_serve_benchmark(
    model: str = "classic", random_weights: bool = False, device: str = "auto", size: int = 256, slices: int = 24,
    clicks: int = 30, sessions: int = 2,
) -> dict:  # fmt: skip
    """Clicks through both servers, alternately; session start-up on both; a session actor's memory."""
    from ..remote.client import RemoteSession, ServerConnection
    from ..remote.server.app import ServerConfig
    from ..scale.cluster import NAMESPACE, ray_cluster
    from ..scale.serving import RayOptions, deploy, medfm_environment, undeploy
    from ..scale.session_actor import actor_name

    token = secrets.token_urlsafe(24)
    config = ServerConfig(token=token, models=[model], device=device, random_weights=random_weights,
                          runtime="torch", session_ttl_seconds=600.0)  # fmt: skip
    matrix = make_ijk_to_ras(spacing=(0.8, 0.8, 2.0), origin=(-100.0, -100.0, 0.0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    volume, _ = render((size, size, slices), matrix, [Ellipsoid(tuple(centre), (40.0, 30.0, 100.0), 60.0)],
                       background=-100.0, noise_sd=10.0, name="bench")  # fmt: skip
    volume = Volume(np.rint(volume.array).astype(np.int16), volume.ijk_to_ras, name="bench")

    with ray_cluster() as cluster, _PlainServer(config) as plain_url:
        ray_port = _free_port()
        deploy(config, RayOptions(gpus_per_session=0.0, env=medfm_environment()), "127.0.0.1", ray_port)
        try:
            ray_url = f"http://127.0.0.1:{ray_port}"
            connections = {"plain": ServerConnection(plain_url, token), "ray": ServerConnection(ray_url, token)}
            _wait_serving(connections["ray"])
            starts: dict[str, list[float]] = {"plain": [], "ray": []}
            opened: dict[str, list] = {"plain": [], "ray": []}
            for _ in range(sessions):
                for path, connection in connections.items():
                    started = time.perf_counter()
                    opened[path].append(RemoteSession(connection, volume, model))
                    starts[path].append((time.perf_counter() - started) * 1000)
            timings: dict[str, list[float]] = {"plain": [], "ray": []}
            objects = {path: opened[path][0].add_object() for path in connections}
            rng = np.random.default_rng(0)
            for index in range(clicks + 1):
                offset = rng.uniform(-8, 8, size=2)
                k = slices // 2  # one slice: after the first click, each click decodes only
                ras = volume.ijk_to_ras_points(np.array([size / 2 + offset[0], size / 2 + offset[1], k]))
                for path in ("plain", "ray") if index % 2 else ("ray", "plain"):
                    started = time.perf_counter()
                    opened[path][0].add_point(objects[path], ras, positive=index % 3 != 2)
                    if index:  # the first click encodes its slice: a warm-up, not counted
                        timings[path].append((time.perf_counter() - started) * 1000)
            masks_equal = bool(np.array_equal(opened["plain"][0].mask(1), opened["ray"][0].mask(1)))
            actor_mib = _actor_memory_mib(actor_name(opened["ray"][0].session_id), NAMESPACE)
            for path in connections:
                for remote in opened[path]:
                    remote.close()
        finally:
            undeploy(cluster.started)
    plain, ray_ms = np.median(timings["plain"]), np.median(timings["ray"])
    return {
        "model": model,
        "random_weights": random_weights,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "cluster": {"address": cluster.address, "started_here": cluster.started, "gpus": cluster.gpus},
        "volume": list(volume.array.shape),
        "clicks": clicks,
        "plain_click_ms": {"median": float(plain), "p90": _percentile(timings["plain"], 90)},
        "ray_click_ms": {"median": float(ray_ms), "p90": _percentile(timings["ray"], 90)},
        "added_ms_per_click": float(ray_ms - plain),
        "ratio": float(ray_ms / plain) if plain else None,
        "plain_session_start_ms": float(np.median(starts["plain"])),
        "ray_session_start_ms": float(np.median(starts["ray"])),
        "session_actor_mib": actor_mib,
        "masks_equal": masks_equal,
    }


def _actor_memory_mib(name: str, namespace: str) -> float | None:
    """Resident memory of a session's actor process (its model loaded), where it runs on this machine."""
    import psutil
    import ray

    try:
        worker = ray.get(ray.get_actor(name, namespace=namespace).worker.options(concurrency_group="io").remote(),
                         timeout=30)  # fmt: skip
        return psutil.Process(worker["pid"]).memory_info().rss / 2**20
    except (ValueError, psutil.Error, ray.exceptions.RayError):
        return None


def format_ray_serve_report(result: dict) -> str:
    plain, ray_ms = result["plain_click_ms"], result["ray_click_ms"]
    weights = " (random weights)" if result["random_weights"] else ""
    lines = [
        f"{result['model']}{weights} behind the plain server and behind Ray Serve, on loopback, "
        f"{'x'.join(map(str, result['volume']))} volume; {result['machine']}",
        f"  click, plain server: median {plain['median']:.1f} ms, p90 {plain['p90']:.1f} ms",
        f"  click, Ray:          median {ray_ms['median']:.1f} ms, p90 {ray_ms['p90']:.1f} ms",
        f"  Ray adds {result['added_ms_per_click']:.1f} ms per click (x{result['ratio']:.2f}; median of "
        f"{result['clicks']} clicks each, alternating); masks {'equal' if result['masks_equal'] else 'DIFFER'}",
        f"  new session (upload, model, first state): plain {result['plain_session_start_ms']:.0f} ms, "
        f"Ray {result['ray_session_start_ms']:.0f} ms (a new actor process)",
    ]
    if result["session_actor_mib"] is not None:
        lines.append(f"  a session's actor process holds {result['session_actor_mib']:.0f} MiB (its model loaded)")
    return "\n".join(lines)
