"""`medfm finetune`: adapt a SAM-family model to one's own labelled scans, then measure it against the base."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prompts import PROMPT_KINDS


def add_parser(commands) -> None:
    parser = commands.add_parser("finetune", help="adapt a SAM-family model to a labelled dataset, on this machine")
    parser.add_argument("dataset", help="MSD/nnU-Net folder, CSV (image,label) or CVPR .npz folder")
    parser.add_argument("--model", required=True, help="the base model (a SAM-family model in `medfm models list`)")
    parser.add_argument("--checkpoint", help="train from this checkpoint file of the base model's architecture")
    parser.add_argument("--name", required=True, help="the new model's name")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=20)
    validation = parser.add_mutually_exclusive_group()
    validation.add_argument("--val-fraction", type=float, default=0.2, help="cases kept for validation (default 0.2)")
    validation.add_argument("--val", metavar="DATASET", help="validate on these cases instead")
    parser.add_argument("--train", default="decoder", choices=["decoder", "decoder+lora"],
                        help="decoder (default), or decoder+lora: adapters in the encoder too (a GPU job)")  # fmt: skip
    parser.add_argument("--prompts", help=f"simulated prompts, from {','.join(PROMPT_KINDS)} (default: those the "
                        "model takes)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=8, help="objects per optimiser step (default 8)")
    parser.add_argument("--patience", type=int, default=5, help="epochs without a better validation Dice (default 5)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="working folder: embeddings, checkpoints, plots (default: HOME/finetune/NAME)")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per object in the final evaluation (default 5)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the final evaluation of base and new model")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


class TrainingProgress:
    """Embedding and epochs as a bar on one stderr line (a terminal), or a line per epoch (a log)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.open_line = False

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        tty = self.stream.isatty()
        if phase == "note":
            self._end_line()
            self.stream.write(f"medfm: note: {info['note']}\n")
            return
        if "val_dice" in info:  # an epoch's summary
            self._end_line()
            self.stream.write(f"{phase}: loss {info['loss']:.4f}, validation Dice {info['val_dice']:.4f} "
                              f"({info['seconds']:.1f} s)\n")  # fmt: skip
            return
        if tty and total > 0:
            bar = "#" * int(30 * done / total)
            loss = f" loss {info['loss']:.4f}" if "loss" in info else ""
            self.stream.write(f"\r{phase} [{bar:<30}] {done}/{total}{loss}   ")
            self.stream.flush()
            self.open_line = True
        elif not tty and phase == "embedding" and done == total:
            self.stream.write(f"embedded {total} slices\n")

    def finish(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False


def _prompt_kinds(text: str | None, box_only: bool) -> tuple[str, ...]:
    if text is None:
        return ("box", "clicks") if box_only else PROMPT_KINDS
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import find_cases
    from ..home import default_home
    from ..models.store import ModelStore
    from .run import finetune, split_cases
    from .trainer import FinetuneConfig

    store = ModelStore()
    store.check_new_name(args.name, replacing=args.resume)
    info = store.info(args.model)
    cases = find_cases(args.dataset)
    if args.val:
        train_cases, val_cases = cases, find_cases(args.val)
    else:
        train_cases, val_cases = split_cases(cases, args.val_fraction, args.seed)
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, train=args.train,
                            prompts=_prompt_kinds(args.prompts, tuple(info.prompts) == ("box",)),
                            patience=args.patience, seed=args.seed)  # fmt: skip
    work = Path(args.out) if args.out else default_home() / "finetune" / args.name
    progress = TrainingProgress()
    run = finetune(train_cases, val_cases, args.model, args.name, store, config, work, args.device, args.checkpoint,
                   args.resume, progress)  # fmt: skip
    progress.finish()
    result = run.result
    figures = {"name": args.name, "base": args.model, "validation_dice_before": round(result.dice_before, 4),
               "validation_dice_after": round(result.best_dice, 4), "best_epoch": result.best_epoch,
               "epochs_run": len(result.history), "ended_by": result.reason}  # fmt: skip
    if result.stopped:
        print("medfm: note: training was stopped; the model holds the best epoch so far", file=sys.stderr)
    if not args.no_evaluate:
        figures["evaluation"] = compare_on_validation(run, store, args.device, args.checkpoint, args.clicks)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{args.name}: fine-tuned from {args.model} on {len(train_cases)} cases; validation Dice (box per slice) "
          f"{figures['validation_dice_before']} -> {figures['validation_dice_after']} (best epoch {result.best_epoch} "
          f"of {len(result.history)}, ended by {result.reason})")  # fmt: skip
    if "evaluation" in figures:
        print(side_by_side(figures["evaluation"]))
    print(f"model: {run.checkpoint}; card: `medfm models info {args.name}`; history and plot: {work}")
    return 0


def compare_on_validation(run, store, device: str, checkpoint: str | None, clicks: int) -> dict:
    """`medfm evaluate` (CVPR 2025 protocol) on the validation cases with the base and the new model."""
    from functools import partial

    from ..engines import create_engine
    from ..evaluation.command import CaseProgress
    from ..evaluation.report import headline
    from ..evaluation.runner import evaluate
    from ..interaction.session import Session

    rows = {}
    for label, model, weights in (("base", run.base, checkpoint), ("new", run.name, None)):
        engine = create_engine(model, checkpoint=weights, device=device, store=store, runtime="torch")
        progress = CaseProgress()
        results = evaluate(run.val_cases, run.work / "evaluation" / label, partial(Session, engine=engine),
                           model, engine.device, "cvpr25", clicks, progress=progress)  # fmt: skip
        progress.finish()
        rows[label] = {"model": model, **headline(results)}
    card = store.card(run.name)
    if card is not None:  # figures only: the validation cases stay unnamed
        card["evaluation"] = {"protocol": "cvpr25", "clicks": clicks, **{k: _numbers(v) for k, v in rows.items()}}
        store.save_card(run.name, card)
    return rows


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "model"}


def side_by_side(rows: dict) -> str:
    keys = [k for k in ("dsc_final", "nsd_final", "dsc_auc", "nsd_auc", "objects", "failed") if k in rows["base"]]
    lines = [f"{'validation cases (cvpr25)':<28}" + "".join(f"{k:>11}" for k in keys)]
    for label in ("base", "new"):
        row = rows[label]
        lines.append(f"{label + ': ' + row['model']:<28}" + "".join(f"{row[k]:>11}" for k in keys))
    return "\n".join(lines)
