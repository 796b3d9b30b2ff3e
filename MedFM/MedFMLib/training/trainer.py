"""The training loop: a SAM-family mask decoder (and, optionally, low-rank adapters in the image encoder)
trained on cached embeddings with simulated prompts.

- Loss: MONAI's Dice + cross-entropy on the decoder's low-res logits, plus the squared error of the
  predicted IoU, as SAM trains its IoU head. A lone point asks for three masks; the best one takes the loss.
- AdamW; every random draw comes from a generator seeded with (seed, epoch), so a run resumed from its
  checkpoint continues exactly as the uninterrupted run would.
- After each epoch: the validation Dice (each validation object prompted with its tight box), a checkpoint
  (the trained weights, the optimiser, the history), and early stopping once the validation Dice has not
  improved for ``patience`` epochs. The best epoch's weights are what is exported.
- A stop request (Ctrl-C, Stop in Slicer, a cancelled server job) ends the epoch early; the best weights
  so far are kept.

The decoder runs through the engine's own ``decoder_forward``, the path clicks take at inference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedFMError
from .embeddings import EmbeddingSet, TrainingObject
from .prompts import PROMPT_KINDS, correction_click, first_prompt, tight_box, with_click

TRAIN_MODES = ("decoder", "decoder+lora")


@dataclass
class FinetuneConfig:
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 8
    train: str = "decoder"
    prompts: tuple[str, ...] = PROMPT_KINDS
    #: correction rounds after the first prompt, for the "clicks" kind
    corrections: int = 2
    #: epochs without a better validation Dice before training stops
    patience: int = 5
    seed: int = 0
    lora_rank: int = 8

    def check(self, box_only: bool) -> None:
        if self.train not in TRAIN_MODES:
            raise MedFMError(f"--train must be one of {', '.join(TRAIN_MODES)}, not '{self.train}'.")
        unknown = [p for p in self.prompts if p not in PROMPT_KINDS]
        if unknown or not self.prompts:
            raise MedFMError(f"Unknown prompt kind {', '.join(unknown) or '(none)'}: use {','.join(PROMPT_KINDS)}.")
        if box_only and "points" in self.prompts:
            raise MedFMError("This model is box-prompted: train it with --prompts box or box,clicks.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise MedFMError("--epochs and the batch size must be at least 1, and the learning rate positive.")


@dataclass
class TrainingResult:
    history: list[dict] = field(default_factory=list)
    dice_before: float = 0.0
    best_dice: float = 0.0
    best_epoch: int = 0
    stopped: bool = False
    #: why training ended: "epochs", "early stop" or "stopped"
    reason: str = "epochs"


def _decoder(model):
    return model.mask_decoder if hasattr(model, "mask_decoder") else model.sam_mask_decoder


def _encoder(model):
    return model.image_encoder


class FineTuner:
    """Trains ``engine``'s decoder in place on ``train`` and measures it on ``val``."""

    def __init__(self, engine, train: EmbeddingSet, val: EmbeddingSet, config: FinetuneConfig, work: Path) -> None:
        import torch

        self.engine, self.train_set, self.val_set, self.config, self.work = engine, train, val, config, work
        self.model = engine.model
        self.box_only = tuple(engine.prompt_types) == ("box",)
        config.check(self.box_only)
        self.uses_lora = config.train == "decoder+lora"
        self.model.eval()  # no dropout, frozen batch norm (TinyViT): training changes weights only
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        for parameter in _decoder(self.model).parameters():
            parameter.requires_grad_(True)
        self.lora = self._add_lora() if self.uses_lora else None
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
        from monai.losses import DiceCELoss

        self.segmentation_loss = DiceCELoss(sigmoid=True)

    # ------------------------------------------------------------------ LoRA
    def _add_lora(self):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MedFMError("--train decoder+lora needs peft: pip install 'medfm[finetune]'.") from None
        import torch

        torch.manual_seed(self.config.seed)
        settings = LoraConfig(r=self.config.lora_rank, lora_alpha=2 * self.config.lora_rank,
                              target_modules=["qkv"], lora_dropout=0.0, bias="none")  # fmt: skip
        # peft puts the adapters into the encoder's own modules: the model keeps calling its encoder as before.
        return get_peft_model(_encoder(self.model), settings)

    def merge_lora(self) -> None:
        """Fold the adapters into the encoder's weights: the model has its base architecture again."""
        if self.lora is not None:
            merged = self.lora.merge_and_unload()
            self.model.image_encoder = merged
            self.lora = None

    # -------------------------------------------------------------- features
    def _features(self, dataset: EmbeddingSet, obj: TrainingObject, grad: bool):
        import torch

        if self.uses_lora:
            image = dataset.image(obj)
            with torch.set_grad_enabled(grad), self.engine.autocast():
                if hasattr(self.model, "forward_image"):  # SAM 2
                    return [f.float() for f in self.model.forward_image(self.engine.model_input(image))["backbone_fpn"]]
                x, _ = self.engine.model_input(image)
                return self.model.image_encoder(x).float()
        device = self.engine.device
        levels = [torch.from_numpy(np.array(level)).to(device).float()[None] for level in dataset.features(obj)]
        return levels if hasattr(self.model, "forward_image") else levels[0]

    # -------------------------------------------------------------- measures
    def validate(self, dataset: EmbeddingSet | None = None) -> float:
        """Mean Dice of the validation objects, each prompted with its tight box (deterministic)."""
        import torch

        from ..engines.base import Prompts2D

        dataset = dataset if dataset is not None else self.val_set
        scores = []
        with torch.no_grad():
            for obj in dataset.objects:
                info = dataset.slice_info(obj)
                features = self._features(dataset, obj, grad=False)
                truth = obj.mask  # unpacked from the cache once
                prompts = Prompts2D(box=tight_box(truth))
                low_res, _ = self.engine.decoder_forward(features, prompts, info["shape"], info["input_size"])
                mask = self.engine.image_mask(low_res[:, :1], info["input_size"], info["shape"])[0, 0].cpu().numpy()
                scores.append(_dice(mask, truth))
        return float(np.mean(scores)) if scores else 0.0

    def _object_loss(self, obj: TrainingObject, rng: np.random.Generator):
        import torch

        info = self.train_set.slice_info(obj)
        shape, input_size = info["shape"], info["input_size"]
        features = self._features(self.train_set, obj, grad=True)
        target = torch.from_numpy(obj.target).to(self.engine.device)[None, None]
        kind = self.config.prompts[int(rng.integers(len(self.config.prompts)))]
        reference = obj.mask  # unpacked from the cache once
        prompts = first_prompt(kind, reference, rng, self.box_only)
        rounds = 1 + (self.config.corrections if kind == "clicks" else 0)
        mask_input, losses = None, []
        for round_index in range(rounds):
            multimask = prompts.is_single_point and mask_input is None
            low_res, iou = self.engine.decoder_forward(features, prompts, shape, input_size, mask_input, multimask)
            candidates = [self.segmentation_loss(low_res[:, m : m + 1], target) for m in range(low_res.shape[1])]
            best = int(torch.argmin(torch.stack(candidates).detach()))
            with torch.no_grad():
                predicted, truth = low_res > 0, target >= 0.5
                overlap = (predicted & truth).flatten(2).sum(-1).float()
                union = (predicted | truth).flatten(2).sum(-1).float().clamp(min=1.0)
            losses.append(candidates[best] + torch.mean((iou.float() - overlap / union) ** 2))
            if round_index + 1 == rounds:
                break
            chosen = low_res[:, best : best + 1].detach()
            prediction = self.engine.image_mask(chosen, input_size, shape)[0, 0].cpu().numpy()
            click = correction_click(prediction, reference, rng)
            if click is None:
                break
            prompts, mask_input = with_click(prompts, *click), chosen
        return torch.stack(losses).mean()

    # ------------------------------------------------------------- the loop
    def run(
        self,
        progress: Callable[[str, int, int, dict], None] | None = None,
        stop: Callable[[], bool] | None = None,
        resume: bool = False,
    ) -> TrainingResult:
        import torch

        result = TrainingResult()
        start_epoch = 1
        best_state = None
        checkpoint = self.work / "state.pt"
        if resume and checkpoint.is_file():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if saved.get("config") != _comparable(self.config):
                raise MedFMError("--resume: the settings differ from the interrupted run's; give the same ones.")
            self._load_trainable(saved["trainable"])
            self.optimizer.load_state_dict(saved["optimizer"])
            result.history, result.dice_before = saved["history"], saved["dice_before"]
            result.best_dice, result.best_epoch = saved["best_dice"], saved["best_epoch"]
            best_state = saved["best"]
            start_epoch = saved["epoch"] + 1
        else:
            result.dice_before = result.best_dice = self.validate()
            best_state = self._trainable_copy()
        objects = self.train_set.objects
        for epoch in range(start_epoch, self.config.epochs + 1):
            if epoch - result.best_epoch > self.config.patience:
                result.reason = "early stop"
                break
            started = time.perf_counter()
            rng = np.random.default_rng([self.config.seed, epoch])
            order = rng.permutation(len(objects))
            total_loss, done = 0.0, 0
            try:
                for first in range(0, len(order), self.config.batch_size):
                    if stop is not None and stop():
                        raise KeyboardInterrupt
                    batch = order[first : first + self.config.batch_size]
                    self.optimizer.zero_grad(set_to_none=True)
                    for index in batch:
                        loss = self._object_loss(objects[index], rng) / len(batch)
                        loss.backward()
                        total_loss += float(loss.detach()) * len(batch)
                    self.optimizer.step()
                    done += len(batch)
                    if progress is not None:
                        progress(f"epoch {epoch}/{self.config.epochs}", done, len(order), {"loss": total_loss / done})
            except KeyboardInterrupt:
                result.stopped, result.reason = True, "stopped"
                break
            dice = self.validate()
            record = {"epoch": epoch, "loss": round(total_loss / max(done, 1), 5), "val_dice": round(dice, 5),
                      "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
            result.history.append(record)
            if dice > result.best_dice:
                result.best_dice, result.best_epoch, best_state = dice, epoch, self._trainable_copy()
            if progress is not None:
                progress(f"epoch {epoch}/{self.config.epochs}", len(order), len(order), dict(record))
            self._save(checkpoint, epoch, result, best_state)
        self._load_trainable(best_state)
        return result

    def _trainable_copy(self) -> dict:
        return {name: parameter.detach().cpu().clone() for name, parameter in self.trainable.items()}

    def _load_trainable(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(state[name].to(parameter.device))

    def _save(self, path: Path, epoch: int, result: TrainingResult, best_state: dict) -> None:
        import torch

        state = {"epoch": epoch, "trainable": self._trainable_copy(), "optimizer": self.optimizer.state_dict(),
                 "history": result.history, "dice_before": result.dice_before, "best_dice": result.best_dice,
                 "best_epoch": result.best_epoch, "best": best_state, "config": _comparable(self.config)}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(state, temporary)
        temporary.replace(path)  # a kill mid-write leaves the previous epoch's checkpoint


def _comparable(config: FinetuneConfig) -> dict:
    """The settings that must match for a resumed run to continue the same training (not the epoch count)."""
    values = asdict(config)
    values.pop("epochs")
    values.pop("patience")
    values["prompts"] = list(values["prompts"])
    return values


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & reference).sum() / total)
