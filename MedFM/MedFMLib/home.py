"""Where MedFM keeps its files on this machine: models, catalog copies, the server's token."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_home() -> Path:
    """$MEDFM_HOME, else the platform's user cache folder."""
    configured = os.environ.get("MEDFM_HOME")
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "MedFM" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "MedFM"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medfm"
