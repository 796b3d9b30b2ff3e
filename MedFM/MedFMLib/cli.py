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
from .cli_options import add_runtime_options as _add_runtime_options
from .cli_options import add_server_options as _add_server_options
from .console import ProgressBar, SliceProgress, error, human_size, note
from .errors import MedFMError, ModelError

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
    _add_runtime_options(segment)
    segment.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal"])
    segment.add_argument("--point", action="append", default=[], metavar="R,A,S", help="positive point")
    segment.add_argument("--negative", action="append", default=[], metavar="R,A,S", help="negative point")
    segment.add_argument(
        "--box",
        metavar="R1,A1,S1,R2,A2,S2",
        action="append",
        default=[],
        help="box: two opposite corners; on one slice a 2D box, on different slices a 3D box segmented slice by "
        "slice; repeat it for a box on each of several slices",
    )
    segment.add_argument(
        "--propagate",
        nargs="?",
        const="both",
        choices=["both", "forward", "backward"],
        help="carry the prompted slices' masks through the volume (default when given: both)",
    )
    segment.add_argument("--min-score", type=float, help="propagation stops below this model confidence (default 0.5)")
    segment.add_argument("--min-object-fraction", type=float, metavar="F",
                         help="propagation stops where less than this share of a slice's mask looks like the object "
                              "the prompted slices show (default 0.5; 0 turns the rule off)")  # fmt: skip
    segment.add_argument("--keep-connected", action="store_true", help="keep only the 3D parts the prompts touch")
    segment.add_argument("--fill-holes", action="store_true", help="fill holes in each slice")
    intensity = segment.add_mutually_exclusive_group()
    intensity.add_argument("--window", metavar="W,L", help="intensity window width and level")
    intensity.add_argument("--preset", help="CT window preset: soft_tissue, lung, bone, brain")
    segment.add_argument("--scribble", action="append", default=[], metavar="FILE",
                         help="3D models: a drawn stroke (Slicer markups curve .mrk.json, or JSON list of RAS points)")
    segment.add_argument("--negative-scribble", action="append", default=[], metavar="FILE",
                         help="3D models: a stroke over background")
    segment.add_argument("--lasso", action="append", default=[], metavar="FILE",
                         help="3D models: a closed curve on one slice around the object (markups or JSON points)")
    segment.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                         help="models with class prompts (vista3d): e.g. liver; several, or `everything`, "
                              "give one named segment each")  # fmt: skip
    segment.add_argument("--name", default="Segment_1", help="segment name in the output")
    _add_server_options(segment, "run the model on this MedFM server (e.g. https://gpu-server:8000)")
    segment.add_argument("--out", required=True, help="output: .seg.nrrd, .nrrd or .nii.gz")

    models = commands.add_parser("models", help="list, download, import, verify and remove models")
    models.add_argument("action", nargs="?", default="list",
                        choices=["list", "info", "download", "import", "verify", "remove"])
    models.add_argument("target", nargs="?", help="model name (info, download, verify, remove) or file or folder "
                                                  "(import)")  # fmt: skip
    models.add_argument("--name", help="import: the name to store the checkpoint under")
    models.add_argument("--arch", help="import: architecture of a custom checkpoint, e.g. sam_vit_b")
    models.add_argument("--all", action="store_true", help="remove: every downloaded model")
    models.add_argument("--json", action="store_true", help="list: print JSON")
    _add_server_options(models, "list: the models this MedFM server offers")

    bench = commands.add_parser("bench", help="measure click latency and memory")
    bench.add_argument("--model", default="classic")
    bench.add_argument("--checkpoint")
    _add_runtime_options(bench)
    bench.add_argument("--compare-runtimes", action="store_true", help="first clicks with torch and OpenVINO, "
                       "side by side, with the speed-up and how far the masks agree")  # fmt: skip
    bench.add_argument("--random-weights", action="store_true", help="full-size network with random weights")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--size", type=int, help="slice size in pixels (default 512; 128 with --clients)")
    bench.add_argument("--first-clicks", type=int, default=3, help="first clicks to time (each encodes a slice)")
    bench.add_argument("--clicks", type=int, default=20, help="further clicks to time")
    bench.add_argument("--background", action="store_true", help="also measure encoding on the effect's worker thread")
    bench.add_argument(
        "--propagate", action="store_true", help="measure propagation per slice, uncached and cached, instead"
    )
    bench.add_argument("--slices", type=int, help="--propagate, --server: depth (default 100; 24 with --clients)")
    bench.add_argument("--clients", type=int, help="--server: this many users at once (latency and errors under load)")
    bench.add_argument("--evaluate", metavar="DATASET", help="time the cvpr25 protocol on a labelled dataset: "
                       "seconds per case, per box and per click")  # fmt: skip
    bench.add_argument("--ray-serve", action="store_true", help="what Ray adds per click: the plain server and "
                       "`serve --ray` side by side on a local cluster (needs medfm[ray])")  # fmt: skip
    bench.add_argument("--annotate", metavar="DATASET", help="cases per minute of `medfm annotate` (boxes from "
                       "labels) on a labelled dataset, in-process and on a local Ray cluster")  # fmt: skip
    bench.add_argument("--volume-sizes", metavar="SIZES", help="3D models: volumes to time, e.g. 128,256x256x160 "
                                                               "(the default)")  # fmt: skip
    bench.add_argument("--finetune", action="store_true", help="fine-tuning: embedding per slice, epoch per 100 slices")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    _add_server_options(bench, "compare clicks through this MedFM server with the same clicks in-process")

    from .serve_command import add_parser as add_serve_parser

    add_serve_parser(commands)
    from .evaluation.command import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    from .app.command import add_parser as add_app_parser

    add_app_parser(commands)
    from .training.command import add_parser as add_finetune_parser

    add_finetune_parser(commands)
    from .scale.command import add_parser as add_annotate_parser

    add_annotate_parser(commands)

    demo = commands.add_parser("demo", help="segment a generated sample volume and write the result")
    demo.add_argument("--out-dir", default="demo_output", help="folder for the sample and the result")
    demo.add_argument("--model", default="classic")
    demo.add_argument("--checkpoint")
    demo.add_argument("--device", default="auto")
    return parser


def server_credentials(args: argparse.Namespace) -> tuple[str, str | None]:
    """The token and CA file for ``--server``: the options, else $MEDFM_TOKEN and $MEDFM_CA_CERT."""
    return args.token or os.environ.get("MEDFM_TOKEN", ""), args.ca_cert or os.environ.get("MEDFM_CA_CERT")


def connect(args: argparse.Namespace):
    """The connection to ``--server``, checked (reachable, token accepted, same protocol)."""
    from .remote.client import ServerConnection

    token, ca_cert = server_credentials(args)
    connection = ServerConnection(args.server, token, ca_cert=ca_cert)
    connection.check()
    return connection


def cmd_segment(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .engines import create_engine
    from .imaging.intensity import parse_window
    from .imaging.io import SegmentData, output_kind, read_volume, write_output
    from .interaction.cleanup import cleaned_mask
    from .interaction.propagation import PropagationOptions
    from .interaction.session import Session

    output_kind(args.out)  # fail on a bad output name before any slow work
    points = [parse_ras(p) for p in args.point]
    negatives = [parse_ras(p) for p in args.negative]
    boxes = [parse_ras(text, count=6) for text in args.box]
    volume_model = _is_volume_model(args)
    if not volume_model and (args.classes or args.scribble or args.negative_scribble or args.lasso):
        raise MedFMError(f"--class, --scribble and --lasso need a 3D model (nninteractive, vista3d), not {args.model}.")
    if volume_model and args.classes and not args.server and "class" not in _model_prompts(args.model):
        raise MedFMError(f"{args.model} takes no class prompts; click on the object instead.")  # before it loads
    if not points and not boxes and not volume_model:
        raise MedFMError("Give at least one --point or a --box to segment.")
    volume = read_volume(args.input)
    if volume_model:
        return _segment_in_3d(args, volume, points, negatives, boxes)
    window = None
    if args.window:
        window = parse_window(args.window)
    elif args.preset:
        from .imaging.intensity import preset_window

        window = preset_window(args.preset)
    if args.server:
        from .remote.client import RemoteSession

        if args.checkpoint:
            raise MedFMError("--checkpoint does not apply with --server: the server has its own models.")
        session = RemoteSession(connect(args), volume, args.model, window=window)
        engine = session.engine
    else:
        engine = create_engine(args.model, checkpoint=args.checkpoint, device=args.device, progress=ProgressBar(),
                               runtime=args.runtime, fast=args.fast, notify=note, zoom=args.zoom)  # fmt: skip
        session = Session(volume, engine, window=window)
    object_id = session.add_object(args.name)
    options = PropagationOptions()
    if args.min_score is not None:
        options = replace(options, criteria=replace(options.criteria, min_score=args.min_score))
    if args.min_object_fraction is not None:
        if not 0.0 <= args.min_object_fraction <= 1.0:
            raise MedFMError(f"--min-object-fraction {args.min_object_fraction} is not a share: give 0 to 1.")
        options = replace(options, criteria=replace(options.criteria, min_object_fraction=args.min_object_fraction))
    three_d = [box for box in boxes if spans_slices(volume, box[:3], box[3:], args.view)]
    if three_d and len(boxes) > 1:
        raise MedFMError("A 3D box (corners on different slices) goes alone; give several boxes each on one slice.")
    if three_d:
        session.set_roi(object_id, [three_d[0][:3], three_d[0][3:]], view=args.view, options=options)
        report_propagation(session, object_id)
    for index, box in enumerate([] if three_d else boxes):
        session.set_box(object_id, box[:3], box[3:], view=args.view, keep_other_slices=index > 0)
    clicks = [(point, True) for point in points] + [(point, False) for point in negatives]
    said = [session.add_point(object_id, point, positive=positive, view=args.view).note for point, positive in clicks]
    for text in dict.fromkeys(text for text in said if text):  # each thing once
        note(text)
    if args.propagate:
        progress = SliceProgress()
        result = session.propagate(object_id, args.propagate, view=args.view, options=options, progress=progress)
        progress.finish()
        for line in result.describe():
            print(f"propagated {line}", file=sys.stderr)
    mask = cleaned_mask(session, object_id, args.keep_connected, args.fill_holes, view=args.view)
    obj = session.objects[object_id]
    written = write_output(args.out, [SegmentData(obj.name, mask, obj.color)], volume)
    voxel_ml = abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1000.0
    count = int(mask.sum())
    where = f"{engine.device} at {args.server}" if args.server else engine.device
    print(f"wrote {written} ({count} voxels, {count * voxel_ml:.2f} mL) with {engine.model_name} on {where}")
    if count == 0:
        print("medfm: warning: the mask is empty; try another point or a box.", file=sys.stderr)
    return 0


def _is_volume_model(args: argparse.Namespace) -> bool:
    if args.server:
        offered = {m.get("name"): m for m in connect(args).models()}
        return offered.get(args.model, {}).get("kind") == "volume"
    from .models.store import ModelStore

    return ModelStore().info(args.model).kind == "volume"


def _model_prompts(name: str) -> tuple[str, ...]:
    from .models.store import ModelStore

    return ModelStore().info(name).prompts


def _segment_in_3d(args: argparse.Namespace, volume, points, negatives, boxes) -> int:
    from .imaging.io import write_output
    from .segment_volume import segment_with_volume_engine

    if args.server:
        from .remote.volume_client import RemoteVolumeSession

        if args.checkpoint:
            raise MedFMError("--checkpoint does not apply with --server: the server has its own models.")
        session = RemoteVolumeSession(connect(args), volume, args.model)
        engine, where = session.engine, f"{session.engine.device} at {args.server}"
    else:
        from .engines import create_engine
        from .interaction.volume_session import VolumeSession

        engine = create_engine(args.model, checkpoint=args.checkpoint, device=args.device, progress=ProgressBar())
        session, where = VolumeSession(volume, engine), engine.device
    try:
        segments = segment_with_volume_engine(args, session, boxes, points, negatives)
    finally:
        session.close()
    written = write_output(args.out, segments, volume)
    voxel_ml = abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1000.0
    count = sum(int(s.mask.sum()) for s in segments)
    print(f"wrote {written} ({len(segments)} segment(s), {count} voxels, {count * voxel_ml:.2f} mL) with "
          f"{engine.model_name} on {where}")  # fmt: skip
    if count == 0:
        print("medfm: warning: the mask is empty; try another point or class.", file=sys.stderr)
    return 0


def spans_slices(volume, corner_a, corner_b, view: str) -> bool:
    """Whether two box corners lie on different slices of the view: then the box is a 3D box."""
    from .imaging.geometry import resolve_axis

    axis = resolve_axis(volume.ijk_to_ras, view)
    ijk = volume.ras_to_ijk_points(np.array([corner_a, corner_b]))
    return int(np.rint(ijk[0, axis])) != int(np.rint(ijk[1, axis]))


def report_propagation(session, object_id: int) -> None:
    slices = sum(1 for s in session.objects[object_id].slices.values() if s.mask is not None and s.mask.any())
    print(f"3D box: segmented {slices} slices from its middle slice outwards", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    from .models.store import ModelStore

    if args.server:
        if args.action != "list":
            raise MedFMError("With --server, only `medfm models list` works: the server's administrator manages them.")
        models = connect(args).models()
        if args.json:
            print(json.dumps(models, indent=2))
            return 0
        print(f"{'NAME':<24} {'STATE':<16} {'KIND':<7} {'COMMERCIAL':<10} LICENCE")
        for info in models:
            commercial = "yes" if info["commercial_use"] else "NO"
            kind = "3D" if info.get("kind") == "volume" else "slice"
            print(f"{info['name']:<24} {info['state']:<16} {kind:<7} {commercial:<10} {info['license']}")
        return 0
    store = ModelStore()
    if args.action == "list":
        models = store.models()
        states = {name: store.state(name) for name in models}
        if args.json:
            listed = [
                dict(vars(info), downloaded=states[name].ready, state=states[name].label, card=store.card(name))
                for name, info in models.items()
            ]
            print(json.dumps(listed, indent=2, default=list))
            return 0
        print(f"{'NAME':<24} {'STATUS':<14} {'SIZE':>9}  {'KIND':<12} {'COMMERCIAL':<10} {'PROMPTS':<14} LICENCE")
        for name, info in models.items():
            state = states[name]
            if not info.needs_weights:
                status, size = "built in", "-"
            elif state.ready:
                status, size = "downloaded", human_size(store.path(name).stat().st_size)
            elif state.label == "not downloaded":
                status, size = "not yet", human_size(info.size) if info.size else "?"
            else:  # a file is there, but not this entry's: say why below
                status, size = state.label, human_size(store.path(name).stat().st_size)
            licence = info.license + (" *" if info.license_note else "")
            prompts = ",".join(info.prompts) or "-"
            commercial = "yes" if info.commercial_use else "NO"
            print(f"{name:<24} {status:<14} {size:>9}  {info.kind_label:<12} {commercial:<10} {prompts:<14} {licence}")
        for name in models:  # fine-tuned models: their card in a line
            if store.card(name) is not None:
                print(f"{name}: {models[name].description}")
        if any(info.license_note for info in models.values()):
            print("* licence to confirm before commercial use: see `medfm models list --json`")
        for name, state in states.items():
            if not state.ready and state.label != "not downloaded":
                print(f"{name}: {state.message}")
        print(f"models folder: {store.models_dir}")
        return 0
    if args.action == "info":
        return _model_info(store, args.target)
    if args.action == "download":
        if not args.target:
            raise MedFMError("Name the model to download, e.g. `medfm models download sam_vit_b`.")
        path = store.download(args.target, progress=ProgressBar())
        print(f"{args.target}: {path}")
        return 0
    if args.action == "import":
        if not args.target or not args.name:
            raise MedFMError("Give the file and a name: `medfm models import FILE --name NAME [--arch ARCH]`.")
        path = store.import_file(args.target, args.name, arch=args.arch)
        print(f"imported {args.name}: {path}")
        return 0
    if args.action == "verify":
        names = (
            [args.target]
            if args.target
            else [n for n, i in store.models().items() if i.needs_weights and store.path(n).is_file()]
        )
        failed = 0
        for name in names:
            ok, message = store.verify(name)
            failed += not ok
            print(f"{name}: {'OK' if ok else 'FAILED'}: {message}")
        if failed:
            raise MedFMError(f"{failed} model file(s) failed verification; download them again.")
        return 0
    # remove
    if args.all:
        names = [n for n, i in store.models().items() if i.needs_weights and store.path(n).is_file()]
    elif args.target:
        names = [args.target]
    else:
        raise MedFMError("Name the model to remove, or give --all.")
    kept = 0
    for name in names:
        try:
            print(f"{name}: {'removed' if store.remove(name) else 'nothing to remove'}")
        except ModelError as exc:
            if not args.all:
                raise
            kept += 1
            print(f"{name}: kept: {exc}")
    if kept:
        raise MedFMError(f"{kept} file(s) were not put there by MedFM and were kept; see above.")
    return 0


def _model_info(store, name: str | None) -> int:
    """Everything the catalog says of one model, its file's state, and its class prompts."""
    if not name:
        raise MedFMError("Name the model, e.g. `medfm models info vista3d`.")
    info, state = store.info(name), store.state(name)
    print(f"{name}: {info.description}")
    print(f"  kind: {info.kind_label}; prompts: {', '.join(info.prompts)}; engine: {info.engine} ({info.arch})")
    print(f"  licence: {info.license} ({'commercial use allowed' if info.commercial_use else 'NON-COMMERCIAL'})")
    for text in (info.license_note, info.source_note, info.classes_note, info.download_note):
        if text:
            print(f"  {text}")
    print(f"  homepage: {info.homepage}")
    print(f"  file: {state.label} ({state.message}); {store.path(name) if info.needs_weights else 'built in'}")
    if "class" in info.prompts:
        from .engines.volumetric import class_table

        table = class_table(info.engine)
        names = sorted(entry["name"] for entry in table["labels"])
        print(f"  classes ({len(names)}; `everything` = {len(table['everything'])} of them): {', '.join(names)}")
    card = store.card(name)
    if card is not None:
        print("  model card: " + json.dumps(card, indent=1).replace("\n", "\n  "))
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


def _cmd_app(args) -> int:
    from .app.command import cmd_app  # Qt only when the window is asked for

    return cmd_app(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_coordinates(sys.argv[1:] if argv is None else argv))
    from .bench.command import cmd_bench
    from .evaluation.command import cmd_evaluate
    from .scale.command import cmd_annotate
    from .serve_command import cmd_serve
    from .training.command import cmd_finetune

    handlers = {"segment": cmd_segment, "models": cmd_models, "bench": cmd_bench, "demo": cmd_demo, "serve": cmd_serve,
                "evaluate": cmd_evaluate, "app": _cmd_app, "finetune": cmd_finetune,
                "annotate": cmd_annotate}  # fmt: skip
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return handlers[args.command](args)
    except MedFMError as exc:
        error(str(exc))
        return 1
    except KeyboardInterrupt:
        print("medfm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the user must never see a traceback
        if os.environ.get("MEDFM_DEBUG"):
            raise
        error(_describe_unexpected(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
