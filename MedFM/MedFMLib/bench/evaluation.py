"""`medfm bench --evaluate DATASET`: what a simulated user's session costs, per case and per step.

It runs the cvpr25 protocol (a box, then clicks) exactly as `medfm evaluate` does, on any engine,
including full-size networks with random weights: the masks then mean nothing, but the time a box
(encoding every slice of its range, then propagating) and each click (a decode and a re-propagation)
take does not depend on the weights.
"""

from __future__ import annotations

import statistics
import tempfile

from ..console import ProgressBar
from ..engines import create_engine
from ..evaluation.command import CaseProgress
from ..evaluation.runner import evaluate
from ..interaction.session import Session


def run_evaluation_benchmark(
    dataset: str,
    model: str,
    device: str = "auto",
    checkpoint: str | None = None,
    random_weights: bool = False,
    clicks: int = 5,
) -> dict:
    engine = create_engine(model, checkpoint=checkpoint, device=device, random_weights=random_weights,
                           progress=ProgressBar())  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medfm-bench-") as out:
        progress = CaseProgress()
        results = evaluate(dataset, out, lambda volume: Session(volume, engine), model, engine.device,
                           clicks=clicks, progress=progress)  # fmt: skip
        progress.finish()
    cases, boxes, clicks_seconds, failed = {}, [], [], 0
    for name, case in results["cases"].items():
        if "objects" not in case:
            failed += 1
            continue
        cases[name] = case["seconds"]
        for result in case["objects"].values():
            boxes.append(result["steps"][0]["seconds"])
            clicks_seconds.extend(step["seconds"] for step in result["steps"][1:])
    return {
        "model": model,
        "device": engine.device,
        "random_weights": random_weights,
        "dataset": str(dataset),
        "cases": cases,
        "failed": failed,
        "seconds_per_case_median": statistics.median(cases.values()) if cases else None,
        "box_step_seconds_median": statistics.median(boxes) if boxes else None,
        "click_step_seconds_median": statistics.median(clicks_seconds) if clicks_seconds else None,
        "steps": len(boxes) + len(clicks_seconds),
    }


def format_evaluation_report(result: dict) -> str:
    weights = ", random weights" if result["random_weights"] else ""
    lines = [f"cvpr25 session cost: {result['model']} on {result['device']}{weights}, {result['dataset']}"]
    for name, seconds in result["cases"].items():
        lines.append(f"  {name}: {seconds:.2f} s for the case (reading, scoring and writing included)")
    if result["cases"]:
        lines.append(f"  median per case {result['seconds_per_case_median']:.2f} s; per step: box (encode, propagate) "
                     f"{result['box_step_seconds_median']:.3f} s, click (decode and re-propagate) "
                     f"{result['click_step_seconds_median']:.3f} s; {result['steps']} steps")  # fmt: skip
    if result["failed"]:
        lines.append(f"  {result['failed']} case(s) failed: see medfm evaluate for why")
    return "\n".join(lines)
