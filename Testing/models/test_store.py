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

from MedFMLib.errors import ModelError
from MedFMLib.models.catalog import load_catalog
from MedFMLib.models.download import DownloadError, download
from MedFMLib.models.store import ModelStore

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


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device whose writes fail with ENOSPC")
def test_disk_full_says_so_and_keeps_nothing(server, tmp_path):
    # The partial file is a link to /dev/full, so the OS itself answers the first write with ENOSPC.
    (tmp_path / "m.pth.part").symlink_to("/dev/full")
    with pytest.raises(DownloadError, match="disk .* is full.*MEDFM_HOME"):
        download(url(server), tmp_path / "m.pth", sha256=DIGEST)
    assert not (tmp_path / "m.pth").exists()


def test_offline_is_named_as_such(tmp_path):
    # .invalid never resolves (RFC 6761): exactly what a computer without a network sees.
    with pytest.raises(DownloadError, match="cannot resolve models.invalid.*offline.*import the file"):
        download("http://models.invalid/model.pth", tmp_path / "m.pth", timeout=5)
    assert not (tmp_path / "m.pth").exists()


def _medfm(*args: str, env: dict) -> subprocess.CompletedProcess:
    medfm = str(Path(sys.executable).with_name("medfm"))
    return subprocess.run([medfm, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_models_list_shows_status_size_and_licence(server, tmp_path):
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(_catalog(tmp_path, server))}
    before = _medfm("models", "list", env=env)
    row = next(line for line in before.stdout.splitlines() if line.startswith("test_model"))
    assert row.split()[1:3] == ["not", "yet"] and "Apache-2.0" in row
    downloaded = _medfm("models", "download", "test_model", env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    after = _medfm("models", "list", env=env)
    row = next(line for line in after.stdout.splitlines() if line.startswith("test_model"))
    assert row.split()[1:4] == ["downloaded", "3.0", "MiB"], row
    assert "non-commercial" not in row and row.split()[4] == "yes"
    listed = {m["name"]: m for m in json.loads(_medfm("models", "list", "--json", env=env).stdout)}
    assert listed["test_model"]["downloaded"] is True and listed["sam_vit_b"]["downloaded"] is False
    removed = _medfm("models", "remove", "test_model", env=env)
    assert removed.returncode == 0 and not (tmp_path / "home" / "models" / "test_model.pth").exists()


class CatalogHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.server.document
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_organisation_catalog_from_a_url_and_its_offline_copy(server, tmp_path):
    """MEDFM_CATALOG may name an internal mirror's URL; its last good copy keeps MedFM working offline."""
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), CatalogHandler)
    mirror.document = _catalog(tmp_path, server).read_bytes()
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    catalog_url = f"http://127.0.0.1:{mirror.server_address[1]}/catalog.json"
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": catalog_url}
    online = _medfm("models", "download", "test_model", env=env)
    assert online.returncode == 0, online.stderr
    assert (tmp_path / "home" / "models" / "test_model.pth").read_bytes() == PAYLOAD
    mirror.shutdown()
    mirror.server_close()
    offline = _medfm("models", "list", env=env)
    assert offline.returncode == 0 and "test_model" in offline.stdout
    never_fetched = _medfm("models", "list", env={**env, "MEDFM_HOME": str(tmp_path / "elsewhere")})
    assert never_fetched.returncode == 1
    assert never_fetched.stderr.count("\n") == 1 and "Cannot fetch the model catalog" in never_fetched.stderr


def test_configure_points_the_store_and_catalog_elsewhere(server, tmp_path, monkeypatch):
    """What the Slicer settings do: a models folder under Slicer's settings and an organisation catalog."""
    from MedFMLib.models.store import configure

    for variable in ("MEDFM_HOME", "MEDFM_CATALOG"):  # recorded, so the test's changes are undone after it
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    configure(home=tmp_path / "SlicerSettings" / "MedFM", catalog=str(_catalog(tmp_path, server)))
    store = ModelStore()
    assert store.home == tmp_path / "SlicerSettings" / "MedFM"
    assert "test_model" in store.models()
    configure(home="", catalog="")  # empty settings change nothing
    assert ModelStore().home == store.home
