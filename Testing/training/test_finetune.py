"""Fine-tuning: tiny random-weight SAM and SAM 2 on phantoms, and what a user sees on the command line.

The tiny models start with plain random decoders (``decoder_scale=1``), the initialisation a network
trains from; their validation Dice starts near zero, and a decoder that learns anything lifts it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("segment_anything")
pytest.importorskip("monai")

from MedFMLib.errors import MedFMError  # noqa: E402
from MedFMLib.testing import phantom_cases, write_tiny_sam2_catalog, write_tiny_sam_catalog  # noqa: E402

#: what training must add to the validation Dice of a random decoder on phantoms (observed: about +0.8)
SAM_MARGIN = 0.4
SAM2_MARGIN = 0.2


def _store(tmp_path, monkeypatch, sam2: bool = False):
    from MedFMLib.models.store import ModelStore

    folder = tmp_path / "catalog"
    catalog = (write_tiny_sam2_catalog if sam2 else write_tiny_sam_catalog)(folder, decoder_scale=1.0)
    monkeypatch.setenv("MEDFM_CATALOG", str(catalog))
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    store = ModelStore()
    base = "sam2_tiny" if sam2 else "sam_tiny"
    store.import_file(folder / ("sam2_tiny.pt" if sam2 else "sam_tiny.pth"), base)
    return store, base


def _config(**changes):
    from MedFMLib.training.trainer import FinetuneConfig

    settings = dict(epochs=6, lr=1e-3, batch_size=2, seed=0, patience=10)
    settings.update(changes)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def trained_sam(tmp_path_factory):
    """One tiny SAM fine-tuned on four phantom cases, validated on two."""
    from MedFMLib.training.run import finetune

    monkeypatch = pytest.MonkeyPatch()
    tmp_path = tmp_path_factory.mktemp("finetune")
    store, base = _store(tmp_path, monkeypatch)
    cases = phantom_cases(6)
    run = finetune(cases[:4], cases[4:], base, "phantom_sam", store, _config(), tmp_path / "work", device="cpu")
    yield store, run, cases
    monkeypatch.undo()


def test_training_lowers_the_loss_and_lifts_validation_dice(trained_sam):
    _, run, _ = trained_sam
    losses = [epoch["loss"] for epoch in run.result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert run.result.best_dice >= run.result.dice_before + SAM_MARGIN
    assert (run.work / "training.png").is_file() and (run.work / "history.json").is_file()


def test_the_saved_model_loads_by_name_and_reproduces_its_validation_figure(trained_sam, tmp_path):
    """The checkpoint is in SAM's own format (a bare state dict) and loads through the normal engine."""
    import torch

    from MedFMLib.engines import create_engine
    from MedFMLib.training.embeddings import embed_cases
    from MedFMLib.training.trainer import FineTuner

    store, run, cases = trained_sam
    saved = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(value) for value in saved.values())
    engine = create_engine("phantom_sam", device="cpu", store=store)
    # The validation slices embedded afresh by the loaded model's own encoder.
    fresh = embed_cases(engine, cases[4:], tmp_path / "fresh")
    tuner = FineTuner(engine, fresh, fresh, _config(), tmp_path / "unused")
    assert tuner.validate() == pytest.approx(run.result.best_dice, abs=0.01)
    base = FineTuner(create_engine("sam_tiny", device="cpu", store=store), fresh, fresh, _config(), tmp_path / "u2")
    assert base.validate() == pytest.approx(run.result.dice_before, abs=0.01)


def test_the_model_card_has_figures_and_no_names(trained_sam):
    store, run, cases = trained_sam
    card = store.card("phantom_sam")
    assert card["base_model"] == "sam_tiny" and card["license"] == "Apache-2.0"
    assert card["data"]["training_cases"] == 4 and card["data"]["validation_cases"] == 2
    assert card["data"]["training_objects"] >= card["data"]["training_slices"] > 0
    assert card["validation_dice"]["after"] == round(run.result.best_dice, 4)
    text = json.dumps(card)
    for case in cases:
        assert case.name not in text
    assert "/" not in text.replace("a fine-tune", "") and ".nii" not in text and ".pth" not in text
    assert "fine-tuned from sam_tiny on 4 cases" in store.info("phantom_sam").description


def test_a_name_in_use_is_refused_in_one_line(trained_sam):
    store, _, _ = trained_sam
    with pytest.raises(MedFMError, match="A model named 'phantom_sam' exists"):
        store.check_new_name("phantom_sam")
    with pytest.raises(MedFMError, match="catalog model"):
        store.check_new_name("sam_tiny")


def test_sam2_fine_tunes_and_saves_in_its_format(tmp_path, monkeypatch):
    import torch

    from MedFMLib.engines import create_engine
    from MedFMLib.training.run import finetune

    store, base = _store(tmp_path, monkeypatch, sam2=True)
    cases = phantom_cases(6, seed=3)
    run = finetune(cases[:4], cases[4:], base, "phantom_sam2", store, _config(epochs=3), tmp_path / "work", "cpu")
    assert run.result.best_dice >= run.result.dice_before + SAM2_MARGIN
    assert run.checkpoint.suffix == ".pt"
    assert set(torch.load(run.checkpoint, map_location="cpu", weights_only=True)) == {"model"}
    engine = create_engine("phantom_sam2", device="cpu", store=store)
    assert engine.model_name == "phantom_sam2"


def test_resume_continues_exactly_where_training_stopped(tmp_path, monkeypatch):
    """Stopped after epoch 2 and resumed, a run ends with the figures of the run never stopped."""
    from MedFMLib.training.run import finetune

    store, base = _store(tmp_path, monkeypatch)
    cases = phantom_cases(4, seed=5)
    whole = finetune(cases[:3], cases[3:], base, "whole", store, _config(epochs=4), tmp_path / "a", "cpu")
    seen = []

    def progress(phase, done, total, info):
        if "val_dice" in info:
            seen.append(info["epoch"])

    stopped = finetune(cases[:3], cases[3:], base, "halves", store, _config(epochs=4), tmp_path / "b", "cpu",
                       progress=progress, stop=lambda: len(seen) >= 2)  # fmt: skip
    assert stopped.result.stopped and [e["epoch"] for e in stopped.result.history] == [1, 2]
    assert stopped.checkpoint.is_file()  # Stop leaves a usable model: the best epoch so far
    resumed = finetune(cases[:3], cases[3:], base, "halves", store, _config(epochs=4), tmp_path / "b", "cpu",
                       resume=True)  # fmt: skip
    assert [e["epoch"] for e in resumed.result.history] == [1, 2, 3, 4]
    for a, b in zip(whole.result.history, resumed.result.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-4)


def test_lora_adapters_merge_back_into_the_base_architecture(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    import torch

    from MedFMLib.engines import create_engine
    from MedFMLib.training.run import finetune

    store, base = _store(tmp_path, monkeypatch)
    cases = phantom_cases(3, seed=7)
    run = finetune(cases[:2], cases[2:], base, "lora", store, _config(epochs=2, train="decoder+lora"),
                   tmp_path / "work", "cpu")  # fmt: skip
    before = torch.load(store.path(base), map_location="cpu", weights_only=True)
    after = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    assert set(before) == set(after)  # no adapter keys left: the base format
    changed = [k for k in before if k.startswith("image_encoder.") and not torch.equal(before[k], after[k])]
    assert changed and all(".qkv." in k for k in changed)  # only the attention projections moved
    assert create_engine("lora", device="cpu", store=store).model_name == "lora"


@pytest.mark.parametrize("problem", ["corrupt", "empty", "mismatched"])
def test_bad_cases_give_one_clear_line(tmp_path, monkeypatch, problem):
    from MedFMLib.evaluation.datasets import find_cases
    from MedFMLib.imaging.io import write_labelmap
    from MedFMLib.testing import write_phantom_dataset
    from MedFMLib.training.run import finetune

    store, base = _store(tmp_path, monkeypatch)
    folder = write_phantom_dataset(tmp_path / "data", 3)
    victim = folder / "labelsTr" / "phantom1.nii.gz"
    if problem == "corrupt":
        victim.write_bytes(b"not an image")
    else:
        case = phantom_cases(3)[1]
        labels = np.zeros_like(case.labels) if problem == "empty" else case.labels[:-1]
        volume = case.volume
        if problem == "mismatched":
            volume = type(volume)(volume.array[:-1], volume.ijk_to_ras)
        write_labelmap(victim, labels.astype(np.uint8), volume)
    cases = find_cases(folder)
    with pytest.raises(MedFMError) as caught:
        finetune(cases[:2], cases[2:], base, "bad", store, _config(epochs=1), tmp_path / "work", "cpu")
    message = str(caught.value)
    assert "\n" not in message and "phantom1" in message
    assert {"corrupt": "phantom1", "empty": "empty", "mismatched": "shape"}[problem] in message
    assert "bad" not in store.models()  # nothing was trained or registered


def test_a_model_that_is_not_sam_family_is_refused(tmp_path, monkeypatch):
    from MedFMLib.training.run import finetune

    store, _ = _store(tmp_path, monkeypatch)
    cases = phantom_cases(2)
    with pytest.raises(MedFMError, match="not a SAM-family model"):
        finetune(cases[:1], cases[1:], "classic", "x", store, _config(epochs=1), tmp_path / "work", "cpu")


@pytest.mark.parametrize("sam2", [False, True], ids=["sam", "sam2"])
def test_tiny_models_train_on_real_scans(tmp_path, monkeypatch, sam2):
    """Real anatomy through the same path: the loss falls; the figures are measured, not assumed (a random
    decoder does not learn a breast lesion's look from one scan well enough to find a prostate structure)."""
    from conftest import REAL_DATA
    from MedFMLib.evaluation.datasets import Case
    from MedFMLib.training.run import finetune

    store, base = _store(tmp_path, monkeypatch, sam2=sam2)
    train = [Case("breast1", REAL_DATA / "breast1_image.nrrd", REAL_DATA / "breast1_label.nrrd")]
    val = [Case("prostate", REAL_DATA / "prostate_phantom_subvolume.nrrd",
                REAL_DATA / "prostate_phantom_subvolume-label.nrrd")]  # fmt: skip
    run = finetune(train, val, base, "real_tiny", store, _config(epochs=3, batch_size=1), tmp_path / "work", "cpu")
    losses = [epoch["loss"] for epoch in run.result.history]
    assert len(losses) == 3 and all(later < earlier for earlier, later in zip(losses, losses[1:]))  # falls each epoch
    assert 0.0 <= run.result.dice_before <= 1.0 and run.result.best_dice >= run.result.dice_before
    card = store.card("real_tiny")
    assert card["data"]["training_cases"] == 1 and card["data"]["training_objects"] > 0
    assert "breast1" not in json.dumps(card) and "prostate" not in json.dumps(card)
