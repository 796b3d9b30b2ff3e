"""Labelled slices embedded once by the frozen image encoder, kept on disk as float16 and memory-mapped.

Fine-tuning the decoder then costs decoder passes only: an epoch reads the cached features, never the
encoder. Each case has its own folder (``case0003/``): the features of each slice that holds a label
(one ``.npy`` per feature level), the objects' masks on the image the encoder saw (bit-packed) and their
low-res training targets. ``meta.json`` is written last, so a folder without it is redone, and an
interrupted run resumes at the first case not finished.

The slices are prepared exactly as an interactive session prepares them: the volume's intensity window,
square pixels where the engine prefers them, the model's own resizing and normalisation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedFMError
from ..evaluation.datasets import CaseError
from ..evaluation.protocols import SLICE_AXIS
from ..imaging.geometry import SlicePlane
from ..imaging.volume import Volume

#: bump when the layout of a case folder changes: old caches are then rebuilt, not misread
CACHE_FORMAT = 2
#: objects smaller than this on the encoded image are left out: nothing a user would prompt
MIN_OBJECT_PIXELS = 4


@dataclass(frozen=True)
class MemoryCase:
    """A case already in memory (segments in a Slicer scene, a server upload): the image and its label map."""

    name: str
    volume: Volume
    labels: np.ndarray

    def load(self) -> tuple[Volume, np.ndarray]:
        if self.labels.shape != self.volume.array.shape:
            raise CaseError(f"{self.name}: the label's shape {self.labels.shape} is not the image's "
                            f"{self.volume.array.shape}.")  # fmt: skip
        if not (self.labels > 0).any():
            raise CaseError(f"{self.name}: the label map is empty; there is no object to train on.")
        return self.volume, np.asarray(self.labels, dtype=np.int32)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.volume.fingerprint.encode())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()[:16]


def case_fingerprint(case) -> str:
    """What identifies a case's content cheaply: a file's name, size and time, or the arrays' hash."""
    if hasattr(case, "fingerprint"):
        return case.fingerprint()
    parts = []
    for path in (case.image, case.label):
        if path is not None and Path(path).exists():
            stat = Path(path).stat()
            parts.append(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingObject:
    """One object on one slice: where its features are; its mask on the encoded image and its low-res target
    are read from the memory-mapped cache when asked for, so a large dataset never sits in memory whole."""

    case: int
    slice: int  # index into the case's slices
    label: int
    source: CaseEmbeddings
    number: int  # index into the case's objects

    @property
    def mask(self) -> np.ndarray:
        """Bool, on the encoded image's grid."""
        return self.source.mask(self.number)

    @property
    def target(self) -> np.ndarray:
        """Float in [0, 1], on the decoder's low-res grid."""
        return np.asarray(self.source.targets[self.number], dtype=np.float32)


class CaseEmbeddings:
    """One case's cached slices, memory-mapped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        self.levels = [np.load(folder / f"features{n}.npy", mmap_mode="r") for n in range(self.meta["levels"])]
        self.targets = np.load(folder / "targets.npy", mmap_mode="r")
        self._bits = np.load(folder / "masks.npy", mmap_mode="r")
        images = folder / "images.npy"
        self.images = np.load(images, mmap_mode="r") if images.is_file() else None

    @property
    def slices(self) -> list[dict]:
        return self.meta["slices"]

    def features(self, index: int) -> list[np.ndarray]:
        return [np.asarray(level[index]) for level in self.levels]

    def image(self, index: int) -> np.ndarray:
        """The encoded image (float32) of a slice; kept only when the encoder trains too (LoRA)."""
        shape = self.slices[index]["shape"]
        return np.asarray(self.images[index, : shape[0], : shape[1]], dtype=np.float32)

    def mask(self, number: int) -> np.ndarray:
        entry = self.meta["objects"][number]
        rows, cols = self.slices[entry["slice"]]["shape"]
        bits = self._bits[entry["offset"] : entry["offset"] + (rows * cols + 7) // 8]
        return np.unpackbits(np.asarray(bits), count=rows * cols).reshape(rows, cols).astype(bool)

    def objects(self, case_index: int) -> list[TrainingObject]:
        return [TrainingObject(case_index, entry["slice"], entry["label"], self, number)
                for number, entry in enumerate(self.meta["objects"])]  # fmt: skip


class EmbeddingSet:
    """The cached embeddings of a list of cases, built on first use and reused after."""

    def __init__(self, folder: Path, cases: list[CaseEmbeddings]) -> None:
        self.folder = folder
        self.cases = cases
        self.objects = [obj for index, case in enumerate(cases) for obj in case.objects(index)]

    @property
    def slice_count(self) -> int:
        return sum(len(case.slices) for case in self.cases)

    def features(self, obj: TrainingObject) -> list[np.ndarray]:
        return self.cases[obj.case].features(obj.slice)

    def slice_info(self, obj: TrainingObject) -> dict:
        return self.cases[obj.case].slices[obj.slice]

    def image(self, obj: TrainingObject) -> np.ndarray:
        return self.cases[obj.case].image(obj.slice)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*.npy"))


def cache_key(engine, cases: Sequence, keep_images: bool) -> str:
    """Changes with the encoder's weights, the cases' content and the format: a stale cache is never read."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{engine.cache_id}|{keep_images}".encode())
    for case in cases:
        digest.update(f"|{case.name}:{case_fingerprint(case)}".encode())
    return digest.hexdigest()[:16]


def embed_cases(
    engine,
    cases: Sequence,
    folder: Path,
    keep_images: bool = False,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> EmbeddingSet:
    """Embed every labelled slice of ``cases`` into ``folder`` (reusing finished cases); a bad case is one error."""
    from ..interaction.session import Session

    folder.mkdir(parents=True, exist_ok=True)
    # Every case is read and checked before minutes of encoding, but only its slice list is kept: it is read
    # again when its turn comes (seconds, against minutes of encoding), so a dataset never sits in memory whole.
    pending: dict[int, list[int]] = {}
    for index, case in enumerate(cases):
        if not (folder / f"case{index:04d}" / "meta.json").is_file():
            _, labels = _load(case)
            pending[index] = [int(k) for k in np.flatnonzero(labels.any(axis=(1, 2)))]
    total, done = sum(len(slices) for slices in pending.values()), 0
    loaded = []
    for index, case in enumerate(cases):
        case_folder = folder / f"case{index:04d}"
        if index in pending:
            volume, labels = _load(case)
            _embed_case(engine, Session(volume, engine), labels, pending[index], case_folder, keep_images, progress,
                        done, total, stop)  # fmt: skip
            done += len(pending[index])
        loaded.append(CaseEmbeddings(case_folder))
    embedded = EmbeddingSet(folder, loaded)
    if not embedded.objects:
        raise MedFMError("The labels hold no object large enough to train on (each needs a few pixels on a slice).")
    return embedded


def _load(case) -> tuple[Volume, np.ndarray]:
    try:
        return case.load()
    except CaseError as exc:
        raise MedFMError(f"Cannot train on {exc}") from None


def _embed_case(engine, session, labels, slices, folder, keep_images, progress, done, total, stop) -> None:
    from ..imaging.geometry import extract_slice
    from ..imaging.resample import resize_linear

    if folder.exists():
        shutil.rmtree(folder)  # a case interrupted half-way is redone
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    slice_meta, objects, targets, bits, offset = [], [], [], [], 0
    level_files: list[np.ndarray] = []
    images_file = None
    for number, k in enumerate(slices):
        if stop is not None and stop():
            raise KeyboardInterrupt
        plane = SlicePlane(SLICE_AXIS, k)
        image = session.model_image(plane)
        embedding = engine.encode(image)
        features = embedding.features if isinstance(embedding.features, list) else [embedding.features]
        if not level_files:
            level_files = [np.lib.format.open_memmap(partial / f"features{n}.npy", "w+", np.float16,
                                                     (len(slices), *f.shape[1:]))
                           for n, f in enumerate(features)]  # fmt: skip
            if keep_images:
                largest = max(max(session.model_image_shape(SlicePlane(SLICE_AXIS, s))) for s in slices)
                images_file = np.lib.format.open_memmap(partial / "images.npy", "w+", np.float16,
                                                        (len(slices), largest, largest))  # fmt: skip
        for level, feature in zip(level_files, features):
            level[number] = feature[0].float().cpu().numpy().astype(np.float16)
        if images_file is not None:
            images_file[number, : image.shape[0], : image.shape[1]] = image
        input_size = [int(v) for v in embedding.extra["input_size"]]
        slice_meta.append({"k": k, "shape": list(image.shape), "input_size": input_size})
        plane_labels = extract_slice(labels, plane)
        for value in (int(v) for v in np.unique(plane_labels) if v > 0):
            mask = plane_labels == value
            if mask.shape != image.shape:
                mask = resize_linear(mask.astype(np.float32), image.shape) >= 0.5
            if mask.sum() < MIN_OBJECT_PIXELS:
                continue
            packed = np.packbits(mask.ravel())
            objects.append({"slice": number, "label": value, "offset": offset, "area": int(mask.sum())})
            bits.append(packed)
            offset += len(packed)
            targets.append(engine.low_res_target(mask, input_size).astype(np.float16))
        if progress is not None:
            progress(done + number + 1, total)
    for level in level_files:
        level.flush()
    if images_file is not None:
        images_file.flush()
    np.save(partial / "targets.npy", np.stack(targets) if targets else np.zeros((0, 1, 1), np.float16))
    np.save(partial / "masks.npy", np.concatenate(bits) if bits else np.zeros(0, np.uint8))
    meta = {"format": CACHE_FORMAT, "levels": len(level_files), "slices": slice_meta, "objects": objects}
    (partial / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    partial.rename(folder)
