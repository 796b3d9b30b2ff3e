"""nnInteractive behind the volume-engine interface, on a tiny random-weight model folder in the official layout.

The weights are random, so these tests check the mechanics (what reaches nnInteractive, which region comes back,
what the engine holds) and not the quality of the masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnInteractive.inference.inference_session")

from MedFMLib.engines.nninteractive import NNInteractiveEngine, write_random_model_folder  # noqa: E402
from MedFMLib.engines.volumetric import Interaction, VolumePrediction  # noqa: E402
from MedFMLib.errors import ModelError, PromptError, VolumeError  # noqa: E402
from MedFMLib.imaging.volume import Volume  # noqa: E402

SHAPE = (64, 72, 80)  # (K, J, I); the tiny model's patch is 64³
CENTRE = (30, 36, 40)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_random_model_folder(tmp_path_factory.mktemp("nninteractive") / "nnInteractive_tiny", "tiny")


@pytest.fixture(scope="module")
def volume() -> Volume:
    """A bright sphere in a noisy body, on an anisotropic grid (the engine must not care)."""
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    sphere = (k - CENTRE[0]) ** 2 + (j - CENTRE[1]) ** 2 + (i - CENTRE[2]) ** 2 < 12**2
    noise = np.random.default_rng(0).normal(0.0, 5.0, SHAPE)
    return Volume((100.0 + 200.0 * sphere + noise).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0]), "sphere")


class Spy:
    """Wraps a session method: records each call's arguments and the thread count it ran with, then calls it."""

    def __init__(self, session, name: str):
        self.original = getattr(session, name)
        self.calls: list[tuple[tuple, dict]] = []
        self.threads: list[int] = []
        setattr(session, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        self.threads.append(torch.get_num_threads())
        return self.original(*args, **kwargs)


@pytest.fixture
def engine(folder, volume):
    engine = NNInteractiveEngine.from_folder(folder, device="cpu", autozoom=False)
    engine.set_volume(volume)
    yield engine
    engine.close()


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def placed(engine, interaction: Interaction) -> VolumePrediction:
    """Run an interaction and check that its region, put onto the mask from before, gives the engine's new mask."""
    before = engine.mask
    prediction = engine.interact(interaction)
    assert isinstance(prediction, VolumePrediction) and prediction.mask.dtype == bool
    assert all(o >= 0 and o + n <= s for o, n, s in zip(prediction.offset, prediction.mask.shape, SHAPE))
    np.testing.assert_array_equal(prediction.full(SHAPE, before), engine.mask)
    return prediction


# ---------------------------------------------------------------------- loading
def test_the_folder_has_the_official_layout_and_loads(folder, volume):
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    expected = {"plans.json", "dataset.json", "inference_session_class.json", "LICENSE", "fold_0/checkpoint_final.pth"}
    assert names == expected
    saved = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert saved["trainer_name"] == "nnInteractiveTrainer_stub" and saved["init_args"]["configuration"]
    # 1 image + 7 interaction channels into the first convolution, as in the published model
    first = next(v for k, v in saved["network_weights"].items() if k.endswith("stem.convs.0.conv.weight"))
    assert first.shape[1] == 8
    engine = NNInteractiveEngine.from_folder(folder, autozoom=False)
    assert engine.model_name == "nninteractive" and engine.cache_id == "nninteractive@cpu"
    assert engine.interactions == ("point", "box", "scribble", "lasso", "mask") and engine.kind == "volume"
    assert engine.license.startswith("Random weights")
    engine.close()


def test_loading_and_interacting_keep_the_hosts_thread_count_and_print_nothing(folder, volume, capsys):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = NNInteractiveEngine.from_folder(folder, autozoom=False, threads=2)
        assert torch.get_num_threads() == 1
        engine.set_volume(volume)
        spy = Spy(engine._session, "add_point_interaction")
        engine.interact(Interaction("point", [CENTRE]))
        assert spy.threads == [2]  # nnInteractive's work runs with the engine's count ...
        assert torch.get_num_threads() == 1  # ... and the host's comes back
        engine.close()
    finally:
        torch.set_num_threads(previous)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_a_folder_without_plans_is_refused_in_one_line(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "plans.json").unlink()
    with pytest.raises(ModelError) as caught:
        NNInteractiveEngine.from_folder(broken)
    message = one_line(caught)
    assert "plans.json" in message and "medfm models download nninteractive" in message
    assert "medfm models import FOLDER --name nninteractive" in message


def test_a_truncated_checkpoint_is_refused_in_one_line(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    checkpoint = broken / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ModelError) as caught:
        NNInteractiveEngine.from_folder(broken, model_name="nni_custom")
    message = one_line(caught)
    assert "checkpoint_final.pth" in message and "medfm models download nni_custom" in message


def test_a_checkpoint_with_nnunets_training_records_loads(folder, tmp_path):
    """nnU-Net checkpoints carry numpy float64 training logs and a torch.device; they are data, not code."""
    copy = shutil.copytree(folder, tmp_path / "trained")
    checkpoint = copy / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    records = {
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.6)], "epoch": [np.int64(3)]},
        "_best_ema": np.float64(0.8),
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "init_args": {**saved["init_args"], "device": torch.device("cuda"), "plans": {"a": [1, 2]}},
    }
    torch.save({**saved, **records}, checkpoint)
    NNInteractiveEngine.from_folder(copy, autozoom=False).close()


class _Trap:
    """Unpickling this would create a file: a checkpoint that runs code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    checkpoint = broken / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**saved, "logging": _Trap(marker)}, checkpoint)
    with pytest.raises(ModelError) as caught:
        NNInteractiveEngine.from_folder(broken)
    assert "not weights" in one_line(caught)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_plans_are_refused_in_one_line(folder, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    plans = json.loads((broken / "plans.json").read_text())
    (configuration,) = plans["configurations"].values()
    configuration["architecture"]["arch_kwargs"]["features_per_stage"][0] += 2
    (broken / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError) as caught:
        NNInteractiveEngine.from_folder(broken)
    assert "do not fit" in one_line(caught)


def test_an_all_zero_volume_is_refused(engine):
    with pytest.raises(VolumeError) as caught:
        engine.set_volume(Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), "blank"))
    assert "all zeros" in one_line(caught)


# ---------------------------------------------------------------------- interactions
def test_a_click_returns_the_patch_around_it(engine):
    spy = Spy(engine._session, "add_point_interaction")
    first = placed(engine, Interaction("point", [[30.2, 35.8, 40.4]]))
    assert spy.calls[0][0][0] == CENTRE and spy.calls[0][1]["include_interaction"] is True
    # without AutoZoom the model runs once on the 64³ patch centred on the click, clipped to the volume
    assert first.offset == (0, 4, 8) and first.mask.shape == (62, 64, 64)
    second = placed(engine, Interaction("point", [[30, 36, 60]], positive=False))
    assert spy.calls[1][0][0] == (30, 36, 60) and spy.calls[1][1]["include_interaction"] is False
    assert second.offset == (0, 4, 28) and second.mask.shape == (62, 64, 52)


def test_a_2d_box_reaches_nninteractive_as_half_open_ranges(engine):
    spy = Spy(engine._session, "add_bbox_interaction")
    prediction = placed(engine, Interaction("box", [[30, 46, 50], [30, 26, 30]]))
    assert spy.calls[0][0][0] == [[30, 31], [26, 47], [30, 51]]
    low = np.asarray(prediction.offset)
    assert np.all(low <= [30, 26, 30]) and np.all(low + prediction.mask.shape >= [31, 47, 51])


def test_a_3d_box_is_refused_with_advice(engine):
    spy = Spy(engine._session, "add_bbox_interaction")
    with pytest.raises(PromptError) as caught:
        engine.interact(Interaction("box", [[25, 26, 30], [35, 46, 50]]))
    assert one_line(caught) == "nnInteractive v1.0 takes boxes drawn on one slice; draw the box in one view."
    assert spy.calls == []


def test_a_scribble_is_painted_on_its_slice_with_the_models_brush(engine):
    spy = Spy(engine._session, "add_scribble_interaction")
    placed(engine, Interaction("scribble", [[30, 30, 35], [30, 40, 45]], positive=False))
    (image,), kwargs = spy.calls[0]
    assert kwargs["include_interaction"] is False
    (k0, k1), (j0, j1), (i0, i1) = kwargs["interaction_bbox"]
    assert (k0, k1) == (30, 31) and image.shape == (1, j1 - j0, i1 - i0) and image.dtype == np.uint8
    painted = np.zeros(SHAPE, bool)
    painted[k0:k1, j0:j1, i0:i1] = image.astype(bool)
    diagonal = [(30, 30 + n, 35 + n) for n in range(11)]
    assert all(painted[v] for v in diagonal)
    # a 2-voxel brush: about twice the line's voxels, not more than the brush's square around each
    assert 2 * len(diagonal) <= painted.sum() <= 4 * len(diagonal)


def test_a_lasso_fills_its_polygon(engine):
    spy = Spy(engine._session, "add_lasso_interaction")
    placed(engine, Interaction("lasso", [[30, 30, 35], [30, 30, 45], [30, 40, 45], [30, 40, 35]]))
    (image,), kwargs = spy.calls[0]
    assert kwargs["include_interaction"] is True and kwargs["interaction_bbox"] == [[30, 31], [30, 41], [35, 46]]
    assert image.shape == (1, 11, 11) and image.all()


def test_an_initial_mask_replaces_everything_and_is_refined(engine):
    placed(engine, Interaction("point", [CENTRE]))
    initial = np.zeros(SHAPE, bool)
    initial[25:35, 30:42, 35:45] = True
    spy = Spy(engine._session, "add_initial_seg_interaction")
    prediction = placed(engine, Interaction("mask", mask=initial))
    assert spy.calls[0][1]["run_prediction"] is True
    np.testing.assert_array_equal(spy.calls[0][0][0], initial.astype(np.uint8))
    assert prediction.offset == (0, 0, 0) and prediction.mask.shape == SHAPE  # the whole buffer was replaced
    with pytest.raises(PromptError):
        engine.interact(Interaction("mask", mask=np.zeros((4, 4, 4), bool)))


def test_start_object_forgets_the_previous_object(engine):
    placed(engine, Interaction("point", [CENTRE]))
    assert engine.mask.any()  # random weights still label something in a 64³ patch
    assert engine.start_object() is None
    assert not engine.mask.any()
    initial = np.zeros(SHAPE, bool)
    initial[20:30, 20:30, 20:30] = True
    started = engine.start_object(initial)
    np.testing.assert_array_equal(started.full(SHAPE), initial)
    np.testing.assert_array_equal(engine.mask, initial)
    # the next click builds on the initial mask: outside the returned region it is kept
    after = placed(engine, Interaction("point", [[50, 60, 70]]))
    outside = np.ones(SHAPE, bool)
    outside[after.region] = False
    np.testing.assert_array_equal(engine.mask[outside], initial[outside])


def test_prompts_before_a_volume_or_outside_it_are_refused(folder, engine):
    fresh = NNInteractiveEngine.from_folder(folder, autozoom=False)
    with pytest.raises(PromptError) as caught:
        fresh.interact(Interaction("point", [CENTRE]))
    assert "load a volume" in one_line(caught)
    fresh.close()
    with pytest.raises(PromptError) as caught:
        engine.interact(Interaction("point", [[30, 36, 90]]))
    assert "outside the volume" in one_line(caught)
    placed(engine, Interaction("point", [CENTRE]))
    before = engine.mask
    with pytest.raises(PromptError) as caught:
        engine.start_object(np.ones((8, 8, 8), bool))
    assert "shape" in one_line(caught)
    np.testing.assert_array_equal(engine.mask, before)  # a refused mask leaves the object as it was
