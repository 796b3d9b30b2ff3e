"""What a hostile client can no longer do to a real `medfm serve` on 127.0.0.1: each finding of the audit.

Memory is read from the server process's own /proc entry, threads too; limits are the server's defaults
unless a test says otherwise.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from conftest import SERVER_TOKEN, sphere_volume, upload_frame
from conftest import server_request as request
from MedFMLib.remote.client import RemoteSession, ServerConnection
from MedFMLib.remote.protocol import PROTOCOL_VERSION, pack_frame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's /proc entry (Linux)")


def proc_status(server, field: str) -> int:
    """A number from the server's /proc/PID/status (VmRSS and VmHWM in KiB, Threads)."""
    for line in open(f"/proc/{server.process.pid}/status", encoding="utf-8"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def session_of(server, shape=(8, 32, 32)) -> str:
    status, reply = request(server, "POST", "/v1/sessions", upload_frame(np.zeros(shape, np.int16)))
    assert status == 200, reply
    return reply["session"]


def call(server, session_id: str, method: str, args: dict, seq: int | None = None):
    body = json.dumps({"method": method, "args": args, **({} if seq is None else {"seq": seq})}).encode()
    return request(server, "POST", f"/v1/sessions/{session_id}/call", body)


# ------------------------------------------------------------------ 1. decompression bombs
@pytest.mark.parametrize("codec", ["zstd", "zlib"])
@pytest.mark.parametrize("shape", [[2, 2**63 - 1, 1], [65535, 42009217, 6700417], [4096, 4096, 4096]])
def test_a_bomb_with_a_wrapping_or_huge_shape_is_refused_before_decompressing(start_server, codec, shape):
    server = start_server()
    zeros = np.zeros((64, 1024, 1024), np.uint8).tobytes()  # 64 MiB of zeros: a few KiB compressed
    blob = zlib.compress(zeros, 9) if codec == "zlib" else __import__("zstandard").ZstdCompressor(19).compress(zeros)
    assert len(blob) < 2**20
    wrapped = int(np.prod(np.array(shape, dtype=np.int64)))  # what the old check computed: -2, -1, a huge number
    meta = {"dtype": "uint8", "shape": shape, "codec": codec, "size": wrapped}
    frame = pack_frame({"model": "classic", "ijk_to_ras": np.eye(4).tolist(), "array": meta}, [blob])
    before = proc_status(server, "VmRSS")
    status, reply = request(server, "POST", "/v1/sessions", frame)
    assert status in (400, 413), reply
    assert reply["message"].count("\n") == 0 and ("larger than" in reply["message"] or "limit" in reply["message"])
    # The stated bound: the server grew by less than the upload (1 MiB) plus 32 MiB of anything else.
    assert proc_status(server, "VmHWM") - before < 33 * 1024
    assert request(server, "GET", "/v1")[0] == 200


def test_a_server_that_sends_a_bomb_back_cannot_fill_the_clients_memory(tmp_path):
    """A hostile server (or someone on the path, over http): the client refuses before decompressing."""
    import resource
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    zeros = zlib.compress(b"\0" * (64 * 2**20), 9)

    class Hostile(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            models = [{"name": "classic", "state": "ready"}]
            self.reply(json.dumps({"server": "medfm", "protocol": PROTOCOL_VERSION, "codecs": ["zlib"],
                                   "models": models}).encode())  # fmt: skip

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/v1/sessions":
                self.reply(json.dumps({"session": "s" * 24, "model": "classic", "device": "cpu",
                                       "prompt_types": ["point"], "ttl_seconds": 60, "window": [400, 40]}).encode())
                return  # fmt: skip
            meta = {"dtype": "bool", "shape": [65535, 42009217, 6700417], "codec": "zlib", "size": 1}
            header = {"slices": [], "objects": [[1, "x", [1, 0, 0]]], "can_undo": True, "can_redo": False,
                      "regions": [{"object": 1, "start": [0, 0, 0], "mask": meta}]}  # fmt: skip
            self.reply(pack_frame(header, [zeros]), "application/x-medfm-frame")

    hostile = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        volume, _, centre = sphere_volume("ras_aligned")
        connection = ServerConnection(f"http://127.0.0.1:{hostile.server_address[1]}", SERVER_TOKEN)
        remote = RemoteSession(connection, volume, "classic")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with pytest.raises(Exception, match="larger than") as caught:
            remote.add_object()
        assert "\n" not in str(caught.value)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024
        # A reply larger than the client accepts is refused while it is read, not after.
        small = ServerConnection(f"http://127.0.0.1:{hostile.server_address[1]}", SERVER_TOKEN, max_reply_bytes=1024)
        small.info = connection.info
        with pytest.raises(Exception, match="larger than 0 MiB"):
            small.request("POST", "/v1/sessions/x/call", b"{}")
    finally:
        hostile.shutdown()
        hostile.server_close()


# ------------------------------------------------------------------ 3. connections
def test_hundreds_of_silent_or_dribbling_connections_do_not_lock_out_real_clients(start_server):
    server = start_server()
    hostile = []
    for index in range(300):
        sock = socket.create_connection(("127.0.0.1", server.port))
        if index % 2:
            sock.sendall(b"GET /v1 HTTP/1.1\r\n")  # a request head that never ends
        hostile.append(sock)
    try:
        stop = threading.Event()

        def dribble():  # one header line every second on every other connection
            while not stop.wait(1.0):
                for sock in hostile[1::2]:
                    try:
                        sock.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        pass

        threading.Thread(target=dribble, daemon=True).start()
        for _ in range(5):  # real clients are served while all of that is open
            started = time.monotonic()
            status, info = request(server, "GET", "/v1")
            assert status == 200 and info["server"] == "medfm"
            assert time.monotonic() - started < 5.0
            time.sleep(0.5)
        # Within the head deadline (10 s) every hostile connection has been closed by the server.
        time.sleep(11.0)
        stop.set()
        closed = 0
        for sock in hostile:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass  # still open: the server is waiting on it
            except ConnectionResetError:
                closed += 1
        assert closed == len(hostile)
    finally:
        for sock in hostile:
            sock.close()
    log = server.log_text()
    assert "Too many open files" not in log
    assert len(log.splitlines()) < 200  # no flood: repeated troubles are counted, not written


# ------------------------------------------------------------------ 4. jobs
def test_jobs_one_per_session_on_a_bounded_pool_and_calls_never_overlap_them(start_server):
    from MedFMLib.imaging.volume import Volume

    server = start_server(["--max-jobs", "2"])
    # A cylinder through 100 slices of 1024 x 1024: the classic model takes seconds to carry it through.
    array = np.zeros((100, 1024, 1024), np.int16)
    rows, cols = np.ogrid[:1024, :1024]
    array[:, (rows - 512) ** 2 + (cols - 512) ** 2 < 300**2] = 200
    big = RemoteSession(ServerConnection(server.url, SERVER_TOKEN), Volume(array, np.eye(4)), "classic")
    big.add_point(big.add_object(), [512.0, 512.0, 50.0])
    small_volume, _, centre = sphere_volume("ras_aligned")
    smalls = []
    for _ in range(2):
        remote = RemoteSession(ServerConnection(server.url, SERVER_TOKEN), small_volume, "classic")
        remote.add_point(remote.add_object(), centre)
        smalls.append(remote)
    jobs = "/v1/sessions/{}/jobs"
    body = json.dumps({"method": "plan_propagation", "args": {"object_id": 1}}).encode()
    request(server, "GET", "/v1")
    threads_before = proc_status(server, "Threads")
    status, first = request(server, "POST", jobs.format(big.session_id), body)
    assert status == 200, first
    refused = []

    def ask_again(count: int) -> None:
        refused.extend(request(server, "POST", jobs.format(big.session_id), body) for _ in range(count))

    askers = [threading.Thread(target=ask_again, args=(30,)) for _ in range(10)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(60)
    assert len(refused) == 300 and {status for status, _ in refused} == {409}
    assert "already running" in refused[0][1]["message"]
    # A call on a session whose job is running does not wait for it: it is told so at once.
    status, reply = call(server, big.session_id, "add_object", {})
    assert status == 409 and "propagation is running" in reply["message"]
    started = [request(server, "POST", jobs.format(s.session_id), body) for s in smalls]
    assert all(status == 200 for status, _ in started)
    # Threads: one request worker per concurrent asker (10) and two job threads at most, however many
    # jobs were asked for (the old server started a thread per request: 300 more).
    assert proc_status(server, "Threads") - threads_before <= 10 + 2 + 2
    deadline = time.monotonic() + 120
    # The big walk has shown what it had to; stopping it (as a user's Stop does) frees the session sooner.
    request(server, "DELETE", f"{jobs.format(big.session_id)}/{first['job']}")
    for remote, job in zip([big, *smalls], [first] + [reply for _, reply in started]):
        path = f"{jobs.format(remote.session_id)}/{job['job']}"
        while not (state := request(server, "GET", path)[1])["finished"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        if remote is big:  # stopped: a result (the slices done so far), not a failure
            assert "error" not in state and state["propagation"]["slices_written"] >= 0
        else:
            assert state["propagation"]["slices_written"] > 5
    assert call(server, big.session_id, "add_object", {})[0] == 200


def test_finished_jobs_nobody_collects_are_forgotten():
    from MedFMLib.remote.server.sessions import FINISHED_JOB_SECONDS, ServerSession

    served = ServerSession("id", session=None, model="classic")
    served.start_job(lambda progress, cancelled: "a result", executor=None)
    (job,) = served.jobs.values()
    assert job.wait(10)
    served.prune_jobs(now=job.finished_at + FINISHED_JOB_SECONDS - 1)
    assert len(served.jobs) == 1
    served.prune_jobs(now=job.finished_at + FINISHED_JOB_SECONDS + 1)
    assert not served.jobs


# ------------------------------------------------------------------ 5. memory
def test_forty_concurrent_uploads_never_pass_the_total_limit_together(start_server):
    server = start_server(["--max-total-mb", "200", "--max-session-mb", "100", "--cache-mb", "16"])
    frame = upload_frame(np.random.default_rng(0).integers(0, 1000, (80, 256, 256), dtype=np.int16))  # 10 MiB
    needed = 10 + 5 + 16  # the volume, a first mask, room for the cache (MiB)
    results = []
    barrier = threading.Barrier(40)

    def one():
        barrier.wait()
        results.append(request(server, "POST", "/v1/sessions", frame))

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    statuses = [status for status, _ in results]
    assert len(statuses) == 40 and set(statuses) <= {200, 503}, statuses
    assert all("server is full" in reply["message"] for status, reply in results if status == 503)
    # Uploads in progress hold their reservation (31 MiB) until their session exists (10 MiB): at least
    # 200 // 31 fit at once, and never more than the limit allows.
    served = statuses.count(200)
    assert 200 // needed <= served and (served - 1) * 10 + needed <= 200
    # Once they are in, sessions count what they hold: more fit, one at a time, up to the limit exactly.
    while request(server, "POST", "/v1/sessions", frame)[0] == 200:
        served += 1
    assert served == 17  # 16 x 10 + 31 <= 200 < 17 x 10 + 31
    assert request(server, "GET", "/v1")[1]["memory_mb"] == 170.0


def test_small_sessions_do_not_reserve_the_whole_cache_budget(start_server):
    """Default settings: 20 clients with small volumes are all served (each cache is charged as it fills)."""
    server = start_server()
    ids = [session_of(server, (24, 64, 64)) for _ in range(20)]
    assert len(set(ids)) == 20
    assert request(server, "GET", "/v1")[1]["memory_mb"] < 20  # 20 x 192 KiB volumes, nothing reserved ahead


def test_objects_prompts_and_undo_history_are_capped_and_counted(start_server):
    server = start_server(["--max-objects", "64", "--max-undo", "10"])
    session_id = session_of(server, (2, 1024, 1024))
    connection = ServerConnection(server.url, SERVER_TOKEN)  # one keep-alive connection for 2,000 requests
    body = json.dumps({"method": "add_object", "args": {}}).encode()
    made, refused = 0, []
    for _ in range(2000):
        try:
            connection.request("POST", f"/v1/sessions/{session_id}/call", body)
            made += 1
        except Exception as exc:  # noqa: BLE001 - the server's one line, as the client raises it
            refused.append(str(exc))
    assert made == 64 and len(refused) == 2000 - 64
    assert all("64 objects, the server's limit; apply or remove some first" in message for message in refused)
    base = request(server, "GET", "/v1")[1]["memory_mb"]  # the volume and 64 masks
    # A click on a 1024 x 1024 slice, then 40 moves of it: each move keeps the slice's earlier 1 MiB mask for undo.
    assert call(server, session_id, "add_point", {"object_id": 1, "ras": [100.0, 100.0, 0.0]})[0] == 200
    for index in range(40):
        ras = [101.0 + index, 100.0, 0.0]
        assert call(server, session_id, "move_prompt", {"object_id": 1, "prompt_id": 1, "ras": ras})[0] == 200
    grown = request(server, "GET", "/v1")[1]["memory_mb"] - base
    # Counted, and capped: the slice's embedding (a 4 MiB float image for the classic model) and 11 masks
    # (the slice's own and those of 10 undo steps); 41 steps would have kept 41.
    assert 4 + 11 - 1 <= grown <= 4 + 11 + 1


def test_a_large_upload_is_streamed_not_buffered_whole(start_server):
    limits = ["--max-upload-mb", "300", "--max-session-mb", "600", "--max-total-mb", "1200", "--cache-mb", "64"]
    server = start_server(limits)
    volume = np.random.default_rng(1).integers(-3000, 3000, (64, 1024, 1024), dtype=np.int16)  # 128 MiB
    frame = upload_frame(volume)
    before = proc_status(server, "VmRSS")
    status, reply = request(server, "POST", "/v1/sessions", frame)
    assert status == 200, reply
    peak = (proc_status(server, "VmHWM") - before) / 1024
    # The compressed upload and the volume, each once, plus the working space of decompression.
    assert peak < len(frame) / 2**20 + 128 + 48, peak


# ------------------------------------------------------------------ 7. logs and tokens
def test_logs_hold_short_session_ids_and_an_audit_trail(start_server):
    server = start_server(["--session-ttl", "1"])
    kept, closed = session_of(server), session_of(server)
    assert request(server, "DELETE", f"/v1/sessions/{closed}")[0] == 200
    call(server, kept, "add_object", {})
    time.sleep(2.5)  # the other one expires
    log = server.log_text()
    assert kept not in log and closed not in log  # a whole id would let a log reader take over the session
    assert f"session {closed[:6]} created: classic, volume 8x32x32 int16" in log
    assert f"session {closed[:6]} closed by its client" in log
    assert f"session {kept[:6]} expired" in log
    assert f"/v1/sessions/{kept[:6]}…/call 200" in log


def test_the_token_file_keeps_the_token_out_of_ps_and_token_warns(start_server, tmp_path):
    server = start_server()
    command_line = open(f"/proc/{server.process.pid}/cmdline", "rb").read()
    assert SERVER_TOKEN.encode() not in command_line and b"--token-file" in command_line
    import subprocess

    result = subprocess.run([sys.executable, "-m", "MedFMLib.cli", "serve", "--token", "short"], capture_output=True,
                            text=True, encoding="utf-8", timeout=60, env={"MEDFM_HOME": str(tmp_path)})  # fmt: skip
    assert "--token shows the token to every user" in result.stderr and "--token-file" in result.stderr


def test_the_client_warns_once_before_sending_the_token_in_clear(caplog):
    with caplog.at_level("WARNING", logger="medfm.client"):
        ServerConnection("http://gpu-server.invalid:8000", SERVER_TOKEN)
        ServerConnection("http://gpu-server.invalid:8000", SERVER_TOKEN)
        ServerConnection("http://127.0.0.1:8000", SERVER_TOKEN)
        ServerConnection("https://other.invalid:8000", SERVER_TOKEN)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "gpu-server.invalid unencrypted" in warnings[0]


# ------------------------------------------------------------------ the bounded load test
def test_twenty_clients_at_once_with_default_settings_are_all_served(start_server):
    server = start_server()
    volume, _, centre = sphere_volume("oblique_lps")
    sessions_before = request(server, "GET", "/v1")[1]["sessions"]
    failures, served = [], []
    deadline = time.monotonic() + 30

    def client(index: int) -> None:
        try:
            remote = RemoteSession(ServerConnection(server.url, SERVER_TOKEN), volume, "classic")
            object_id = remote.add_object()
            for step in range(4):
                remote.add_point(object_id, centre + [step * 0.5, 0, 0], positive=step != 3)
            remote.undo()
            assert remote.mask(object_id).any()
            served.append(remote.session_id)
            remote.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append((index, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert time.monotonic() < deadline + 1, "the load test took longer than 30 s"
    assert not failures and len(set(served)) == 20
    assert request(server, "GET", "/v1")[1]["sessions"] == sessions_before
    log = server.log_text()
    assert " 500 (" not in log and " 503 (" not in log and "Traceback" not in log
