"""The model catalog: which models exist, what they take and under which licence.

The catalog is data (``catalog.json`` beside this file), not code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

CATALOG_PATH = Path(__file__).with_name("catalog.json")


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
    #: where the authors publish the checkpoint; None if no direct download exists
    url: str | None = None
    filename: str | None = None
    #: the SHA-256 the authors publish; None where they publish none (never invented)
    sha256: str | None = None
    sha256_note: str | None = None
    size: int | None = None
    download_note: str | None = None

    @property
    def needs_weights(self) -> bool:
        return self.engine != "classic"


def _parse_entry(entry: dict) -> ModelInfo:
    fields = set(ModelInfo.__dataclass_fields__)
    values = {k: v for k, v in entry.items() if k in fields}
    values["prompts"] = tuple(values.get("prompts", ()))
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
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"Cannot read the model catalog '{source}': {exc}; fix or unset the file.") from None


def load_catalog() -> dict[str, ModelInfo]:
    """Models by name: the packaged catalog, extended or overridden by the file in $MEDFM_CATALOG."""
    catalog = dict(read_catalog_file(CATALOG_PATH))
    extra = os.environ.get("MEDFM_CATALOG")
    if extra:
        catalog.update(read_catalog_file(Path(extra)))
    return catalog


def get_model_info(name: str) -> ModelInfo:
    catalog = load_catalog()
    if name not in catalog:
        raise ModelError(f"Unknown model '{name}': choose one of {', '.join(catalog)} (see `medfm models`).")
    return catalog[name]
