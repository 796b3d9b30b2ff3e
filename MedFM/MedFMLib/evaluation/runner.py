"""Run a protocol over a dataset and keep every figure: results.json and .csv, summary.md, predictions.

Each case gets a fresh session (local, or on a server); the final masks are written in the image's own
geometry under ``predictions/``, so anyone can recompute the figures. ``resume`` skips cases already done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import MedFMError
from .datasets import Case, CaseError, find_cases
from .protocols import PROTOCOLS, run_cvpr25, run_ritm
from .simulator import BOX_SEED, CLICK_SEED


def evaluate(
    dataset: str | Path | list[Case],
    out: str | Path,
    session_factory: Callable,
    model: str,
    device: str,
    protocol: str = "cvpr25",
    clicks: int | None = None,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Evaluate every case; ``session_factory(volume)`` makes the session a simulated user works in."""
    if protocol not in PROTOCOLS:
        raise MedFMError(f"Unknown protocol '{protocol}': use {' or '.join(PROTOCOLS)}.")
    # A list of cases: a split of a dataset (fine-tuning's validation cases); named by count, not by file.
    cases = list(dataset) if isinstance(dataset, list) else find_cases(dataset)
    dataset = f"{len(cases)} cases" if isinstance(dataset, list) else dataset
    out = Path(out)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = _read(path) if resume and path.is_file() else None
    if results is None or results.get("protocol") != protocol or results.get("model") != model:
        results = {"medfm": __version__, "model": model, "device": device, "protocol": protocol,
                   "seeds": {"box": BOX_SEED, "click": CLICK_SEED}, "dataset": str(dataset), "cases": {}}  # fmt: skip
    done = {name for name, case in results["cases"].items() if "objects" in case}
    for index, case in enumerate(cases, 1):
        if case.name in done:
            continue
        if progress is not None:
            progress(case.name, index, len(cases))
        results["cases"][case.name] = _evaluate_case(case, out, session_factory, protocol, clicks, progress)
        _write(path, results)  # after every case: an interrupted run resumes where it stopped
    from .report import write_reports

    write_reports(out, results)
    return results


def _evaluate_case(case: Case, out: Path, session_factory, protocol, clicks, progress) -> dict:
    from ..imaging.io import write_labelmap

    started = time.perf_counter()
    try:
        volume, labels = case.load()
    except CaseError as exc:
        return {"error": str(exc)}
    session = session_factory(volume)
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if progress is not None:
            progress(case.name, -1, steps[0])

    try:
        if protocol == "cvpr25":
            objects, final = run_cvpr25(session, volume, labels, clicks if clicks is not None else 5, on_step=on_step)
        else:
            objects, final = run_ritm(session, volume, labels, clicks if clicks is not None else 20, on_step=on_step)
    except MedFMError as exc:
        return {"error": f"{case.name}: {exc}"}
    finally:
        if hasattr(session, "close"):
            session.close()
    write_labelmap(out / "predictions" / f"{case.name}.nii.gz", final.astype(np.uint16), volume)
    return {
        "image": str(getattr(case, "image", case.name)),
        "objects": {str(o.label): {"steps": o.steps, **o.summary} for o in objects},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, results: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1), encoding="utf-8")
    temporary.replace(path)
