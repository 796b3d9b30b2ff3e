"""`medfm serve --ray`: the same API on a Ray cluster, each session in its own actor.

The server under test is a real `medfm serve --ray ADDRESS` process that joins the run's one Ray
cluster (the ``ray_cluster`` fixture: one GPU declared for placement only, the models on the CPU).
This process is a driver of the same cluster, so the tests can find a session's actor and kill it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import (
    SERVER_TOKEN,
    ServerProcess,
    nudge,
    same_returns,
    same_state,
    script,
    server_home,
    server_request,
    sphere_volume,
    upload_frame,
)
from MedFMLib.engines import create_engine
from MedFMLib.errors import MedFMError
from MedFMLib.interaction.session import Session
from MedFMLib.remote.client import RemoteError, RemoteSession, ServerConnection

# Every test here on one test worker (pytest -n): the run's one Ray cluster is started once.
pytestmark = pytest.mark.xdist_group("ray")

#: two sessions fill the one declared GPU
SHARE = 0.5
TTL_SECONDS = 6.0


def wait_until_serving(server: ServerProcess, timeout: float = 90.0) -> None:
    """Serve's proxy listens before the app is deployed: wait for the API itself to answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            status, _ = server_request(server, "GET", "/v1")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the Ray server did not come up:\n{server.log_text()}")


def stop_gracefully(server: ServerProcess, timeout: float = 60.0) -> int:
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout)
    server.log.close()
    return code


@pytest.fixture(scope="module")
def ray_server(ray_cluster, tmp_path_factory, tiny_sam_catalog):
    home, env = server_home(tmp_path_factory.mktemp("ray_serve"), tiny_sam_catalog)
    args = ["--models", "classic,sam_tiny", "--device", "cpu", "--ray", ray_cluster.address,
            "--gpus-per-session", str(SHARE), "--session-ttl", str(TTL_SECONDS), "--max-session-mb", "512",
            "--max-total-mb", "1024", "--cache-mb", "64", "--session-start-timeout", "60"]  # fmt: skip
    server = ServerProcess(home, args, env=env).start(wait=False)
    try:
        wait_until_serving(server)
    except RuntimeError:
        server.stop()
        raise
    yield server
    assert stop_gracefully(server) == 0, server.log_text()


@pytest.fixture(autouse=True)
def _tiny_models_locally(tiny_sam):
    """The local sessions compared with the server's use the same tiny catalog."""


def connect(server) -> ServerConnection:
    return ServerConnection(server.url, SERVER_TOKEN)


def session_actor(session_id: str):
    import ray

    from MedFMLib.scale.cluster import NAMESPACE
    from MedFMLib.scale.session_actor import actor_name

    return ray.get_actor(actor_name(session_id), namespace=NAMESPACE)


def actor_exists(session_id: str) -> bool:
    try:
        session_actor(session_id)
    except ValueError:
        return False
    return True


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_session_on_ray_gives_the_same_masks_as_a_local_one(ray_server, tiny_sam_catalog):
    volume, _, centre = sphere_volume("oblique_anisotropic")
    local = Session(volume, create_engine("sam_tiny", checkpoint=tiny_sam_catalog.parent / "sam_tiny.pth"))
    remote = RemoteSession(connect(ray_server), volume, "sam_tiny")
    try:
        # The masks are the same bit for bit; a score may differ in its 6th digit, as the actor's torch runs on
        # a thread count of Ray's choosing (sums in another order).
        local_returns, remote_returns = script(local, centre, volume), script(remote, centre, volume)
        same_returns(local_returns[::2], remote_returns[::2], score_rel=1e-4)
        for step, (local_labels, remote_labels) in enumerate(zip(local_returns[1::2], remote_returns[1::2])):
            assert np.array_equal(local_labels, remote_labels), f"step {step}"
        same_state(local, remote, score_rel=1e-4)
        assert actor_exists(remote.session_id)
        # The session runs in its own process, with a GPU share Ray placed it on.
        import ray

        worker = ray.get(session_actor(remote.session_id).worker.options(concurrency_group="io").remote(), timeout=30)
        assert worker["pid"] != ray_server.process.pid and worker["gpus"] == ["0"]
    finally:
        remote.close()
    wait_for(lambda: not actor_exists(remote.session_id), 30, "DELETE to end the session's actor")


def test_wrong_tokens_and_garbled_payloads_get_one_clear_line(ray_server):
    with pytest.raises(RemoteError, match="refused the token"):
        ServerConnection(ray_server.url, "not-the-right-token-at-all").check()
    status, reply = server_request(ray_server, "GET", "/v1", token=None)
    assert status == 401 and "needs a token" in reply["message"]
    status, reply = server_request(ray_server, "POST", "/v1/sessions", body=b"\x00garbage" * 10)
    assert status == 400 and reply["error"] == "ProtocolError"
    status, reply = server_request(ray_server, "POST", "/v1/sessions",
                                   body=upload_frame(np.zeros((4, 4, 4), np.float32), model="not_offered"))  # fmt: skip
    assert status == 409 and "does not offer 'not_offered'" in reply["message"]
    volume, _, centre = sphere_volume("ras_aligned")
    remote = RemoteSession(connect(ray_server), volume, "classic")
    try:
        path = f"/v1/sessions/{remote.session_id}/call"
        status, reply = server_request(ray_server, "POST", path, body=b"{not json")
        assert status == 400 and reply["error"] == "ProtocolError"
        status, reply = server_request(ray_server, "POST", path, body=b'{"method": "add_point", "args": {"x": 1}}')
        assert status == 422 and reply["error"] == "InvalidArgument"
        status, reply = server_request(ray_server, "POST", "/v1/sessions/not-a-session/call", body=b"{}")
        assert status == 404 and reply["error"] == "SessionGone"
        status, reply = server_request(ray_server, "POST", "/v1/finetune", body=b"x")
        assert status == 501 and "plain `medfm serve`" in reply["message"]
        # The session is unharmed by all of it.
        object_id = remote.add_object()
        remote.add_point(object_id, centre)
        assert remote.mask(object_id).sum() > 0
    finally:
        remote.close()


def test_sessions_live_in_their_own_actors_a_third_waits_for_a_gpu_share_and_idle_ones_end(ray_server):
    import ray

    volume, _, centre = sphere_volume("lps_anisotropic")
    first = RemoteSession(connect(ray_server), volume, "classic")
    second = RemoteSession(connect(ray_server), volume, "classic")
    try:
        workers = [
            ray.get(session_actor(s.session_id).worker.options(concurrency_group="io").remote(), timeout=30)
            for s in (first, second)
        ]
        assert workers[0]["pid"] != workers[1]["pid"]
        assert connect(ray_server).json("GET", "/v1")["sessions"] == 2
        # The GPU's two shares are taken: a third user is told at once, in one line.
        with pytest.raises(MedFMError, match="server is full"):
            RemoteSession(connect(ray_server), volume, "classic")
        # Each session is its own: a click in one leaves the other empty.
        object_id = first.add_object()
        first.add_point(object_id, centre)
        second.add_object()
        assert first.mask(1).sum() > 0 and second.mask(1).sum() == 0
    finally:
        first.close()
    # DELETE ends the actor at once and frees its share for the next user.
    wait_for(lambda: not actor_exists(first.session_id), 30, "the closed session's actor to end")
    wait_for(lambda: ray.available_resources().get("GPU", 0) >= SHARE, 30, "the GPU share to come free")
    third = RemoteSession(connect(ray_server), volume, "classic")
    third.close()
    # Left idle past its time to live, the second session's actor ends itself; its user's next click
    # uploads again and replays, unnoticed.
    expired = second.session_id
    wait_for(lambda: not actor_exists(expired), TTL_SECONDS + 30, "the idle actor to end itself")
    second.add_point(1, centre)
    assert second.reconnects == 1 and second.session_id != expired and second.mask(1).sum() > 0
    second.close()


def test_a_killed_session_actor_gets_410_and_the_client_rebuilds_the_same_state(ray_server):
    import ray

    volume, _, centre = sphere_volume("oblique_lps")
    local = Session(volume, create_engine("classic"))
    remote = RemoteSession(connect(ray_server), volume, "classic")
    try:
        for session in (local, remote):
            object_id = session.add_object()
            session.add_point(object_id, centre)
            session.add_point(object_id, nudge(volume, centre, 2, 1), positive=False)
            session.undo()
        lost = remote.session_id
        ray.kill(session_actor(lost))  # its node is lost, or it ran out of memory
        # The front end, which holds the actor's handle, answers 410 in one line ...
        status, reply = server_request(ray_server, "POST", f"/v1/sessions/{lost}/call",
                                       body=b'{"method": "redo", "args": {}}')  # fmt: skip
        assert status == 410 and reply["error"] == "SessionLost" and "upload again" in reply["message"]
        # ... and the client uploads again and replays its journal: the user sees nothing.
        for session in (local, remote):
            session.redo()
            session.add_point(1, nudge(volume, centre, -1, 1))
        assert remote.reconnects == 1 and remote.session_id != lost
        same_state(local, remote)
    finally:
        remote.close()


def test_serve_ray_alone_starts_a_cluster_and_sigterm_leaves_no_ray_process(tmp_path):
    """`medfm serve --ray` with no address starts its own cluster; `kill PID` stops it and everything it began."""
    server = ServerProcess(tmp_path, ["--models", "classic", "--ray"])
    server.start(wait=False)
    try:
        wait_until_serving(server, timeout=120)
        started = psutil.Process(server.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
        assert "gcs_server" in names and "raylet" in names
        volume, _, centre = sphere_volume("ras_aligned")
        remote = RemoteSession(connect(server), volume, "classic")
        remote.add_point(remote.add_object(), centre)
        assert remote.mask(1).sum() > 0
    except BaseException:
        server.stop()
        raise
    assert stop_gracefully(server, timeout=90) == 0
    log = server.log_text()
    assert "stopping" in log and "Traceback" not in log
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_serve_ray_without_a_cluster_at_the_address_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "MedFMLib.cli", "serve", "--models", "classic", "--ray", "127.0.0.1:1",
         "--token", SERVER_TOKEN],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Could not join the Ray cluster at 127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
