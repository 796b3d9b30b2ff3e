"""`medfm evaluate`: the command line of the evaluation."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import MedFMError


def add_parser(commands) -> None:
    from ..cli import _add_runtime_options, _add_server_options

    evaluate = commands.add_parser("evaluate", help="score a model with simulated users on a labelled dataset")
    evaluate.add_argument("dataset", nargs="?", help="MSD/nnU-Net folder, CSV (image,label) or CVPR .npz folder")
    evaluate.add_argument("--model", default="classic")
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument("--device", default="auto")
    _add_runtime_options(evaluate)
    evaluate.add_argument(
        "--protocol", default="cvpr25", choices=["cvpr25", "ritm"],
        help="cvpr25: a box, then 5 clicks, in 3D (default); ritm: up to 20 clicks per slice",
    )  # fmt: skip
    evaluate.add_argument("--clicks", type=int, help="clicks per object (cvpr25: 5) or per slice (ritm: 20)")
    evaluate.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    evaluate.add_argument("--resume", action="store_true", help="skip the cases already in OUT/results.json")
    evaluate.add_argument("--compare", nargs="+", metavar="DIR", help="one table and plot across earlier runs")
    evaluate.add_argument("--json", action="store_true", help="print the headline figures as JSON")
    _add_server_options(evaluate, "run the model on this MedFM server (images go there)")


class CaseProgress:
    """Cases and steps on one stderr line (a terminal), or a line per case (a log)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total = 0
        self.index = 0

    def __call__(self, name: str, index: int, count: int) -> None:
        if index > 0:
            self.index, self.total = index, count
            if not self.stream.isatty():
                self.stream.write(f"evaluating case {index}/{count}: {name}\n")
        if self.stream.isatty():
            step = f", step {count}" if index < 0 else ""
            self.stream.write(f"\revaluating case {self.index}/{self.total}: {name}{step}   ")
            self.stream.flush()

    def finish(self) -> None:
        if self.stream.isatty() and self.total:
            self.stream.write("\n")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .report import compare, headline

    if args.compare:
        runs = compare(args.compare, args.out)
        figures = [dict(model=r["model"], protocol=r["protocol"], **headline(r)) for r in runs]
        print(json.dumps(figures) if args.json else f"compared {len(runs)} runs: {args.out}/summary.md, "
              f"{args.out}/dice_vs_clicks.png")  # fmt: skip
        return 0
    if not args.dataset:
        raise MedFMError("Name the dataset to evaluate on, or give --compare DIR [DIR ...].")
    if args.clicks is not None and args.clicks < 0:
        raise MedFMError("--clicks must be 0 or more.")
    factory, device = _session_factory(args)
    from .runner import evaluate

    progress = CaseProgress()
    results = evaluate(args.dataset, args.out, factory, args.model, device, args.protocol, args.clicks, args.resume,
                       progress)  # fmt: skip
    progress.finish()
    figures = headline(results)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.model} on {args.dataset} ({args.protocol}): " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        print(f"results: {args.out}/results.json, summary.md, dice_vs_clicks.png, predictions/")
    for case in results["cases"].values():
        if "error" in case:
            print(f"medfm: warning: case failed: {case['error']}", file=sys.stderr)
    return 0


def _session_factory(args):
    if args.server:
        from ..cli import connect
        from ..remote.volume_client import open_remote_session

        connection = connect(args)
        return (lambda volume: open_remote_session(connection, volume, args.model)), connection.info.get(
            "device", "server")  # fmt: skip
    from ..console import ProgressBar, note
    from ..engines import create_engine
    from ..interaction.session import Session

    engine = create_engine(args.model, checkpoint=args.checkpoint, device=args.device, progress=ProgressBar(),
                           runtime=args.runtime, fast=args.fast, notify=note, zoom=args.zoom)  # fmt: skip
    if getattr(engine, "kind", "slice") == "volume":
        from ..interaction.volume_session import VolumeSession

        return (lambda volume: VolumeSession(volume, engine)), engine.device
    return (lambda volume: Session(volume, engine)), f"{engine.device} ({getattr(engine, 'runtime', 'torch')})"
