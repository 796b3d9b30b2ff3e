"""Datasets to evaluate on, in the layouts the field uses; each label value is one object.

- A Medical Segmentation Decathlon / nnU-Net folder: ``imagesTr``/``labelsTr`` (or ``imagesTs``/
  ``labelsTs``), images named ``CASE_0000.ext`` and labels ``CASE.ext``.
- A CSV file with columns ``image,label``, paths relative to the CSV.
- A folder of CVPR 2025 challenge ``.npz`` files: ``imgs`` (D, H, W), ``gts``, ``spacing`` (x, y, z in
  millimetres, SimpleITK's order: the array's axes reversed) and optional ``boxes``.

A case is read only when it is evaluated, so one bad case is reported and the others go on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedFMError
from ..imaging.io import read_volume
from ..imaging.volume import Volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class CaseError(MedFMError):
    """A case that cannot be evaluated (unreadable, mismatched or empty label); the others go on."""


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path | None = None  # None: the image is a CVPR .npz file that holds both

    def load(self) -> tuple[Volume, np.ndarray]:
        """The image and its label map (K, J, I) on the image's grid; a CaseError says what is wrong."""
        try:
            if self.label is None:
                return _load_npz(self.image, self.name)
            volume, labels = read_volume(self.image), read_volume(self.label)
        except MedFMError as exc:
            raise CaseError(f"{self.name}: {exc}") from None
        if labels.array.shape != volume.array.shape:
            shapes = f"{labels.array.shape} is not the image's {volume.array.shape}"
            raise CaseError(f"{self.name}: the label's shape {shapes}.")
        if not np.allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-3):
            raise CaseError(f"{self.name}: the label's geometry (origin, spacing or axes) is not the image's.")
        return volume, _label_map(labels.array, self.name)


def _label_map(array: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.equal(np.mod(array, 1), 0)):
        raise CaseError(f"{name}: the label map holds fractional values; it must hold whole label numbers.")
    labels = array.astype(np.int32)
    if not (labels > 0).any():
        raise CaseError(f"{name}: the label map is empty; there is no object to evaluate.")
    return labels


def _load_npz(path: Path, name: str) -> tuple[Volume, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["imgs"], data["gts"]
            spacing = np.asarray(data["spacing"], dtype=np.float64).reshape(-1)
    except (OSError, ValueError, KeyError) as exc:
        raise CaseError(f"{name}: not a readable CVPR .npz file ({exc}); it needs imgs, gts and spacing.") from None
    if images.ndim != 3 or labels.shape != images.shape or spacing.shape != (3,) or not np.all(spacing > 0):
        raise CaseError(f"{name}: imgs and gts must be 3D arrays of one shape, and spacing three positive numbers.")
    matrix = np.diag([*spacing, 1.0])  # x, y, z spacing along I, J, K
    return Volume(images, matrix, name=name), _label_map(labels, name)


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES + (".npz",):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(dataset: str | Path) -> list[Case]:
    """The cases of a dataset folder or CSV, sorted by name; a layout MedFM does not know is one clear error."""
    dataset = Path(dataset)
    if not dataset.exists():
        raise MedFMError(f"{dataset} does not exist; give a dataset folder or a CSV file.")
    if dataset.is_file():
        if dataset.suffix.lower() != ".csv":
            raise MedFMError(f"{dataset} is a file but not a CSV; give a dataset folder or a CSV (image,label).")
        return _csv_cases(dataset)
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (dataset / images).is_dir() and (dataset / labels).is_dir():
            return _decathlon_cases(dataset / images, dataset / labels)
    npz = sorted(dataset.glob("*.npz"))
    if npz:
        return [Case(_strip_suffix(p.name), p) for p in npz]
    raise MedFMError(
        f"{dataset} is not a dataset MedFM knows: it needs imagesTr/labelsTr (or imagesTs/labelsTs), "
        "CVPR .npz files, or a CSV with columns image,label."
    )


def _decathlon_cases(images: Path, labels: Path) -> list[Case]:
    cases = []
    for image in sorted(p for p in images.iterdir() if p.name.endswith(IMAGE_SUFFIXES)):
        stem = _strip_suffix(image.name)
        name = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        label = next((labels / f"{name}{s}" for s in IMAGE_SUFFIXES if (labels / f"{name}{s}").is_file()), None)
        cases.append(Case(name, image, label if label is not None else labels / f"{name}.nii.gz"))
    if not cases:
        raise MedFMError(f"{images} holds no images (.nii.gz, .nrrd, .mha).")
    return cases


def _csv_cases(path: Path) -> list[Case]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise MedFMError(f"{path} needs a header with columns image and label, and one row per case.")
    cases = []
    for row in rows:
        image = (path.parent / row["image"]).resolve()
        label = (path.parent / row["label"]).resolve()
        cases.append(Case(_strip_suffix(image.name).removesuffix("_0000"), image, label))
    return cases
