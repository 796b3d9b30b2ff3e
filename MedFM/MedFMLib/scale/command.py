"""`medfm annotate`: its options, and the run, in this process or on a Ray cluster."""

from __future__ import annotations

import argparse

from ..errors import MedFMError

_DESCRIPTION = """\
Pre-segment every case of a dataset: one CASE.seg.nrrd per case in the image's geometry, with named segments,
and OUT/summary.csv (status done / failed / skipped, segments, volume in mL, seconds, and why a case failed).
A bad case is recorded as failed and the others go on; the exit status is 1 when any case failed.

Datasets: an MSD / nnU-Net folder (imagesTr, labelsTr), a CSV (image,label; paths relative to it), a folder
of CVPR .npz files, or (with --prompts or --class) a plain folder of images. Case names are the image names
without _0000 and suffix.

Prompts (one of):
  --prompts PROMPTS.csv  one prompt per row, RAS millimetres:
                             case,object,kind,r,a,s,r2,a2,s2
                             liver_003,tumour,box,-20.5,14,-102,12,40,-60
                             liver_003,tumour,point,-3.2,27.5,-80,,,
                         kind: point, negative or box (corners r,a,s and r2,a2,s2; on different slices of
                         --view a 3D box, else a 2D box); rows of one case and object make one segment,
                         named after the object; lines starting with # are skipped
  --boxes-from-labels    a 3D box per label value, from the dataset's own (coarse) labels; segments named
                         from dataset.json's "labels" when there is one, else "label N"
  --class NAME[,NAME]    class prompts (vista3d): e.g. liver,spleen, or everything

Ray: --ray starts a local cluster for the command's life; --ray ADDRESS joins one (`ray start --head`
prints it; the dataset and OUT must then be on storage every node shares). Put --ray after the dataset.
"""


def add_parser(commands) -> None:
    from ..cli_options import add_runtime_options

    annotate = commands.add_parser(
        "annotate", help="pre-segment a whole dataset from prompts, its labels' boxes or classes (in-process or Ray)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    annotate.add_argument("dataset", help="MSD/nnU-Net folder, CSV (image,label), CVPR .npz folder or image folder")
    annotate.add_argument("--model", required=True, help="model name (see `medfm models`), e.g. classic, medsam")
    annotate.add_argument("--out", required=True, help="output folder: CASE.seg.nrrd files and summary.csv")
    prompts = annotate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", metavar="PROMPTS.csv", help="points and boxes per case (see above)")
    prompts.add_argument("--boxes-from-labels", action="store_true", help="a 3D box per label of the dataset")
    prompts.add_argument("--class", dest="classes", action="append", metavar="NAME[,NAME]",
                         help="class prompts for models that take them (vista3d); `everything`")  # fmt: skip
    annotate.add_argument("--propagate", action="store_true",
                          help="slice models: carry the masks of clicked and 2D-boxed slices through the volume")
    annotate.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal"],
                          help="the slices of the prompts CSV's boxes and clicks (default axial)")
    annotate.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                          help="run on Ray Data: a local cluster, or the one at ADDRESS")
    annotate.add_argument("--gpus", type=int, metavar="N",
                          help="--ray: model actors, each on a GPU (default: every GPU); on a cluster without GPUs, "
                               "N actors on a CPU each (default 1)")
    annotate.add_argument("--resume", action="store_true", help="skip the cases OUT/summary.csv says are done")
    annotate.add_argument("--checkpoint", help="checkpoint file of the model")
    annotate.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    add_runtime_options(annotate)


def build_job(args: argparse.Namespace):
    """The job the options describe, checked before any case is read or model loaded."""
    from pathlib import Path

    from .annotate import AnnotationJob, check_classes, label_names, read_prompts, worker_env

    if args.gpus is not None and args.ray is None:
        raise MedFMError("--gpus sizes the Ray actor pool; give it with --ray.")
    classes = tuple(c.strip() for text in args.classes or [] for c in text.split(",") if c.strip())
    if args.classes is not None:
        if not classes:
            raise MedFMError("--class needs a class name, e.g. --class liver,spleen or --class everything.")
        check_classes(args.model, classes)
    mode = "prompts" if args.prompts else "labels" if args.boxes_from_labels else "classes"
    if args.propagate and mode != "prompts":
        raise MedFMError("--propagate applies to --prompts (clicks and 2D boxes); boxes from labels are 3D already.")
    from ..models.store import ModelStore

    kind = ModelStore().info(args.model).kind  # an unknown model is one line here, before any work
    if args.propagate and kind == "volume":
        from ..console import note

        note(f"{args.model} answers in 3D already: --propagate is not needed and was ignored")
    return AnnotationJob(
        dataset=str(Path(args.dataset).resolve()), out=str(Path(args.out).resolve()), model=args.model, mode=mode,
        prompts=read_prompts(args.prompts) if args.prompts else {}, classes=classes, propagate=args.propagate,
        view=args.view, checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        device=args.device, runtime=args.runtime, fast=args.fast, zoom=args.zoom, resume=args.resume,
        label_names=label_names(args.dataset) if mode == "labels" else {}, env=worker_env(),
    )  # fmt: skip


def cmd_annotate(args: argparse.Namespace) -> int:
    from ..console import StepProgress, note
    from .annotate import DONE, FAILED, SKIPPED, SUMMARY, plan

    job = build_job(args)
    if args.ray is not None:
        from .cluster import import_ray

        import_ray()  # no Ray: one line saying how to install it, before anything is read or written
    run = plan(job)
    bar = StepProgress(f"annotating with {job.model}")
    try:
        if args.ray is not None:
            rows, where = _on_ray(run, args, bar)
        else:
            from .annotate import annotate_local

            rows, where = annotate_local(run, bar), "in this process"
    finally:
        bar.finish()
    counts = {status: sum(r["status"] == status for r in rows) for status in (DONE, FAILED, SKIPPED)}
    print(f"annotated {len(rows)} case(s) with {job.model} {where}: {counts[DONE]} done, {counts[FAILED]} failed, "
          f"{counts[SKIPPED]} skipped; {job.out}/{SUMMARY}")  # fmt: skip
    for row in rows:
        if row["status"] == FAILED:
            note(f"case {row['case']} failed: {row['reason']}")
    return 1 if counts[FAILED] else 0


def _on_ray(run, args: argparse.Namespace, bar) -> tuple[list[dict], str]:
    from .annotate_ray import annotate_on_ray
    from .cluster import ray_cluster

    with ray_cluster(args.ray or None) as info:
        rows = annotate_on_ray(run, info.gpus, args.gpus, bar)
    kind = "the Ray cluster at " + info.address if not info.started else "a local Ray cluster"
    return rows, f"on {kind}"
