"""Where a Ray cluster comes from: join one at an address, or start one on this machine for one command's life.

A cluster MedFM starts is MedFM's to stop: on a normal end, Ctrl-C or SIGTERM it is shut down, so no
Ray process is left behind. A cluster MedFM joins (or one already initialised in this process, as in
the tests) is left running. ``ray stop`` is never called: it ends every Ray process on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import MedFMError

#: namespace of MedFM's named actors (sessions), whoever started the cluster
NAMESPACE = "medfm"
#: a local cluster's object store: bounded, so a small /dev/shm makes Ray fall back to disk, not fail
LOCAL_OBJECT_STORE_BYTES = 2 * 2**30


def import_ray():
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MedFMError("--ray needs Ray; install it with: pip install 'medfm[ray]'") from None
    return ray


@dataclass
class ClusterInfo:
    address: str  # the GCS address other drivers (and `medfm serve --ray ADDRESS`) join
    started: bool  # MedFM started it here, and stops it
    gpus: float
    cpus: float


def _describe(ray, started: bool) -> ClusterInfo:
    resources = ray.cluster_resources()
    address = ray.get_runtime_context().gcs_address
    return ClusterInfo(address, started, float(resources.get("GPU", 0)), float(resources.get("CPU", 0)))


def start_local(num_cpus: int | None = None, num_gpus: float | None = None, object_store_bytes: int | None = None,
                temp_dir: str | None = None) -> ClusterInfo:  # fmt: skip
    """A Ray cluster on this machine, without the dashboard (Ray 2.60 guards it with a token of its own)."""
    ray = import_ray()
    os.environ.pop("RAY_ADDRESS", None)  # a set RAY_ADDRESS would make ray.init join instead of start
    try:
        ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace=NAMESPACE,
            object_store_memory=object_store_bytes or LOCAL_OBJECT_STORE_BYTES,
            # Unix socket paths are limited to ~107 characters: a short temporary folder.
            _temp_dir=temp_dir or tempfile.mkdtemp(prefix="medfm-ray-", dir="/tmp"),
            _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - Ray fails in many ways; the user needs one line
        raise MedFMError(f"Could not start a local Ray cluster: {str(exc).splitlines()[0]}") from None
    return _describe(ray, True)


def join(address: str) -> ClusterInfo:
    """Join a running cluster (``ray start --head`` printed its address)."""
    ray = import_ray()
    _check_reachable(address)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001
        raise MedFMError(
            f"Could not join the Ray cluster at {address} ({str(exc).splitlines()[0]}); start one with "
            "`ray start --head` and give the address it prints, or give --ray alone for a local one."
        ) from None
    return _describe(ray, False)


def _check_reachable(address: str) -> None:
    """A host:port nobody answers on is said at once (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", a ray:// client address: Ray finds or reports it
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise MedFMError(
            f"Could not join the Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` and give the address it prints, or give --ray alone for a local one."
        ) from None


@contextmanager
def ray_cluster(address: str | None = None, num_gpus: float | None = None):
    """Join ``address``, reuse this process's cluster, or start a local one; a started one is stopped at the end.

    SIGTERM is turned into the same orderly end as Ctrl-C, so `kill PID` leaves no Ray process behind.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield _describe(ray, False)
        return
    previous = signal.getsignal(signal.SIGTERM)
    info = join(address) if address else start_local(num_gpus=num_gpus)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    in_main_thread = _in_main_thread()
    if info.started and in_main_thread:
        signal.signal(signal.SIGTERM, terminate)
    try:
        yield info
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        stop(info)


def stop(info: ClusterInfo) -> None:
    """Leave the cluster; one MedFM started is shut down with every process it started, its files removed."""
    ray = import_ray()
    temp_dir = None
    if info.started:
        try:
            temp_dir = ray._private.worker._global_node.get_temp_dir_path()
        except AttributeError:  # a private detail of Ray: only its folder would be left
            temp_dir = None
    ray.shutdown()
    if temp_dir and os.path.basename(temp_dir).startswith("medfm-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
