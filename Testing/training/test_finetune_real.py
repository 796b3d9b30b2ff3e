"""The real LiteMedSAM fine-tuned on a real scan and measured on another, honestly.

With one small training case a gain is not guaranteed (the README gives the figures, whichever way they
go). What must hold: the validation figures before and after are what the model really does through
its normal inference path, and the exported model is the one that scored them.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("segment_anything")
pytest.importorskip("monai")

import torch  # noqa: E402

from conftest import REAL_DATA, real_case  # noqa: E402


def _box_dice_on_every_slice(engines, case_name: str) -> list[float]:
    """Each labelled slice of a real case prompted with its label's tight box, through each engine's decode.

    The engines share one image encoder (decoder-only fine-tuning; checked by the caller): each slice is
    encoded once, by the first.
    """
    from MedFMLib.engines.base import Prompts2D
    from MedFMLib.imaging.geometry import SlicePlane
    from MedFMLib.interaction.session import Session

    volume, labels = real_case(case_name)
    session = Session(volume, engines[0])
    scores = [[] for _ in engines]
    for k in np.flatnonzero(labels.any(axis=(1, 2))):
        plane = SlicePlane(2, int(k))
        truth = labels[k] > 0
        if truth.shape != session.model_image_shape(plane) or truth.sum() < 4:
            continue  # brain1's slices are square-pixelled: the engine sees the slice itself
        rows, cols = np.nonzero(truth)
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
        embedding = session.embedding(plane)
        for engine, engine_scores in zip(engines, scores):
            mask = engine.decode(embedding, Prompts2D(box=box)).mask
            engine_scores.append(2.0 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    return [float(np.mean(engine_scores)) for engine_scores in scores]


def test_litemedsam_fine_tuned_on_a_real_scan_is_measured_on_another(litemedsam_store, tmp_path):
    from MedFMLib.engines import create_engine
    from MedFMLib.evaluation.datasets import Case
    from MedFMLib.training.run import finetune
    from MedFMLib.training.trainer import FinetuneConfig

    store = litemedsam_store
    if "lite_real_test" in store.models():
        store.remove("lite_real_test")
    train = [Case("breast1", REAL_DATA / "breast1_image.nrrd", REAL_DATA / "breast1_label.nrrd")]
    val = [Case("brain1", REAL_DATA / "brain1_image.nrrd", REAL_DATA / "brain1_label.nrrd")]
    config = FinetuneConfig(epochs=1, lr=1e-4, batch_size=8, prompts=("box",), seed=0)
    try:
        run = finetune(train, val, "litemedsam", "lite_real_test", store, config, tmp_path / "work", "cpu")
        result = run.result
        assert len(result.history) == 1 and all(np.isfinite(e["loss"]) for e in result.history)
        base = create_engine("litemedsam", device="cpu", store=store)
        tuned = create_engine("lite_real_test", device="cpu", store=store)
        assert result.dice_before > 0.6  # the trained model on a real tumour, prompted with its box
        # Only the decoder was trained: the exported model's encoder is the base's, weight for weight.
        base_encoder, tuned_encoder = base.model.image_encoder.state_dict(), tuned.model.image_encoder.state_dict()
        assert base_encoder.keys() == tuned_encoder.keys()
        assert all(torch.equal(base_encoder[key], tuned_encoder[key]) for key in base_encoder)
        dice_base, dice_tuned = _box_dice_on_every_slice([base, tuned], "brain1")
        assert dice_base == pytest.approx(result.dice_before, abs=0.01)
        assert dice_tuned == pytest.approx(result.best_dice, abs=0.01)
        card = store.card("lite_real_test")
        assert card["license"] == store.info("litemedsam").license and card["data"]["training_cases"] == 1
        assert "brain1" not in str(card) and "breast1" not in str(card)
    finally:
        store.remove("lite_real_test")
