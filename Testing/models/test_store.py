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
OTHER_PAYLOAD = os.urandom(1 << 20)
OTHER_DIGEST = hashlib.sha256(OTHER_PAYLOAD).hexdigest()


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.files = {"/model.pth": PAYLOAD, "/other.pth": OTHER_PAYLOAD}
        self.cut_first_after: int | None = None  # drop the first full transfer after this many bytes


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: FileServer = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in server.files:
            self.send_error(404)
            return
        payload = server.files[self.path]
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
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
                         stderr=subprocess.PIPE, text=True, encoding="utf-8")
        for _ in range(2)
    ]  # fmt: skip
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert (tmp_path / "home" / "models" / "test_model" / "test_model.pth").read_bytes() == PAYLOAD
    assert len(server.requests) == 1  # the second process waited for the lock and found the file


def test_store_import_verify_remove(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server)))
    store = ModelStore(tmp_path / "home")
    assert not store.is_ready("test_model")
    elsewhere = tmp_path / "copy.pth"
    elsewhere.write_bytes(PAYLOAD)
    path = store.import_file(elsewhere, "test_model")
    assert path.read_bytes() == PAYLOAD and store.is_ready("test_model")
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
    assert store.info("my_finetune").arch == "vit_b" and store.is_ready("my_finetune")
    assert store.verify("my_finetune")[0]
    assert store.remove("my_finetune") and "my_finetune" not in store.models()
    assert store.remove("test_model") and not store.is_ready("test_model")
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
        assert info.url or info.package or info.download_note, name
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
    return subprocess.run(
        [medfm, *args], env={**os.environ, **env}, capture_output=True, text=True, encoding="utf-8", timeout=120
    )


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
    assert "non-commercial" not in row and row.split()[4:7] == ["slice", "yes", "point"]
    listed = {m["name"]: m for m in json.loads(_medfm("models", "list", "--json", env=env).stdout)}
    assert listed["test_model"]["downloaded"] is True and listed["sam_vit_b"]["downloaded"] is False
    removed = _medfm("models", "remove", "test_model", env=env)
    assert removed.returncode == 0 and not (tmp_path / "home" / "models" / "test_model" / "test_model.pth").exists()


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
    pin = hashlib.sha256(mirror.document).hexdigest()  # plain http needs the catalog's hash pinned
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": catalog_url, "MEDFM_CATALOG_SHA256": pin}
    online = _medfm("models", "download", "test_model", env=env)
    assert online.returncode == 0, online.stderr
    assert (tmp_path / "home" / "models" / "test_model" / "test_model.pth").read_bytes() == PAYLOAD
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


# ------------------------------------------------------------ a file is never used unverified
def _entry(name: str, server, path: str, sha256: str | None, filename: str) -> dict:
    return {
        "name": name, "engine": "sam", "arch": "vit_b", "task": "general", "prompts": ["point"],
        "license": "Apache-2.0", "commercial_use": True, "homepage": "https://example.invalid",
        "url": url(server, path), "sha256": sha256, "filename": filename,
    }  # fmt: skip


def _write_catalog(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"models": list(entries)}))
    return path


def test_two_entries_with_the_same_file_name_each_get_their_own_verified_file(server, tmp_path):
    """An organisation catalog where `a` and `b` share a file name but not a hash: `b` is never served `a`'s file."""
    catalog = _write_catalog(
        tmp_path / "org.json",
        _entry("a", server, "/model.pth", DIGEST, "model.pth"),
        _entry("b", server, "/other.pth", OTHER_DIGEST, "model.pth"),
    )
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)}
    assert _medfm("models", "download", "a", env=env).returncode == 0
    result = _medfm("models", "download", "b", env=env)
    assert result.returncode == 0, result.stderr
    assert [p for p, _ in server.requests] == ["/model.pth", "/other.pth"]  # b was fetched, not taken from a
    store = ModelStore(tmp_path / "home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDFM_CATALOG", str(catalog))
        assert store.checkpoint("a", fetch=False).read_bytes() == PAYLOAD
        assert store.checkpoint("b", fetch=False).read_bytes() == OTHER_PAYLOAD
        assert store.verify("a") == (True, "SHA-256 matches (published)")
        assert store.verify("b") == (True, "SHA-256 matches (published)")


def test_an_entry_whose_address_serves_another_file_is_refused_and_keeps_nothing(server, tmp_path, monkeypatch):
    # `b` publishes its own hash but its address serves `a`'s bytes: the download fails, `a` is untouched.
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(
        tmp_path / "org.json",
        _entry("a", server, "/model.pth", DIGEST, "model.pth"),
        _entry("b", server, "/model.pth", OTHER_DIGEST, "model.pth"),
    )))  # fmt: skip
    store = ModelStore(tmp_path / "home")
    store.download("a")
    with pytest.raises(DownloadError, match="Checksum mismatch"):
        store.download("b")
    assert not store.is_ready("b") and not store.path("b").exists()
    with pytest.raises(ModelError, match="not downloaded yet; run `medfm models download b`"):
        store.checkpoint("b", fetch=False)
    assert store.checkpoint("a", fetch=False).read_bytes() == PAYLOAD


def test_an_organisation_override_of_a_shipped_entry_replaces_the_shipped_file(server, tmp_path, monkeypatch):
    """sam_vit_b arrived from the shipped catalog; the organisation's catalog then names another file and hash."""
    monkeypatch.delenv("MEDFM_CATALOG", raising=False)
    store = ModelStore(tmp_path / "home")
    shipped = tmp_path / "sam_vit_b_01ec64.pth"
    shipped.write_bytes(PAYLOAD)
    store.import_file(shipped, "sam_vit_b")  # as a download from the shipped address would leave it
    assert store.is_ready("sam_vit_b")
    overridden = dict(
        vars(load_catalog()["sam_vit_b"]), url=url(server, "/other.pth"), sha256=OTHER_DIGEST, size=len(OTHER_PAYLOAD)
    )
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(tmp_path / "org.json", overridden)))
    state = store.state("sam_vit_b")
    assert (state.ready, state.label) == (False, "mismatch")
    assert "not the one its catalog entry publishes" in state.message
    with pytest.raises(ModelError, match="Cannot use model 'sam_vit_b'.*medfm models download sam_vit_b"):
        store.checkpoint("sam_vit_b", fetch=False)
    assert store.checkpoint("sam_vit_b").read_bytes() == OTHER_PAYLOAD  # on first use: the organisation's file
    assert store.verify("sam_vit_b") == (True, "SHA-256 matches (published)")


def test_an_override_of_the_address_alone_makes_the_recorded_file_stale(server, tmp_path, monkeypatch):
    # No published hash: the hash recorded on arrival vouches only for the address it came from.
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server, sha256=None)))
    store = ModelStore(tmp_path / "home")
    store.download("test_model")
    assert store.verify("test_model") == (True, "SHA-256 matches (recorded on arrival)")
    moved = _entry("test_model", server, "/other.pth", None, "test_model.pth")
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(tmp_path / "org.json", moved)))
    assert store.state("test_model").label == "stale"
    assert store.download("test_model").read_bytes() == OTHER_PAYLOAD
    assert store.is_ready("test_model") and [p for p, _ in server.requests] == ["/model.pth", "/other.pth"]


def test_a_file_changed_on_disk_or_placed_by_hand_is_not_used(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server, sha256=None)))
    store = ModelStore(tmp_path / "home")
    path = store.download("test_model")
    path.write_bytes(PAYLOAD[:-1] + b"x")  # changed after it was verified: hashed again, and refused
    assert store.state("test_model").label == "mismatch"
    with pytest.raises(ModelError, match="checksum mismatch.*medfm models download test_model"):
        store.checkpoint("test_model", fetch=False)
    assert store.checkpoint("test_model").read_bytes() == PAYLOAD  # first use fetches this entry's file again
    # Placed by hand, with no published hash and no record: nothing vouches for it.
    (tmp_path / "home" / "registry.json").unlink()
    state = store.state("test_model")
    assert (state.ready, state.label) == (False, "unverified") and "medfm models import" in state.message
    with pytest.raises(ModelError, match="placed by hand"):
        store.checkpoint("test_model", fetch=False)


def test_a_file_from_the_old_flat_layout_is_adopted_only_if_it_is_the_entrys(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server)))
    store = ModelStore(tmp_path / "home")
    store.models_dir.mkdir(parents=True)
    (store.models_dir / "test_model.pth").write_bytes(OTHER_PAYLOAD)  # someone else's file under this name
    assert not store.is_ready("test_model") and (store.models_dir / "test_model.pth").exists()
    (store.models_dir / "test_model.pth").write_bytes(PAYLOAD)
    assert store.is_ready("test_model")
    assert store.path("test_model").read_bytes() == PAYLOAD and not (store.models_dir / "test_model.pth").exists()
    assert server.requests == []


@pytest.mark.parametrize("filename", ["/tmp/pwned.pth", "../../escaped.pth", "sub/dir.pth", ".hidden"])
def test_a_catalog_file_name_never_leaves_the_models_folder(server, tmp_path, monkeypatch, filename):
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(
        tmp_path / "org.json", _entry("evil", server, "/model.pth", DIGEST, filename)
    )))  # fmt: skip
    store = ModelStore(tmp_path / "home")
    with pytest.raises(ModelError, match="unsafe file name"):
        store.download("evil")
    with pytest.raises(ModelError, match="unsafe file name"):
        store.remove("evil")
    assert server.requests == [] and not list(tmp_path.rglob("*.pth"))


def test_a_download_of_another_size_than_the_catalog_says_is_deleted(server, tmp_path):
    with pytest.raises(DownloadError, match=f"Downloaded {len(PAYLOAD)} bytes.*catalog says {len(PAYLOAD) + 1}"):
        download(url(server), tmp_path / "m.pth", expected_size=len(PAYLOAD) + 1)
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "m.pth.part").exists()


def test_models_verify_fails_on_a_damaged_file(server, tmp_path):
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(_catalog(tmp_path, server))}
    assert _medfm("models", "download", "test_model", env=env).returncode == 0
    good = _medfm("models", "verify", env=env)
    assert good.returncode == 0 and "test_model: OK" in good.stdout
    damaged = tmp_path / "home" / "models" / "test_model" / "test_model.pth"
    damaged.write_bytes(PAYLOAD[:-1] + b"x")
    bad = _medfm("models", "verify", env=env)
    assert bad.returncode == 1 and "test_model: FAILED: checksum mismatch" in bad.stdout
    assert bad.stderr.count("\n") == 1 and "failed verification" in bad.stderr
    listed = _medfm("models", "list", env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("test_model"))
    assert row.split()[1] == "mismatch" and "test_model: checksum mismatch" in listed.stdout


# ------------------------------------------------------------ files stay inside the models folder
@pytest.mark.parametrize(
    ("field", "value"),
    [("filename", "/home/someone/pwned.pth"), ("filename", "../../escaped.pth"), ("name", "../../../elsewhere/x")],
)
def test_a_catalog_entry_that_points_outside_is_refused_when_the_catalog_loads(server, tmp_path, field, value):
    entry = dict(_entry("evil", server, "/model.pth", DIGEST, "evil.pth"), **{field: value})
    catalog = _write_catalog(tmp_path / "org.json", entry)
    for command in (["models", "list"], ["models", "download", "evil"], ["models", "remove", "--all"]):
        result = _medfm(*command, env={"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)})
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"unsafe {'file name' if field == 'filename' else 'name'} {value!r}" in result.stderr
    assert server.requests == [] and not list(tmp_path.rglob("*.pth"))


def test_a_link_out_of_the_models_folder_is_not_followed(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server)))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "test_model.pth").write_bytes(b"someone else's file")
    store = ModelStore(tmp_path / "home")
    store.models_dir.mkdir(parents=True)
    (store.models_dir / "test_model").symlink_to(outside, target_is_directory=True)
    for action in (store.download, store.remove, store.verify):
        with pytest.raises(ModelError, match="outside the models folder"):
            action("test_model")
    assert (outside / "test_model.pth").read_bytes() == b"someone else's file" and server.requests == []


def test_remove_deletes_only_files_the_store_wrote(server, tmp_path):
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(_catalog(tmp_path, server))}
    placed = tmp_path / "home" / "models" / "test_model" / "test_model.pth"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"put here by hand")
    one = _medfm("models", "remove", "test_model", env=env)
    assert one.returncode == 1 and "not put there by MedFM" in one.stderr and placed.exists()
    every = _medfm("models", "remove", "--all", env=env)
    assert every.returncode == 1 and "test_model: kept" in every.stdout and placed.exists()
    placed.unlink()
    assert _medfm("models", "download", "test_model", env=env).returncode == 0
    assert _medfm("models", "remove", "--all", env=env).returncode == 0 and not placed.exists()


def test_a_custom_checkpoint_never_replaces_the_official_file(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_catalog(tmp_path, server)))
    store = ModelStore(tmp_path / "home")
    official = store.download("test_model")
    custom = tmp_path / "finetuned.pth"
    custom.write_bytes(b"my own weights")
    imported = store.import_file(custom, "my_finetune", arch="test_model")
    assert imported != official and imported.read_bytes() == b"my own weights"
    assert official.read_bytes() == PAYLOAD and store.verify("test_model") == (True, "SHA-256 matches (published)")
    assert store.verify("my_finetune")[0]


def test_a_remote_catalog_must_be_https_or_pinned(tmp_path):
    document = _write_catalog(tmp_path / "org.json", {"name": "x", "engine": "classic", "arch": "-", "task": "-",
                              "license": "-", "commercial_use": True, "homepage": "-"}).read_bytes()  # fmt: skip
    mirror = ThreadingHTTPServer(("127.0.0.1", 0), CatalogHandler)
    mirror.document = document
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    catalog_url = f"http://127.0.0.1:{mirror.server_address[1]}/catalog.json"
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": catalog_url}
    try:
        plain = _medfm("models", "list", env=env)
        assert plain.returncode == 1 and plain.stderr.count("\n") == 1
        assert "use an https:// address, or pin the catalog's SHA-256 in MEDFM_CATALOG_SHA256" in plain.stderr
        wrong = _medfm("models", "list", env={**env, "MEDFM_CATALOG_SHA256": "0" * 64})
        assert wrong.returncode == 1 and "does not match MEDFM_CATALOG_SHA256" in wrong.stderr
        assert not (tmp_path / "home" / "catalogs").exists() or not any((tmp_path / "home" / "catalogs").iterdir())
        pinned = _medfm("models", "list", env={**env, "MEDFM_CATALOG_SHA256": hashlib.sha256(document).hexdigest()})
        assert pinned.returncode == 0 and "\nx " in pinned.stdout
    finally:
        mirror.shutdown()
        mirror.server_close()


# ------------------------------------------------------------ a model that is a folder (nnInteractive)
def _folder_entry(server, companions=("plans.json", "dataset.json")) -> dict:
    return dict(
        _entry("folder_model", server, "/model.pth", DIGEST, "checkpoint_final.pth"), engine="nninteractive",
        subfolder="fold_0", companions=[{"path": name, "url": url(server, f"/{name}")} for name in companions],
    )  # fmt: skip


def test_a_model_folder_downloads_its_companion_files_and_each_is_checked(server, tmp_path, monkeypatch):
    server.files.update({"/plans.json": b'{"plans": 1}', "/dataset.json": b'{"labels": {}}'})
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(tmp_path / "org.json", _folder_entry(server))))
    store = ModelStore(tmp_path / "home")
    assert store.state("folder_model").label == "not downloaded"
    path = store.checkpoint("folder_model")
    folder = tmp_path / "home" / "models" / "folder_model"
    assert path == folder / "fold_0" / "checkpoint_final.pth" and path.read_bytes() == PAYLOAD
    assert (folder / "plans.json").read_bytes() == b'{"plans": 1}' and store.is_ready("folder_model")
    (folder / "plans.json").write_text('{"plans": 2}')  # changed after it arrived
    state = store.state("folder_model")
    assert not state.ready and state.label == "mismatch" and "plans.json" in state.message
    (folder / "plans.json").unlink()
    assert store.state("folder_model").label == "incomplete"
    store.download("folder_model")  # the weights are kept (verified); only what is missing comes again
    assert store.is_ready("folder_model")
    assert [r for r, _ in server.requests].count("/model.pth") == 1
    assert store.remove("folder_model") and not folder.exists()


def test_importing_a_model_folder_copies_every_file_it_needs(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(_write_catalog(tmp_path / "org.json", _folder_entry(server))))
    source = tmp_path / "nnInteractive_v1.0"
    (source / "fold_0").mkdir(parents=True)
    (source / "fold_0" / "checkpoint_final.pth").write_bytes(PAYLOAD)
    (source / "plans.json").write_text("{}")
    store = ModelStore(tmp_path / "home")
    with pytest.raises(ModelError, match="lacks dataset.json"):
        store.import_file(source, "folder_model")
    (source / "dataset.json").write_text("{}")
    store.import_file(source, "folder_model")
    assert store.is_ready("folder_model") and server.requests == []
    (source / "fold_0" / "checkpoint_final.pth").write_bytes(OTHER_PAYLOAD)
    with pytest.raises(ModelError, match="not the published folder_model file"):
        store.import_file(source, "folder_model")


def test_a_companion_path_that_leaves_the_model_folder_is_refused(server, tmp_path):
    entry = _folder_entry(server, companions=("../../outside.json",))
    catalog = _write_catalog(tmp_path / "org.json", entry)
    result = _medfm("models", "download", "folder_model",
                    env={"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)})  # fmt: skip
    assert result.returncode == 1 and "unsafe companion path" in result.stderr and server.requests == []
