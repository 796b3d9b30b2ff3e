"""The `medfm` command line.

Every error a user can cause ends with one line on stderr and a non-zero exit
status, never a traceback. Set MEDFM_DEBUG=1 to see tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .errors import MedFMError

_COORDINATE_OPTIONS = ("--point", "--negative", "--box")


def parse_ras(text: str, count: int = 3) -> np.ndarray:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not np.all(np.isfinite(values)):
        example = "R,A,S" if count == 3 else "R1,A1,S1,R2,A2,S2"
        raise MedFMError(f"Cannot read coordinates '{text}': give {count} numbers in millimetres as {example}.")
    return np.asarray(values)


def _join_negative_coordinates(argv: Sequence[str]) -> list[str]:
    # argparse takes "-12.5,3,4" for an option; glue coordinate values to their flag.
    joined: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in _COORDINATE_OPTIONS and index + 1 < len(tokens) and tokens[index + 1].startswith("-"):
            joined.append(f"{token}={tokens[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfm", description="Promptable medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"medfm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    segment = commands.add_parser("segment", help="segment a volume from points and boxes given in RAS mm")
    segment.add_argument("input", help="volume file (NRRD, NIfTI, MHA) or DICOM series folder")
    segment.add_argument("--model", default="classic", help="model name (see `medfm models`); default: classic")
    segment.add_argument("--checkpoint", help="checkpoint file of the model")
    segment.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    segment.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal"])
    segment.add_argument("--point", action="append", default=[], metavar="R,A,S", help="positive point")
    segment.add_argument("--negative", action="append", default=[], metavar="R,A,S", help="negative point")
    segment.add_argument("--box", metavar="R1,A1,S1,R2,A2,S2", help="box: two opposite corners on one slice")
    intensity = segment.add_mutually_exclusive_group()
    intensity.add_argument("--window", metavar="W,L", help="intensity window width and level")
    intensity.add_argument("--preset", help="CT window preset: soft_tissue, lung, bone, brain")
    segment.add_argument("--name", default="Segment_1", help="segment name in the output")
    segment.add_argument("--out", required=True, help="output: .seg.nrrd, .nrrd or .nii.gz")

    models = commands.add_parser("models", help="list the models MedFM knows")
    models.add_argument("action", nargs="?", default="list", choices=["list"])
    models.add_argument("--json", action="store_true", help="print JSON")

    bench = commands.add_parser("bench", help="measure click latency and memory")
    bench.add_argument("--model", default="classic")
    bench.add_argument("--checkpoint")
    bench.add_argument("--random-weights", action="store_true", help="full-size network with random weights")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    bench.add_argument("--first-clicks", type=int, default=3, help="first clicks to time (each encodes a slice)")
    bench.add_argument("--clicks", type=int, default=20, help="further clicks to time")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    demo = commands.add_parser("demo", help="segment a generated sample volume and write the result")
    demo.add_argument("--out-dir", default="demo_output", help="folder for the sample and the result")
    demo.add_argument("--model", default="classic")
    demo.add_argument("--checkpoint")
    demo.add_argument("--device", default="auto")
    return parser


def cmd_segment(args: argparse.Namespace) -> int:
    from .engines import create_engine
    from .intensity import parse_window
    from .io import SegmentData, output_kind, read_volume, write_output
    from .session import Session

    output_kind(args.out)  # fail on a bad output name before any slow work
    points = [parse_ras(p) for p in args.point]
    negatives = [parse_ras(p) for p in args.negative]
    box = parse_ras(args.box, count=6) if args.box else None
    if not points and box is None:
        raise MedFMError("Give at least one --point or a --box to segment.")
    volume = read_volume(args.input)
    window = None
    if args.window:
        window = parse_window(args.window)
    elif args.preset:
        from .intensity import preset_window

        window = preset_window(args.preset)
    engine = create_engine(args.model, checkpoint=args.checkpoint, device=args.device)
    session = Session(volume, engine, window=window)
    object_id = session.add_object(args.name)
    if box is not None:
        session.set_box(object_id, box[:3], box[3:], view=args.view)
    for point in points:
        session.add_point(object_id, point, positive=True, view=args.view)
    for point in negatives:
        session.add_point(object_id, point, positive=False, view=args.view)
    mask = session.mask(object_id)
    obj = session.objects[object_id]
    written = write_output(args.out, [SegmentData(obj.name, mask, obj.color)], volume)
    voxel_ml = abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1000.0
    count = int(mask.sum())
    print(f"wrote {written} ({count} voxels, {count * voxel_ml:.2f} mL) with {engine.model_name} on {engine.device}")
    if count == 0:
        print("medfm: warning: the mask is empty; try another point or a box.", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .catalog import load_catalog

    catalog = load_catalog()
    if args.json:
        print(json.dumps([vars(info) for info in catalog.values()], indent=2, default=list))
        return 0
    print(f"{'NAME':<16} {'TASK':<8} {'PROMPTS':<10} {'COMMERCIAL':<10} LICENCE")
    for info in catalog.values():
        print(
            f"{info.name:<16} {info.task:<8} {'+'.join(info.prompts):<10} "
            f"{'yes' if info.commercial_use else 'NO':<10} {info.license}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_benchmark

    if args.size < 16 or args.first_clicks < 1 or args.clicks < 1:
        raise MedFMError("--size must be at least 16, and --first-clicks and --clicks at least 1.")
    result = run_benchmark(
        args.model,
        device=args.device,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        size=args.size,
        first_clicks=args.first_clicks,
        further_clicks=args.clicks,
    )
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), model=args.model, checkpoint=args.checkpoint, device=args.device)
    return 0


def _describe_unexpected(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "out of memory" in text.lower():
        return "the device ran out of memory; close other GPU programs or use --device cpu."
    return f"internal error ({type(exc).__name__}: {text}); please report it, with MEDFM_DEBUG=1 for details."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_coordinates(sys.argv[1:] if argv is None else argv))
    handlers = {"segment": cmd_segment, "models": cmd_models, "bench": cmd_bench, "demo": cmd_demo}
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args)
    except MedFMError as exc:
        print(f"medfm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medfm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the user must never see a traceback
        if os.environ.get("MEDFM_DEBUG"):
            raise
        print(f"medfm: error: {_describe_unexpected(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
