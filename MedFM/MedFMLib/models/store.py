"""The model store: where checkpoints live, how they arrive, and how they go.

Files live in ``$MEDFM_HOME/models`` (default: the platform's user cache
folder). A model is fetched on first use and kept until removed. Air-gapped
sites import files they obtained elsewhere. Custom checkpoints of a known
architecture (a fine-tuned SAM) are registered under a name of their own and
then work everywhere a catalog name does.

Where the authors publish no checksum, the catalog says so; MedFM then records
the SHA-256 of the file it received and verifies the file against that record
later, so silent corruption is still caught.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import ModelError
from ..home import default_home
from .catalog import ModelInfo, get_model_info, load_catalog
from .download import ProgressCallback, download, file_lock, sha256_of

REGISTRY_NAME = "registry.json"


class ModelStore:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.models_dir = self.home / "models"

    # --------------------------------------------------------------- registry
    def _registry_path(self) -> Path:
        return self.home / REGISTRY_NAME

    def _read_registry(self) -> dict:
        try:
            return json.loads(self._registry_path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"custom": {}, "hashes": {}}
        except ValueError:
            raise ModelError(f"{self._registry_path()} is damaged; delete it and import custom models again.") from None

    def _write_registry(self, registry: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        temporary = self._registry_path().with_suffix(".tmp")
        temporary.write_text(json.dumps(registry, indent=2), encoding="utf-8")
        os.replace(temporary, self._registry_path())

    def models(self) -> dict[str, ModelInfo]:
        """Catalog models plus custom ones registered in this store."""
        models = dict(load_catalog())
        for name, entry in self._read_registry()["custom"].items():
            models[name] = replace(
                get_model_info(entry["base"]),
                name=name,
                url=None,
                sha256=None,
                size=None,
                description=f"custom checkpoint of {entry['base']} architecture",
            )
        return models

    def info(self, name: str) -> ModelInfo:
        models = self.models()
        if name not in models:
            raise ModelError(f"Unknown model '{name}': choose one of {', '.join(models)} (see `medfm models list`).")
        return models[name]

    # ------------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        info = self.info(name)
        return self.models_dir / (info.filename or f"{name}.pth")

    def is_downloaded(self, name: str) -> bool:
        info = self.info(name)
        return not info.needs_weights or self.path(name).is_file()

    def checkpoint(self, name: str, progress: ProgressCallback | None = None, fetch: bool = True) -> Path | None:
        """The model's checkpoint file, downloading it first if needed (None for weight-free models)."""
        info = self.info(name)
        if not info.needs_weights:
            return None
        path = self.path(name)
        if path.is_file():
            return path
        if not fetch:
            raise ModelError(f"Model '{name}' is not downloaded yet; run `medfm models download {name}`.")
        return self.download(name, progress)

    def download(self, name: str, progress: ProgressCallback | None = None) -> Path:
        info = self.info(name)
        if not info.needs_weights:
            raise ModelError(f"Model '{name}' has no weights to download.")
        if not info.url:
            hint = f" {info.download_note}" if info.download_note else ""
            raise ModelError(
                f"Model '{name}' has no download address.{hint} Then run `medfm models import FILE --name {name}`."
            )
        path = download(info.url, self.path(name), sha256=info.sha256, expected_size=info.size, progress=progress)
        # download() has already checked a published hash; hash again only when there was none.
        self._record(name, info.sha256.lower() if info.sha256 else sha256_of(path))
        return path

    def _record(self, name: str, digest: str, custom: dict | None = None) -> None:
        """Remember a file's SHA-256 (and a custom model's entry) in the registry."""
        with file_lock(self.home / "registry.lock"):
            registry = self._read_registry()
            if custom is not None:
                registry["custom"][name] = custom
            registry["hashes"][name] = digest
            self._write_registry(registry)

    def import_file(self, source: str | Path, name: str, arch: str | None = None) -> Path:
        """Copy a checkpoint obtained elsewhere into the store, verified against the catalog's hash."""
        source = Path(source)
        if not source.is_file():
            raise ModelError(f"{source} does not exist or is not a file.")
        catalog = load_catalog()
        if arch is not None:
            if name in catalog:
                raise ModelError(f"'{name}' is a catalog model; give the custom checkpoint another name.")
            base = get_model_info(arch)
            if not base.needs_weights:
                raise ModelError(f"'{arch}' has no weights; give a SAM model's name as --arch, e.g. sam_vit_b.")
        elif name not in catalog:
            raise ModelError(
                f"'{name}' is not in the catalog; to add a custom checkpoint, give its architecture, "
                "e.g. --arch sam_vit_b."
            )
        info = catalog.get(name)
        actual = sha256_of(source)
        if info is not None and info.sha256 and actual != info.sha256.lower():
            raise ModelError(
                f"{source.name} is not the published {name} file (SHA-256 {actual[:12]}…, expected "
                f"{info.sha256[:12]}…); get the official file, or import it under another name with --arch."
            )
        self._record(name, actual, custom={"base": arch, "filename": f"{name}.pth"} if arch is not None else None)
        destination = self.path(name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(destination.name + ".part")
        shutil.copyfile(source, temporary)
        os.replace(temporary, destination)
        return destination

    def verify(self, name: str) -> tuple[bool, str]:
        """Check a stored file against the published hash, else against the one recorded on arrival."""
        info = self.info(name)
        if not info.needs_weights:
            return True, "no weights"
        path = self.path(name)
        if not path.is_file():
            return False, "not downloaded"
        actual = sha256_of(path)
        expected = info.sha256 or self._read_registry()["hashes"].get(name)
        if expected is None:
            return False, "no checksum to compare with (placed by hand?); import it again"
        if actual != expected.lower():
            return False, f"checksum mismatch (file {actual[:12]}…, expected {expected[:12]}…): download it again"
        source = "published" if info.sha256 else "recorded on arrival"
        return True, f"SHA-256 matches ({source})"

    def remove(self, name: str) -> bool:
        """Delete a model's file (and partial download). Returns whether anything was removed."""
        self.info(name)
        path = self.path(name)
        removed = False
        for candidate in (path, path.with_name(path.name + ".part")):
            if candidate.exists():
                candidate.unlink()
                removed = True
        with file_lock(self.home / "registry.lock"):
            registry = self._read_registry()
            registry["hashes"].pop(name, None)
            if name in registry["custom"]:
                del registry["custom"][name]
                removed = True
            self._write_registry(registry)
        return removed


def configure(home: str | Path | None = None, catalog: str | None = None) -> None:
    """Point this process at a models folder and an organisation catalog (the Slicer settings do this).

    Empty values leave what the environment says ($MEDFM_HOME, $MEDFM_CATALOG) in force.
    """
    from . import catalog as catalog_module

    if home:
        os.environ["MEDFM_HOME"] = str(Path(home).expanduser())
    if catalog:
        os.environ["MEDFM_CATALOG"] = str(catalog)
        catalog_module._fetched.pop(str(catalog), None)  # fetch an edited mirror catalog afresh
