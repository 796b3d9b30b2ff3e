"""What an evaluation leaves behind, besides results.json: results.csv, summary.md and dice_vs_clicks.png,
for one run or (``compare``) several side by side."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import MedFMError


def _objects(results: dict):
    for case_name, case in results["cases"].items():
        for label, obj in case.get("objects", {}).items():
            yield case_name, label, obj


def _failures(results: dict) -> list[str]:
    return [case["error"] for case in results["cases"].values() if "error" in case]


def curve(results: dict) -> tuple[list[float], list[float]]:
    """Mean DSC and NSD per step across every object (cvpr25)."""
    steps = [obj["steps"] for _, _, obj in _objects(results) if obj.get("steps") and "dsc" in obj["steps"][0]]
    if not steps:
        return [], []
    count = min(len(s) for s in steps)
    return ([float(np.mean([s[n]["dsc"] for s in steps])) for n in range(count)],
            [float(np.mean([s[n]["nsd"] for s in steps])) for n in range(count)])  # fmt: skip


def headline(results: dict) -> dict:
    """The run's figures averaged over objects: final DSC/NSD and AUCs (cvpr25), or NoC and mIoU (ritm)."""
    objects = [obj for _, _, obj in _objects(results)]
    keys = ("dsc_final", "nsd_final", "dsc_auc", "nsd_auc") if results["protocol"] == "cvpr25" else ("noc85", "noc90")
    figures = {key: round(float(np.mean([o[key] for o in objects])), 4) for key in keys if objects}
    figures.update(objects=len(objects), failed=len(_failures(results)))
    if results["protocol"] == "ritm" and objects:
        figures["nof90"] = int(sum(o["nof90"] for o in objects))
        figures["miou_at_5"] = round(float(np.mean([o["miou_at"]["5"] for o in objects])), 4)
    seconds = [s["seconds"] for _, _, o in _objects(results) for s in o["steps"]]
    figures["seconds_per_step_median"] = round(float(np.median(seconds)), 3) if seconds else None
    return figures


def write_reports(out: Path, results: dict) -> None:
    _write_csv(out / "results.csv", results)
    (out / "summary.md").write_text(summary_table([results]), encoding="utf-8")
    plot([results], out / "dice_vs_clicks.png")


def _write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if results["protocol"] == "cvpr25":
            writer.writerow(["case", "label", "step", "prompt", "dsc", "nsd", "seconds", "dsc_auc", "nsd_auc"])
            for case_name, label, obj in _objects(results):
                for n, step in enumerate(obj["steps"]):
                    writer.writerow([case_name, label, n, step["prompt"], step["dsc"], step["nsd"], step["seconds"],
                                     obj["dsc_auc"], obj["nsd_auc"]])  # fmt: skip
        else:
            writer.writerow(["case", "label", "slice", "click", "iou", "seconds"])
            for case_name, label, obj in _objects(results):
                for n, step in enumerate(obj["steps"]):
                    writer.writerow([case_name, label, step["slice"], n, step["iou"], step["seconds"]])
        for failure in _failures(results):
            writer.writerow(["FAILED", failure])


def summary_table(runs: list[dict]) -> str:
    lines = ["# MedFM evaluation", ""]
    for protocol in sorted({r["protocol"] for r in runs}):
        chosen = [r for r in runs if r["protocol"] == protocol]
        figures = [headline(r) for r in chosen]
        keys = [k for k in figures[0] if k not in ("objects", "failed")]
        lines += [f"## Protocol {protocol}", "", "| model | dataset | objects | failed | " + " | ".join(keys) + " |",
                  "| --- " * (4 + len(keys)) + "|"]  # fmt: skip
        for run, figure in zip(chosen, figures):
            values = " | ".join(str(figure.get(k)) for k in keys)
            lines.append(f"| {run['model']} | {Path(run['dataset']).name} | {figure['objects']} | {figure['failed']} "
                         f"| {values} |")  # fmt: skip
        lines.append("")
    for run in runs:
        for failure in _failures(run):
            lines.append(f"- failed ({run['model']}): {failure}")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Mean DSC and NSD against the step, one line per run (a 2D ritm run: mean IoU against the click)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        label = f"{run['model']} ({Path(run['dataset']).name})"
        if run["protocol"] == "cvpr25":
            dsc, nsd = curve(run)
            axes[0].plot(range(len(dsc)), dsc, marker="o", label=label)
            axes[1].plot(range(len(nsd)), nsd, marker="o", label=label)
        else:
            objects = [o for _, _, o in _objects(run)]
            if objects:
                ks = sorted(int(k) for k in objects[0]["miou_at"])
                means = [np.mean([o["miou_at"][str(k)] for o in objects]) for k in ks]
                axes[0].plot(ks, means, marker="o", label=label)
    axes[0].set(xlabel="step (0: box, then clicks)", ylabel="mean DSC", ylim=(0, 1), title="Dice")
    axes[1].set(xlabel="step (0: box, then clicks)", ylabel="mean NSD (2 mm)", ylim=(0, 1), title="Surface Dice")
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compare(directories: list[str | Path], out: str | Path) -> list[dict]:
    """One table and one plot across earlier runs (their results.json)."""
    runs = []
    for directory in directories:
        path = Path(directory) / "results.json"
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            raise MedFMError(
                f"{path} is missing or unreadable; give folders written by `medfm evaluate --out`."
            ) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary_table(runs), encoding="utf-8")
    plot(runs, out / "dice_vs_clicks.png")
    return runs
