"""Downloads from a real HTTP server on 127.0.0.1: resume, checksums, errors, concurrency; import and removal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from MedFMLib.catalog import load_catalog
from MedFMLib.download import DownloadError, download
from MedFMLib.errors import ModelError
from MedFMLib.store import ModelStore

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.cut_first_after: int | None = None  # drop the first full transfer after this many bytes


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: FileServer = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path != "/model.pth":
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_first_after is not None and start == 0:
            self.wfile.write(body[: server.cut_first_after])
            server.cut_first_after = None
            self.wfile.flush()
            self.connection.shutdown(2)  # the network drops mid-transfer
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path="/model.pth") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_download_streams_with_progress_and_verifies(server, tmp_path):
    seen = []
    path = download(url(server), tmp_path / "m.pth", sha256=DIGEST, progress=seen.append)
    assert path.read_bytes() == PAYLOAD
    assert seen[-1].bytes_done == seen[-1].bytes_total == len(PAYLOAD)
    assert all(p.bytes_per_second > 0 for p in seen) and len(seen) >= 3
    assert not (tmp_path / "m.pth.part").exists()
    # Only the request itself: no telemetry calls.
    assert [p for p, _ in server.requests] == ["/model.pth"]


def test_interrupted_download_resumes(server, tmp_path):
    server.cut_first_after = 1 << 20
    with pytest.raises(DownloadError, match="resumes"):
        download(url(server), tmp_path / "m.pth", sha256=DIGEST)
    partial = tmp_path / "m.pth.part"
    assert partial.stat().st_size == 1 << 20 and not (tmp_path / "m.pth").exists()
    download(url(server), tmp_path / "m.pth", sha256=DIGEST)
    assert (tmp_path / "m.pth").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/model.pth", f"bytes={1 << 20}-")


def test_checksum_mismatch_deletes_the_file(server, tmp_path):
    with pytest.raises(DownloadError, match="Checksum mismatch.*deleted"):
        download(url(server), tmp_path / "m.pth", sha256="0" * 64)
    assert list(tmp_path.glob("m.pth*")) in ([], [tmp_path / "m.pth.lock"])


def test_not_found_and_server_down(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(url(server, "/missing.pth"), tmp_path / "m.pth")
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DownloadError, match="refused the connection"):
        download(f"http://127.0.0.1:{port}/model.pth", tmp_path / "m.pth")


def _catalog(tmp_path, server, sha256=DIGEST) -> Path:
    entry = {
        "name": "test_model", "engine": "sam", "arch": "vit_b", "task": "general", "prompts": ["point"],
        "license": "Apache-2.0", "commercial_use": True, "homepage": "https://example.invalid",
        "url": url(server), "sha256": sha256, "filename": "test_model.pth",
    }  # fmt: skip
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": [entry]}))
    return path


def test_two_processes_download_once(server, tmp_path):
    catalog = _catalog(tmp_path, server)
    env = {**os.environ, "MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)}
    medfm = str(Path(sys.executable).with_name("medfm"))
    workers = [
        subprocess.Popen([medfm, "models", "download", "test_model"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert (tmp_path / "home" / "models" / "test_model.pth").read_bytes() == PAYLOAD
    assert len(server.requests) == 1  # the second process waited for the lock and found the file


def test_store_import_verify_remove(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server)))
    store = ModelStore(tmp_path / "home")
    assert not store.is_downloaded("test_model")
    elsewhere = tmp_path / "copy.pth"
    elsewhere.write_bytes(PAYLOAD)
    path = store.import_file(elsewhere, "test_model")
    assert path.read_bytes() == PAYLOAD and store.is_downloaded("test_model")
    assert store.verify("test_model") == (True, "SHA-256 matches (published)")
    path.write_bytes(PAYLOAD[:-1] + b"x")  # silent corruption on disk
    ok, message = store.verify("test_model")
    assert not ok and "mismatch" in message
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not the model")
    with pytest.raises(ModelError, match="not the published test_model"):
        store.import_file(wrong, "test_model")
    # A custom checkpoint of a known architecture, usable by name.
    store.import_file(wrong, "my_finetune", arch="sam_vit_b")
    assert store.info("my_finetune").arch == "vit_b" and store.is_downloaded("my_finetune")
    assert store.verify("my_finetune")[0]
    assert store.remove("my_finetune") and "my_finetune" not in store.models()
    assert store.remove("test_model") and not store.is_downloaded("test_model")
    with pytest.raises(ModelError, match="not in the catalog"):
        store.import_file(wrong, "unknown_name")


def test_first_use_downloads_through_the_store(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server, sha256=None)))
    store = ModelStore(tmp_path / "home")
    seen = []
    path = store.checkpoint("test_model", progress=seen.append)
    assert path.read_bytes() == PAYLOAD and seen
    # No published checksum: the hash recorded on arrival guards the file from now on.
    assert store.verify("test_model") == (True, "SHA-256 matches (recorded on arrival)")
    assert store.checkpoint("test_model") == path and len(server.requests) == 1


def test_catalog_entries_have_valid_download_fields():
    for name, info in load_catalog().items():
        if not info.needs_weights:
            continue
        assert info.filename, name
        assert info.url is None or info.url.startswith("https://"), name
        assert info.url or info.download_note, name
        assert info.sha256 is None or len(info.sha256) == 64, name
        assert info.sha256 or info.sha256_note, name  # never an invented checksum, but say so
        assert info.license and info.citation, name
