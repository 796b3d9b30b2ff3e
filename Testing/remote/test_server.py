"""The server's security and robustness, against a real `medfm serve` process on 127.0.0.1.

Tokens, version checks, size limits, garbled and hostile payloads, clients
that disconnect, memory limits, expiry, TLS, and logs free of image data.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import MedFMLib.remote.client as client_module
from conftest import SERVER_TOKEN, ServerProcess, sphere_volume, upload_frame
from conftest import server_request as raw
from MedFMLib.errors import ModelError, PromptError, RemoteError
from MedFMLib.remote.client import RemoteSession, ServerConnection
from MedFMLib.remote.protocol import PROTOCOL_VERSION, encode_array, pack_frame


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    limits = ["--max-upload-mb", "2", "--max-session-mb", "64", "--cache-mb", "16"]
    process = ServerProcess(tmp_path_factory.mktemp("server"), limits)
    process.start()
    yield process
    process.stop()


def new_session(server) -> str:
    status, reply = raw(server, "POST", "/v1/sessions", upload_frame(np.zeros((4, 16, 16), np.int16)))
    assert status == 200, reply
    return reply["session"]


def call(server, session_id, method, args, **kwargs):
    body = json.dumps({"method": method, "args": args}).encode()
    return raw(server, "POST", f"/v1/sessions/{session_id}/call", body, **kwargs)


def test_the_server_describes_itself_with_its_models_and_version(server):
    status, info = raw(server, "GET", "/v1")
    assert status == 200
    assert info["server"] == "medfm" and info["protocol"] == PROTOCOL_VERSION
    assert [m["name"] for m in info["models"]] == ["classic"]
    assert info["models"][0]["state"] == "ready" and "license" in info["models"][0]
    assert info["limits"]["max_upload_mb"] == 2 and info["codecs"] == ["zstd", "zlib"]


def route_table() -> list[tuple[str, str]]:
    """Every (method, path) the server's app answers, read from the app itself, so a new route is covered too."""
    from MedFMLib.remote.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(token="t" * 32))
    app.state.queue.stop()
    routes = [(m, route.path) for route in app.routes for m in sorted(route.methods or ()) if m != "HEAD"]
    assert len(routes) >= 9  # /v1, sessions (create, close), call, encode, jobs (start, state, cancel), the schema
    return routes


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "needs a token"), ("wrong-token-0123456789", "Wrong token"), ("", "needs a token")],
)
def test_a_missing_or_wrong_token_is_refused_on_every_route(server, token, message):
    session_id = new_session(server)
    values = {"session_id": session_id, "job_id": "0"}
    for method, path in route_table():
        url = path.format(**values)
        body = b'{"method": "undo", "args": {}}' if method == "POST" else None
        status, reply = raw(server, method, url, body, token=token)
        assert status == 401, (method, path, status)
        assert message in reply["message"]
        # With the token the same request gets past the guard: the route is real and its path was filled in.
        assert raw(server, method, url, body)[0] != 401, (method, path)
        if method == "DELETE" and "jobs" not in path:
            session_id = new_session(server)
            values["session_id"] = session_id


def test_a_repeated_seq_gets_the_stored_reply_and_does_not_run_twice(server):
    """A client retrying after a lost reply sends the same seq: the action must not run again."""
    from MedFMLib.remote.protocol import unpack_frame

    session_id = new_session(server)
    path = f"/v1/sessions/{session_id}/call"

    def add(name: str, seq: int) -> tuple[int, bytes]:
        return raw(server, "POST", path, json.dumps({"seq": seq, "method": "add_object", "args": {"name": name}}))

    first, retried = add("first", 41), add("first", 41)
    assert first[0] == retried[0] == 200 and first[1] == retried[1]  # byte for byte the stored reply
    status, reply = add("second", 42)
    assert status == 200
    header, _ = unpack_frame(reply)
    assert [name for _, name, _ in header["objects"]] == ["first", "second"]  # "first" was made once


def test_the_client_reports_a_wrong_token_in_one_line(server):
    with pytest.raises(RemoteError, match="refused the token: Wrong token"):
        ServerConnection(server.url, "wrong-token-0123456789").check()


def test_versions_are_checked_both_ways(server, monkeypatch):
    status, reply = raw(server, "GET", "/v1", headers={"X-MedFM-Protocol": "999", "X-MedFM-Version": "9.0"})
    assert status == 426
    assert "protocol 999" in reply["message"] and "install the same MedFM version" in reply["message"]
    # A client of another protocol stops with a message naming both versions, before uploading anything.
    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    volume, _, _ = sphere_volume("ras_aligned")
    with pytest.raises(RemoteError, match="install the same"):
        RemoteSession(ServerConnection(server.url, SERVER_TOKEN), volume, "classic")


def test_oversized_requests_are_refused_before_they_are_read(server):
    big = upload_frame(np.random.default_rng(0).integers(-30000, 30000, (80, 128, 128), dtype=np.int16))
    assert len(big) > 2 * 2**20
    status, reply = raw(server, "POST", "/v1/sessions", big)
    assert status == 413 and "larger than" in reply["message"]
    session_id = new_session(server)
    huge_call = json.dumps({"method": "add_object", "args": {"name": "x" * 300_000}}).encode()
    status, reply = raw(server, "POST", f"/v1/sessions/{session_id}/call", huge_call)
    assert status == 413 and "0.25 MiB" in reply["message"]


def test_a_chunked_upload_without_a_length_is_limited_too(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    # A frame whose header declares 4 MiB of voxels, above the 2 MiB limit, then the voxels, chunked.
    meta = {"dtype": "uint8", "shape": [4, 1024, 1024], "codec": "zlib", "size": 4 * 2**20}
    spec = json.dumps({"model": "classic", "ijk_to_ras": np.eye(4).tolist(), "array": meta, "parts": [4 * 2**20]})
    frame_start = b"MFM1" + len(spec).to_bytes(4, "big") + spec.encode()
    chunks = iter([frame_start] + [b"\0" * 65536] * 64)
    connection.request(
        "POST", "/v1/sessions", body=chunks, encode_chunked=True,
        headers={"Authorization": f"Bearer {SERVER_TOKEN}", "Transfer-Encoding": "chunked"},
    )  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    connection.close()


def test_a_volume_above_the_session_memory_limit_is_refused_with_what_to_do(server):
    # 96 MiB of zeros compresses to well under the 2 MiB upload limit, but exceeds the 64 MiB session limit.
    status, reply = raw(server, "POST", "/v1/sessions", upload_frame(np.zeros((96, 1024, 512), np.int16)))
    assert status == 413
    assert "per-session limit" in reply["message"] and "--max-session-mb" in reply["message"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"\x00\x01garbage", 400, "not a MedFM frame"),
        (b"MFM1\x00\x00\x00\x05{bad}", 400, "not valid JSON"),
        (pack_frame({"model": "classic"}, [b"x"]), 422, "ijk_to_ras"),
        (upload_frame(np.zeros((2, 3, 4), np.int16))[:-3], 400, "truncated"),
        (upload_frame(np.zeros((2, 3, 4), bool)), 400, "not booleans"),
        (upload_frame(np.zeros((3, 4), np.int16)), 400, "3D array"),
        (upload_frame(np.zeros((2, 3, 4), np.int16), model="no_such_model"), 409, "does not offer"),
        (upload_frame(np.zeros((2, 3, 4), np.int16), window=[0, 40]), 400, "Window width"),
    ],
)
def test_garbled_uploads_get_a_clear_4xx(server, body, status, message):
    got, reply = raw(server, "POST", "/v1/sessions", body)
    assert got == status, reply
    assert message in reply["message"]


def test_a_zip_bomb_upload_is_refused(server):
    meta, blob = encode_array(np.zeros((64, 256, 256), np.uint8), "zstd")
    meta = dict(meta, shape=[1, 256, 256], size=256 * 256)
    frame = pack_frame({"model": "classic", "ijk_to_ras": np.eye(4).tolist(), "array": meta}, [blob])
    status, reply = raw(server, "POST", "/v1/sessions", frame)
    assert status == 400 and "more than" in reply["message"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be an object"),
        (b'{"method": "__class__", "args": {}}', 400, "Unknown method"),
        (b'{"method": "add_point", "args": {"object_id": 1, "ras": [1, 2]}}', 422, "ras"),
        (b'{"method": "add_point", "args": {"object_id": 1, "ras": [1, 2, NaN]}}', 422, "ras.2"),
        (b'{"method": "add_point", "args": {"object_id": 1, "ras": [1, 2, 3], "evil": 1}}', 422, "evil"),
        (b'{"method": "add_point", "args": {"object_id": 1, "ras": [1, 2, 3], "view": "oblique"}}', 422, "view"),
        (b'{"method": "add_point", "args": {"object_id": 99, "ras": [1, 2, 3]}}', 400, "no object 99"),
        (b'{"method": "add_point", "args": {"object_id": 1, "ras": [900, 2, 3]}}', 400, "outside"),
        (b'{"method": "apply_propagation", "args": {"result": 7}}', 400, "not on the server"),
        (b'{"method": "undo", "args": {}, "seq": "x"}', 400, "'seq'"),
    ],
)
def test_bad_calls_get_a_clear_4xx_and_change_nothing(server, body, status, message):
    session_id = new_session(server)
    assert call(server, session_id, "add_object", {})[0] == 200
    got, reply = raw(server, "POST", f"/v1/sessions/{session_id}/call", body)
    assert got == status, reply
    assert message in reply["message"]
    assert reply["message"].count("\n") == 0
    status, frame = call(server, session_id, "add_point", {"object_id": 1, "ras": [8, 8, 2]})
    assert status == 200  # the session still works


def test_an_unknown_session_is_404_with_what_to_do(server):
    status, reply = call(server, "no-such-session", "undo", {})
    assert status == 404 and "upload again" in reply["message"]


def test_the_server_survives_clients_that_disconnect_mid_request(server):
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SERVER_TOKEN.encode()
                + b"\r\nContent-Length: 100000\r\n\r\nMFM1\x00\x00"
            )  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /v1 HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    assert raw(server, "GET", "/v1")[0] == 200
    assert server.process.poll() is None


def test_the_log_holds_no_image_data_prompts_or_names(server):
    volume, _, centre = sphere_volume("oblique_lps")
    volume.name = "DOE^JANE_1970"
    remote = RemoteSession(ServerConnection(server.url, SERVER_TOKEN), volume, "classic")
    object_id = remote.add_object("Liver of DOE^JANE")
    remote.add_point(object_id, centre)
    remote.close()
    time.sleep(0.2)
    text = server.log_text()
    assert "DOE" not in text and "JANE" not in text
    assert f"{centre[0]:.3f}"[:6] not in text
    assert "Traceback" not in text  # 4xx answers are not logged as failures
    assert max(len(line) for line in text.splitlines()) < 300
    assert "session" in text and "classic" in text  # what an administrator needs is there


def test_the_total_memory_limit_refuses_new_sessions_while_full(start_server):
    server = start_server(["--max-total-mb", "40", "--max-session-mb", "30", "--cache-mb", "16"])
    # Admission needs the volume (5 MiB), a first mask (2.5 MiB) and room for the cache (16 MiB): 23.5 MiB.
    # A session then holds only what it uses, 5 MiB so far: 4 fit (15 + 23.5 <= 40), the 5th does not.
    frame = upload_frame(np.zeros((40, 256, 256), np.int16))
    first = raw(server, "POST", "/v1/sessions", frame)[1]["session"]
    for _ in range(3):
        assert raw(server, "POST", "/v1/sessions", frame)[0] == 200
    assert raw(server, "GET", "/v1")[1]["memory_mb"] == 20.0
    status, reply = raw(server, "POST", "/v1/sessions", frame)
    assert status == 503 and "server is full" in reply["message"] and "try again later" in reply["message"]
    assert raw(server, "DELETE", f"/v1/sessions/{first}")[1] == {"closed": True}
    assert raw(server, "POST", "/v1/sessions", frame)[0] == 200


def test_idle_sessions_expire(start_server):
    server = start_server(["--session-ttl", "0.5"])
    session_id = new_session(server)
    time.sleep(1.5)
    status, reply = call(server, session_id, "add_object", {})
    assert status == 404 and "expired" in reply["message"]
    assert raw(server, "GET", "/v1")[1]["sessions"] == 0


def test_a_token_is_generated_at_first_start_shown_once_and_kept(tmp_path):
    command = [sys.executable, "-m", "MedFMLib.cli", "serve", "--port", "1", "--max-batch", "0"]
    env = {"MEDFM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    # --max-batch 0 is refused after the token step, so the server does not stay up.
    first = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=env, timeout=60)
    token_file = tmp_path / "server_token"
    token = token_file.read_text(encoding="utf-8").strip()
    assert len(token) >= 32 and token in first.stdout and "shown this once" in first.stdout
    assert token_file.stat().st_mode & 0o777 == 0o600
    second = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=env, timeout=60)
    assert token not in second.stdout + second.stderr and "Using the token saved" in second.stdout
    assert second.stderr.strip().count("\n") == 0 and "medfm: error:" in second.stderr


def test_a_short_token_is_refused(tmp_path):
    command = [sys.executable, "-m", "MedFMLib.cli", "serve", "--token", "short"]
    result = subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", timeout=60, env={"MEDFM_HOME": str(tmp_path)}
    )
    assert result.returncode == 1 and "at least 16 characters" in result.stderr


def test_tls_with_the_servers_own_certificate(start_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = start_server(["--tls-cert", str(cert), "--tls-key", str(key)])
    assert server.url.startswith("https://")
    volume, truth, centre = sphere_volume("lps_anisotropic")
    remote = RemoteSession(ServerConnection(server.url, SERVER_TOKEN, ca_cert=str(cert)), volume, "classic")
    remote.add_point(remote.add_object(), centre)
    assert remote.mask(1).any()
    with pytest.raises(RemoteError, match="CA file"):
        ServerConnection(server.url, SERVER_TOKEN).check()  # not trusted without its CA
    with pytest.raises(RemoteError):
        ServerConnection(server.url.replace("https", "http"), SERVER_TOKEN, reconnect_seconds=1).check()


def test_client_errors_are_one_line_and_typed(server):
    volume, _, centre = sphere_volume("ras_aligned")
    connection = ServerConnection(server.url, SERVER_TOKEN)
    with pytest.raises(ModelError, match="does not offer 'sam_vit_h'"):
        RemoteSession(connection, volume, "sam_vit_h")
    remote = RemoteSession(connection, volume, "classic")
    with pytest.raises(PromptError, match="no object 5"):
        remote.add_point(5, centre)
    object_id = remote.add_object()
    with pytest.raises(PromptError, match="outside"):
        remote.add_point(object_id, centre + 500.0)
    with pytest.raises(PromptError, match="Nothing to propagate"):
        remote.propagate(object_id)
    assert not remote.mask(object_id).any()
    with pytest.raises(RemoteError, match="not a server address"):
        ServerConnection("gpu-server:8000", SERVER_TOKEN)
    with pytest.raises(RemoteError, match="Cannot reach the MedFM server"):
        ServerConnection("http://127.0.0.1:9", SERVER_TOKEN, reconnect_seconds=0.3).check()
    with pytest.raises(PromptError, match="Invalid 'bogus'"):
        remote._send("undo", {"bogus": 1})
