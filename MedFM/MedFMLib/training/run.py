"""One fine-tuning run from cases to a registered model: what the CLI, Slicer and the server all call.

1. The base model is loaded as for inference (a catalog or custom model, or a checkpoint file).
2. Every labelled slice of the training and validation cases is embedded once (``embeddings``).
3. The decoder trains (``trainer``), with a checkpoint each epoch.
4. The best epoch's weights are saved in the base model's own checkpoint format and registered in the
   store under the new name, with a model card (``card``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MedFMError
from .card import make_card
from .embeddings import cache_key, embed_cases
from .trainer import FinetuneConfig, FineTuner, TrainingResult

Progress = Callable[[str, int, int, dict], None]


@dataclass
class FinetuneRun:
    name: str
    base: str
    checkpoint: Path
    card: dict
    result: TrainingResult
    work: Path
    train_cases: list
    val_cases: list


def split_cases(cases: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Cases, not slices, go to validation: slices of one scan are too alike to measure anything."""
    if not 0.0 < val_fraction < 1.0:
        raise MedFMError("--val-fraction must be between 0 and 1 (e.g. 0.2), or give --val DATASET.")
    if len(cases) < 2:
        raise MedFMError(f"Fine-tuning needs at least 2 cases (one to train on, one to validate); the dataset has "
                         f"{len(cases)}. Add cases, or give the validation cases with --val DATASET.")  # fmt: skip
    shuffled = list(cases)
    random.Random(seed).shuffle(shuffled)
    count = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    return sorted(shuffled[count:], key=lambda c: c.name), sorted(shuffled[:count], key=lambda c: c.name)


def load_base_engine(base: str, store, device: str = "auto", checkpoint: str | Path | None = None, progress=None):
    """The base model as an engine; one clear line when it is not a SAM-family model."""
    from ..engines import create_engine
    from ..engines.sam import SamEngine
    from ..engines.sam2 import Sam2Engine

    info = store.info(base)
    if info.engine not in ("sam", "sam2"):
        raise MedFMError(
            f"'{base}' is not a SAM-family model: fine-tuning takes SAM, MedSAM, LiteMedSAM, MobileSAM, SAM 2 or "
            "MedSAM2 (see `medfm models list`)."
        )
    engine = create_engine(base, checkpoint=checkpoint, device=device, store=store, progress=progress, runtime="torch")
    if not isinstance(engine, (SamEngine, Sam2Engine)):
        raise MedFMError(f"'{base}' cannot be fine-tuned by this MedFM.")
    return engine


def finetune(
    train_cases: Sequence,
    val_cases: Sequence,
    base: str,
    name: str,
    store,
    config: FinetuneConfig,
    work: Path,
    device: str = "auto",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> FinetuneRun:
    """Train ``name`` from ``base`` on the cases and register it; ``stop()`` ends training early (best kept)."""
    if not train_cases or not val_cases:
        raise MedFMError("Fine-tuning needs training cases and validation cases.")
    store.check_new_name(name, replacing=resume)
    config.check(box_only=tuple(store.info(base).prompts) == ("box",))  # before minutes of embedding
    if not resume and (work / "state.pt").is_file():
        (work / "state.pt").unlink()  # a new run: an old run's checkpoint must not be mixed in
    engine = load_base_engine(base, store, device, checkpoint)
    keep_images = config.train == "decoder+lora"
    if keep_images and engine.device == "cpu":
        note = "the image encoder runs at every step with LoRA: on a CPU that takes hours; a GPU takes minutes"
        if progress is not None:
            progress("note", 0, 0, {"note": note})

    def embedding_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("embedding", done, total, {})

    sets = []
    for cases in (train_cases, val_cases):
        folder = work / "embeddings" / cache_key(engine, cases, keep_images)
        try:
            sets.append(embed_cases(engine, cases, folder, keep_images, embedding_progress, stop))
        except KeyboardInterrupt:
            raise MedFMError("Stopped while embedding the slices; nothing was trained. Run again to go on.") from None
    trainer = FineTuner(engine, sets[0], sets[1], config, work)
    result = trainer.run(progress, stop, resume)
    trainer.merge_lora()
    card = make_card(base, store.info(base), sets[0], train_cases, val_cases, config, result)
    is_sam2 = hasattr(engine.model, "forward_image")
    path = store.save_finetuned(name, engine.model.state_dict(), base, card, sam2=is_sam2)
    _write_history(work, result)
    return FinetuneRun(name, base, path, card, result, work, list(train_cases), list(val_cases))


def _write_history(work: Path, result: TrainingResult) -> None:
    """history.json, and a plot of the loss and validation Dice per epoch (when matplotlib is there)."""
    import json

    (work / "history.json").write_text(json.dumps({"dice_before": result.dice_before, "epochs": result.history},
                                                  indent=1), encoding="utf-8")  # fmt: skip
    if not result.history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [0] + [r["epoch"] for r in result.history]
    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axes.plot(epochs[1:], [r["loss"] for r in result.history], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Loss")
    dice_axes.plot(epochs, [result.dice_before] + [r["val_dice"] for r in result.history], marker="o")
    dice_axes.set(xlabel="epoch (0: before)", ylabel="validation Dice", title="Validation Dice", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(work / "training.png", dpi=100)
    plt.close(figure)
