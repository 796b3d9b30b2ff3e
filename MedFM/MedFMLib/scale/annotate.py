"""`medfm annotate`: pre-segment every case of a dataset, one ``.seg.nrrd`` per case, and a summary.

The per-case steps (``load_case``, ``segment_case``, ``write_case``) are the same functions whether the cases
run here, one after another (``annotate_local``), or on a Ray cluster (``annotate_ray``): the two give the
same files.

Prompts come from one of three places:

* a prompts CSV (``--prompts``), one prompt per row, in RAS millimetres::

      case,object,kind,r,a,s,r2,a2,s2
      liver_003,tumour,box,-20.5,14,-102,12,40,-60
      liver_003,tumour,point,-3.2,27.5,-80,,,
      liver_003,tumour,negative,4,22,-80,,,

  ``case`` is a case name of the dataset (an image ``liver_003_0000.nii.gz`` is case ``liver_003``); rows of
  one case and ``object`` make one segment, named after the object. ``kind`` is ``point`` (a positive click),
  ``negative`` (a negative click) or ``box`` (two opposite corners: r,a,s and r2,a2,s2). A box whose corners
  lie on different slices of the view (``--view``, default axial) is a 3D box, segmented slice by slice within
  its range; on one slice it is a 2D box. Empty lines and lines whose first cell starts with ``#`` are skipped.
* the dataset's own (coarse) labels (``--boxes-from-labels``): per label value, the tight 3D box of its voxels,
  its corners mapped through the image's IJK→RAS matrix. Segments are named from the dataset's
  ``dataset.json`` "labels" when it has one (MSD or nnU-Net), else ``label N``.
* class prompts (``--class liver,spleen`` or ``--class everything``) for models that take them (VISTA3D).

A slice model (the SAM family, classic) segments a 3D box slice by slice from its middle outwards; clicks and
2D boxes give their slices, and ``--propagate`` carries those through the volume. A 3D model (nnInteractive,
VISTA3D) takes every prompt as it is (a box from labels: a 2D box on the object's median slice).

``OUT/summary.csv`` has a row per case: status (done, failed or skipped), segments, volume in mL, seconds,
the model, the output file and, for a failed case, the reason in one line. It is rewritten after every case,
so that ``--resume`` after an interruption skips the cases done (their file must exist) and redoes the rest.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..console import note
from ..errors import MedFMError
from ..evaluation.datasets import IMAGE_SUFFIXES, Case, CaseError, find_cases
from ..imaging.io import SegmentData, read_volume, write_segmentation
from ..imaging.volume import Volume

if TYPE_CHECKING:
    from ..engines.base import Engine
    from ..engines.volumetric import VolumeEngine

    AnyEngine = Union[Engine, VolumeEngine]

SUMMARY = "summary.csv"
SUMMARY_FIELDS = ("case", "status", "segments", "volume_ml", "seconds", "model", "output", "reason")
DONE, FAILED, SKIPPED = "done", "failed", "skipped"
PROMPT_KINDS = ("point", "negative", "box")
#: MedFM's environment a worker of a cluster needs to find the same models as this process
WORKER_ENV = ("MEDFM_HOME", "MEDFM_CATALOG", "MEDFM_CATALOG_SHA256")
_COLORS = [(0.95, 0.35, 0.25), (0.25, 0.65, 0.95), (0.40, 0.85, 0.35), (0.95, 0.80, 0.25), (0.75, 0.45, 0.90),
           (0.30, 0.85, 0.80)]  # fmt: skip


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class ObjectPrompts:
    """One segment's prompts in a prompts CSV: clicks (RAS, positive) and boxes (two RAS corners)."""

    name: str
    points: list[tuple[tuple[float, float, float], bool]] = field(default_factory=list)
    boxes: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = field(default_factory=list)


def read_prompts(path: str | Path) -> dict[str, list[ObjectPrompts]]:
    """The prompts CSV, by case name, objects in the order they first appear; a bad row is one clear error."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in ("case", "object", "kind", "r", "a", "s") if c not in header]
            if missing:
                raise MedFMError(f"{path} needs a header with columns case,object,kind,r,a,s,r2,a2,s2 (missing: "
                                 f"{','.join(missing)}).")  # fmt: skip
            reader.fieldnames = header
            cases: dict[str, dict[str, ObjectPrompts]] = {}
            for row in reader:
                line = reader.line_num
                values = {key: (value or "").strip() for key, value in row.items() if key is not None}
                if not any(values.values()) or values.get("case", "").startswith("#"):
                    continue
                _add_prompt(cases, values, f"{path.name} line {line}")
    except OSError as exc:
        raise MedFMError(f"Cannot read the prompts file {path} ({exc.strerror or exc}).") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedFMError(f"{path} is not a readable CSV file ({exc}).") from None
    if not cases:
        raise MedFMError(f"{path} holds no prompts; give one row per point or box (case,object,kind,r,a,s,...).")
    return {case: list(objects.values()) for case, objects in cases.items()}


def _add_prompt(cases: dict, values: dict[str, str], where: str) -> None:
    case, name, kind = values.get("case", ""), values.get("object", ""), values.get("kind", "").lower()
    if not case or not name:
        raise MedFMError(f"{where}: the case and object columns must not be empty.")
    if kind not in PROMPT_KINDS:
        raise MedFMError(f"{where}: kind '{values.get('kind', '')}' is not one of {', '.join(PROMPT_KINDS)}.")
    columns = ("r", "a", "s", "r2", "a2", "s2") if kind == "box" else ("r", "a", "s")
    try:
        numbers = [float(values.get(column) or "nan") for column in columns]
    except ValueError:
        numbers = [float("nan")]
    if not np.all(np.isfinite(numbers)):
        what = "r,a,s and r2,a2,s2 (two corners)" if kind == "box" else "r,a,s"
        raise MedFMError(f"{where}: a {kind} needs numbers in millimetres in {what}.")
    target = cases.setdefault(case, {}).setdefault(name, ObjectPrompts(name))
    if kind == "box":
        target.boxes.append((tuple(numbers[:3]), tuple(numbers[3:])))
    else:
        target.points.append((tuple(numbers), kind == "point"))


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class AnnotationJob:
    """What to annotate and how: everything a worker on a cluster needs, and nothing that is not plain data."""

    dataset: str
    out: str
    model: str
    mode: str  # prompts, labels or classes
    prompts: dict[str, list[ObjectPrompts]] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    propagate: bool = False
    view: str = "axial"
    checkpoint: str | None = None
    device: str = "auto"
    runtime: str = "auto"
    fast: bool = False
    zoom: bool | None = None
    resume: bool = False
    #: the full-size network with random weights (benchmarks: the masks mean nothing, the time does)
    random_weights: bool = False
    #: segment names of label values (dataset.json)
    label_names: dict[int, str] = field(default_factory=dict)
    #: MEDFM_* variables of this process: a cluster's workers did not start with them
    env: dict[str, str] = field(default_factory=dict)

    @property
    def needs_labels(self) -> bool:
        return self.mode == "labels"

    def create_engine(self, progress=None, notify=None) -> AnyEngine:
        """The job's engine (loaded once per process or actor), on this process's MedFM home and catalog."""
        from ..engines import create_engine
        from ..models.store import ModelStore

        return create_engine(self.model, checkpoint=self.checkpoint, device=self.device, store=ModelStore(),
                             random_weights=self.random_weights, progress=progress, runtime=self.runtime,
                             fast=self.fast, notify=notify, zoom=self.zoom)  # fmt: skip


def worker_env() -> dict[str, str]:
    """The MedFM variables set here, paths made absolute: what Ray workers must see to find the same models."""
    env = {}
    for name in WORKER_ENV:
        value = os.environ.get(name)
        if value:
            is_path = name != "MEDFM_CATALOG_SHA256" and not value.startswith(("http://", "https://"))
            env[name] = str(Path(value).expanduser().resolve()) if is_path else value
    return env


def label_names(dataset: str | Path) -> dict[int, str]:
    """Names of label values from ``dataset.json`` beside the data (MSD: {"1": "liver"}; nnU-Net: {"liver": 1})."""
    dataset = Path(dataset)
    path = (dataset if dataset.is_dir() else dataset.parent) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels", {})
    except (OSError, ValueError, AttributeError) as exc:
        note(f"{path} is not readable JSON ({exc}); segments are named 'label N'")
        return {}
    names = {}
    for key, value in (labels.items() if isinstance(labels, dict) else []):
        if str(key).strip().isdigit() and isinstance(value, str):
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2; region lists are not values
            names[value] = str(key)
    names.pop(0, None)
    return names


# ---------------------------------------------------------------------------------------------- cases
def find_annotation_cases(dataset: str | Path, needs_labels: bool) -> list[dict]:
    """The dataset's cases as plain rows (case, image, label, npz), absolute paths (workers run elsewhere).

    Any layout `medfm evaluate` reads; without labels also a folder of images (or its imagesTr/imagesTs), or a
    CSV with an ``image`` column only.
    """
    dataset = Path(dataset)
    try:
        rows = [{"case": c.name, "image": str(Path(c.image).resolve()), "npz": c.label is None,
                 "label": str(Path(c.label).resolve()) if c.label is not None else ""}
                for c in find_cases(dataset)]  # fmt: skip
    except MedFMError:
        if needs_labels or not dataset.exists():
            raise
        rows = [{"case": _case_name(p.name), "image": str(p.resolve()), "npz": False, "label": ""}
                for p in _unlabelled_images(dataset)]  # fmt: skip
    seen: set[str] = set()
    for row in rows:
        if row["case"] in seen:
            raise MedFMError(f"{dataset} has two images of case {row['case']}; each case needs a name of its own.")
        seen.add(row["case"])
    return rows


def _unlabelled_images(dataset: Path) -> list[Path]:
    if dataset.is_file():  # a CSV without a label column
        with open(dataset, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "image" not in rows[0]:
            raise MedFMError(f"{dataset} needs a header with a column image (and label), and one row per case.")
        images = [(dataset.parent / row["image"]).resolve() for row in rows]
    else:
        folder = next((dataset / sub for sub in ("imagesTr", "imagesTs") if (dataset / sub).is_dir()), dataset)
        images = sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES))
        if not images:
            raise MedFMError(f"{dataset} holds no images (.nii.gz, .nrrd, .mha) and is no dataset MedFM knows.")
    return images


def _case_name(filename: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.removesuffix("_0000")


def load_case(row: dict, needs_labels: bool) -> tuple[Volume, np.ndarray | None]:
    """A case's image, and its label map when the prompts come from it; a CaseError says what is wrong."""
    name, image = row["case"], Path(row["image"])
    if row["npz"]:
        volume, labels = Case(name, image).load()
        return volume, labels if needs_labels else None
    if needs_labels:
        if not row["label"]:
            raise CaseError(f"{name}: the case has no label file to take boxes from.")
        return Case(name, image, Path(row["label"])).load()
    try:
        return read_volume(image), None
    except MedFMError as exc:
        raise CaseError(f"{name}: {exc}") from None


# ---------------------------------------------------------------------------------------------- segmenting
def segment_case(engine: AnyEngine, volume: Volume, labels: np.ndarray | None, objects: list[ObjectPrompts] | None,
                 job: AnnotationJob) -> list[SegmentData]:  # fmt: skip
    """One case's segments, from the job's kind of prompts: the same function in this process and on Ray."""
    if job.mode == "classes":
        return _class_segments(engine, volume, job.classes)
    volumetric = getattr(engine, "kind", "slice") == "volume"
    if volumetric:
        from ..interaction.volume_session import VolumeSession

        session = VolumeSession(volume, engine)
    else:
        from ..interaction.session import Session

        session = Session(volume, engine)
    try:
        if job.mode == "labels":
            if labels is None:
                raise CaseError("the case has no label map to take boxes from.")
            return _boxes_from_labels(session, volume, labels, job.label_names, volumetric)
        return [_prompted_object(session, volume, index, obj, job, volumetric)
                for index, obj in enumerate(objects or [])]  # fmt: skip
    finally:
        if volumetric:
            session.close()


def label_box(mask: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """The tight box (k0, k1, j0, j1, i0, i1) of a non-empty (K, J, I) mask, bounds included."""
    k, j, i = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    return int(k[0]), int(k[-1]), int(j[0]), int(j[-1]), int(i[0]), int(i[-1])


def _boxes_from_labels(session, volume: Volume, labels: np.ndarray, names: dict[int, str],
                       volumetric: bool) -> list[SegmentData]:  # fmt: skip
    from ..evaluation.protocols import CHALLENGE_BOX, SLICE_AXIS

    segments = []
    for value in sorted(int(v) for v in np.unique(labels) if v > 0):
        mask = labels == value
        k0, k1, j0, j1, i0, i1 = label_box(mask)
        color = _COLORS[(value - 1) % len(_COLORS)]
        object_id = session.add_object(names.get(value, f"label {value}"), color=color)
        if volumetric:
            # As the challenge prompts a 3D model: a 2D box around the object on its median slice.
            slices = np.flatnonzero(mask.any(axis=(1, 2)))
            median = int(slices[len(slices) // 2])
            rows, cols = np.nonzero(mask[median])
            corner_a = _ras(volume, median, rows.min(), cols.min())
            session.set_box(object_id, corner_a, _ras(volume, median, rows.max(), cols.max()), view=SLICE_AXIS)
        else:
            # The box's slice range is the object's, as in the challenge: the walk goes on to the range's end.
            corners = [_ras(volume, k, j, i) for k in (k0, k1) for j in (j0, j1) for i in (i0, i1)]
            session.set_roi(object_id, corners, view=SLICE_AXIS, options=CHALLENGE_BOX)
        obj = session.objects[object_id]
        segments.append(SegmentData(obj.name, obj.mask.copy(), obj.color))
    return segments


def _ras(volume: Volume, k: float, j: float, i: float) -> np.ndarray:
    return volume.ijk_to_ras_points(np.array([i, j, k], dtype=np.float64))


def _prompted_object(session, volume: Volume, index: int, obj: ObjectPrompts, job: AnnotationJob,
                     volumetric: bool) -> SegmentData:  # fmt: skip
    """One object of a prompts CSV, prompted as `medfm segment` prompts it."""
    from ..imaging.geometry import resolve_axis

    for corners in obj.boxes:
        for corner in corners:
            volume.require_inside(np.asarray(corner), f"box corner of {obj.name}")
    for ras, _ in obj.points:
        volume.require_inside(np.asarray(ras), f"point of {obj.name}")
    object_id = session.add_object(obj.name, color=_COLORS[index % len(_COLORS)])
    axis = resolve_axis(volume.ijk_to_ras, job.view)

    def spans_slices(box) -> bool:
        ijk = volume.ras_to_ijk_points(np.array(box))
        return int(np.rint(ijk[0, axis])) != int(np.rint(ijk[1, axis]))

    three_d = [box for box in obj.boxes if spans_slices(box)]
    if three_d and len(obj.boxes) > 1:
        raise MedFMError(f"object {obj.name}: a 3D box (corners on different slices) goes alone; give several "
                         "boxes each on one slice.")  # fmt: skip
    if three_d:
        session.set_roi(object_id, list(three_d[0]), view=job.view)
    for number, (corner_a, corner_b) in enumerate([] if three_d else obj.boxes):
        session.set_box(object_id, corner_a, corner_b, view=job.view, keep_other_slices=volumetric or number > 0)
    for ras, positive in obj.points:
        session.add_point(object_id, ras, positive=positive, view=job.view)
    if job.propagate and not volumetric and not three_d:  # a 3D box was carried through its range already
        session.propagate(object_id, "both", view=job.view)
    result = session.objects[object_id]
    return SegmentData(result.name, result.mask.copy(), result.color)


def _class_segments(engine, volume: Volume, classes: tuple[str, ...]) -> list[SegmentData]:
    """One named segment per class, in one sliding-window pass (as `medfm segment --class` does)."""
    engine.set_volume(volume)
    masks = engine.segment_classes(list(classes))
    colors = getattr(engine, "class_colors", {}) or {}
    return [SegmentData(name, mask, tuple(float(c) for c in colors.get(name.lower(), (0.8, 0.8, 0.2))))
            for name, mask in masks.items()]  # fmt: skip


def check_classes(model: str, classes: tuple[str, ...]) -> None:
    """Before any work: the model takes class prompts, and knows these names."""
    from ..engines.volumetric import class_table
    from ..models.store import ModelStore

    info = ModelStore().info(model)
    if "class" not in info.prompts:
        raise MedFMError(f"{model} takes no class prompts; give --prompts or --boxes-from-labels instead.")
    table = class_table(info.engine)

    def normal(name: str) -> str:
        return " ".join(str(name).replace("_", " ").lower().split())

    known = {normal(entry["name"]) for entry in table["labels"]} | {normal(g) for g in table["groups"]}
    unknown = [c for c in classes if normal(c) not in known | {"everything"}]
    if known and unknown:
        raise MedFMError(f"{model} has no class {', '.join(unknown)}; see `medfm models info {model}` for its classes.")


# ---------------------------------------------------------------------------------------------- writing
def output_name(case: str) -> str:
    return f"{case}.seg.nrrd"


def write_case(out: str | Path, case: str, segments: list[SegmentData], volume: Volume) -> Path:
    """Write the case's segments under a temporary name, then rename: a crash never leaves a finished-looking file."""
    out = Path(out)
    final = out / output_name(case)
    partial = out / f".{case}.{os.getpid()}.partial.seg.nrrd"
    try:
        write_segmentation(partial, segments, volume)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def measure(segments: list[SegmentData], ijk_to_ras: np.ndarray) -> tuple[int, float]:
    """How many segments, and their volume in mL (each segment counted; overlaps count twice)."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(ijk_to_ras)[:3, :3]))) / 1000.0
    return len(segments), round(sum(int(np.count_nonzero(s.mask)) for s in segments) * voxel_ml, 3)


def summary_row(case: str, status: str, model: str, segments: int = 0, volume_ml: float = 0.0,
                seconds: float = 0.0, output: str = "", reason: str = "") -> dict:  # fmt: skip
    return {"case": case, "status": status, "segments": int(segments), "volume_ml": float(volume_ml),
            "seconds": round(float(seconds), 3), "model": model, "output": output, "reason": reason}  # fmt: skip


def failure_reason(exc: BaseException, case: str) -> str:
    """One line for the summary: the user's error as it is, anything else named as internal."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, MedFMError):
        return text.removeprefix(f"{case}: ")
    return f"internal error ({type(exc).__name__}: {text})"


def read_summary(out: str | Path) -> list[dict]:
    path = Path(out) / SUMMARY
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def write_summary(out: str | Path, rows: list[dict]) -> Path:
    """summary.csv, replaced whole (a temporary file renamed): a reader never sees half of it."""
    path = Path(out) / SUMMARY
    temporary = path.with_name(f".{SUMMARY}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in SUMMARY_FIELDS} for row in rows)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """The cases in the dataset's order, those still to do, and the summary rows known so far."""

    job: AnnotationJob
    cases: list[dict]
    todo: list[dict]
    rows: dict[str, dict]

    def record(self, row: dict) -> None:
        """Keep a case's row and rewrite summary.csv: an interrupted run resumes from here."""
        self.rows[row["case"]] = row
        write_summary(self.job.out, self.ordered())

    def ordered(self) -> list[dict]:
        return [self.rows[c["case"]] for c in self.cases if c["case"] in self.rows]


def plan(job: AnnotationJob) -> Plan:
    """Find the cases, check the prompts name only known cases, and (``resume``) set aside the finished ones."""
    cases = find_annotation_cases(job.dataset, job.needs_labels)
    if job.mode == "prompts":
        names = {c["case"] for c in cases}
        unknown = sorted(set(job.prompts) - names)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
            example = f", e.g. {min(names)}" if names else ""
            raise MedFMError(f"The prompts name case(s) the dataset does not have: {shown} (cases are named as the "
                             f"images without _0000 and suffix{example}).")  # fmt: skip
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    finished = {}
    if job.resume:
        for row in read_summary(out):
            if row.get("status") in (DONE, SKIPPED) and row.get("output") and row.get("model") == job.model and \
                    (out / row["output"]).is_file():  # fmt: skip
                finished[row["case"]] = row
    rows, todo = {}, []
    for case in cases:
        name = case["case"]
        if name in finished:
            rows[name] = dict(finished[name], status=SKIPPED, reason="finished in an earlier run")
        elif job.mode == "prompts" and name not in job.prompts:
            rows[name] = summary_row(name, SKIPPED, job.model, reason="no prompts for this case")
        else:
            todo.append(case)
    result = Plan(job, cases, todo, rows)
    write_summary(out, result.ordered())
    return result


# ---------------------------------------------------------------------------------------------- in-process
def annotate_case(engine: AnyEngine, case: dict, job: AnnotationJob) -> dict:
    """Load, segment and write one case; any failure is the case's row, never the run's end."""
    started = time.perf_counter()
    name = case["case"]
    try:
        volume, labels = load_case(case, job.needs_labels)
        segments = segment_case(engine, volume, labels, job.prompts.get(name), job)
        written = write_case(job.out, name, segments, volume)
    except Exception as exc:  # noqa: BLE001 - one bad case is recorded, and the others go on
        return summary_row(name, FAILED, job.model, seconds=time.perf_counter() - started,
                           reason=failure_reason(exc, name))  # fmt: skip
    count, millilitres = measure(segments, volume.ijk_to_ras)
    return summary_row(name, DONE, job.model, count, millilitres, time.perf_counter() - started, written.name)


def annotate_local(run: Plan, progress: Callable[[int, int], None] | None = None,
                   engine: AnyEngine | None = None) -> list[dict]:  # fmt: skip
    """Every case still to do, one after another in this process, with one engine loaded once."""
    job = run.job
    if run.todo and engine is None:
        from ..console import ProgressBar

        engine = job.create_engine(progress=ProgressBar(), notify=note)
    total = len(run.cases)
    done = total - len(run.todo)
    if progress is not None:
        progress(done, total)
    for case in run.todo:
        run.record(annotate_case(engine, case, job))
        done += 1
        if progress is not None:
            progress(done, total)
    return run.ordered()
