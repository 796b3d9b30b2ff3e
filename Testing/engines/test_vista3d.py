"""VISTA3D behind the volume-engine interface: MONAI's real network with random weights, and a stub with known answers.

The random weights say nothing about quality, so the real network checks the mechanics (checkpoints, what reaches
MONAI's inferer, the cache, shapes, no NaN). Geometry is checked with a stub network whose answer is known: a ball
around each click in the model grid, or the bright voxels for a class prompt. Mapped back onto an oblique, LPS-like,
anisotropic volume, those must land where the click and the bright cube are in millimetres.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("skimage")
pytest.importorskip("nibabel")

import monai.apps.vista3d.inferer as monai_inferer  # noqa: E402

from MedFMLib.engines import vista3d  # noqa: E402
from MedFMLib.engines.vista3d import (  # noqa: E402
    BOX_NOTE,
    Vista3DEngine,
    label_table,
    load_vista3d_network,
    save_random_vista3d,
)
from MedFMLib.engines.volumetric import Interaction  # noqa: E402
from MedFMLib.errors import ModelError, PromptError  # noqa: E402
from MedFMLib.imaging.phantoms import make_ijk_to_ras  # noqa: E402
from MedFMLib.imaging.volume import Volume  # noqa: E402

SHAPE = (32, 40, 48)  # (K, J, I)
#: oblique, flipped like LPS storage, anisotropic: every mapping error shows
MATRIX = make_ijk_to_ras((0.8, 0.75, 1.25), (50.0, -40.0, 7.5), (-12, 20, 8), (-1, -1, 1))
CUBE = (slice(12, 24), slice(14, 26), slice(18, 30))  # the bright cube, (K, J, I)
CLICK = np.array([17.0, 19.0, 23.0])  # (k, j, i), off the grid's centre


def phantom(matrix: np.ndarray = MATRIX) -> Volume:
    array = np.full(SHAPE, -1000.0, np.float32)  # air
    array[3:29, 4:36, 5:43] = 40.0  # body, HU > 0
    array[CUBE] = 300.0
    return Volume(array.astype(np.int16), matrix, "phantom")


def ras(volume: Volume, kji: np.ndarray) -> np.ndarray:
    return volume.ijk_to_ras_points(np.asarray(kji, dtype=np.float64)[..., ::-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_vista3d(tmp_path_factory.mktemp("vista3d") / "model.pt", embed_dim=8, seed=0)


@pytest.fixture(scope="module")
def network(checkpoint):
    return load_vista3d_network(checkpoint, embed_dim=8)


@pytest.fixture(scope="module")
def volume() -> Volume:
    return phantom()


@pytest.fixture
def real(network, volume) -> Vista3DEngine:
    engine = Vista3DEngine(network, device="cpu", roi_size=32)
    engine.set_volume(volume)
    return engine


class StubVista(torch.nn.Module):
    """Answers as VISTA3D is called, with known logits: a ball of ``radius`` model voxels around each positive click
    (negative clicks carve one out) on top of ``prev_mask``; class prompts give the bright voxels (> 0.56 after the
    intensity window, i.e. the 300 HU cube)."""

    def __init__(self, radius: float = 3.0) -> None:
        super().__init__()
        self.radius = radius
        self.image_embeddings = None
        self.calls: list[dict] = []

    def forward(self, input_images, patch_coords=None, point_coords=None, point_labels=None, class_vector=None,
                prompt_class=None, prev_mask=None, transpose=False, **kwargs):  # fmt: skip
        window = patch_coords[0][-3:]
        self.calls.append({"window": window, "prompt_class": prompt_class, "labels": point_labels})
        shape = input_images.shape[-3:]
        if class_vector is not None:
            logits = ((input_images[0, 0] - 0.56) * 20.0).expand(len(class_vector), 1, *shape).clone()
        else:
            axes = [torch.arange(s.start, s.stop, dtype=torch.float32) for s in window]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
            logits = prev_mask[(0, 0, *window)].clone() if prev_mask is not None else torch.full(shape, -5.0)
            for point, label in zip(point_coords[0], point_labels[0]):
                ball = self.radius - (grid - point).norm(dim=-1)
                logits = torch.maximum(logits, ball) if int(label) in (1, 3) else torch.minimum(logits, -ball)
            logits = logits[None, None]
        return logits.transpose(0, 1) if transpose else logits


@pytest.fixture
def stub(volume):
    engine = Vista3DEngine(StubVista(), device="cpu", roi_size=16)
    engine.set_volume(volume)
    return engine


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_is_strict_and_exact(checkpoint, network, tmp_path):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert len(saved) == 259 and all(k.split(".")[0] in ("image_encoder", "class_head", "point_head") for k in saved)
    loaded = network.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # a dict wrapping the weights (as training scripts save them) loads too
    torch.save({"state_dict": saved, "epoch": 3}, tmp_path / "wrapped.pt")
    wrapped = load_vista3d_network(tmp_path / "wrapped.pt", embed_dim=8).state_dict()
    assert all(torch.equal(saved[k], wrapped[k]) for k in saved)
    # a half-precision copy comes back in float32, as the network computes
    torch.save({k: v.half() for k, v in saved.items()}, tmp_path / "half.pt")
    half = load_vista3d_network(tmp_path / "half.pt", embed_dim=8)
    assert {(p.dtype, p.device.type) for p in half.parameters()} == {(torch.float32, "cpu")}


def test_random_checkpoints_are_deterministic(checkpoint, tmp_path):
    again = torch.load(save_random_vista3d(tmp_path / "again.pt", embed_dim=8, seed=0), weights_only=True)
    first = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated", "other tensors"])
def test_wrong_or_corrupt_file_is_one_line_model_error(checkpoint, tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:100_000])
    elif content == "other tensors":
        torch.save({"weight": torch.zeros(3), "bias": torch.ones(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError) as error:
        load_vista3d_network(path, embed_dim=8)
    message = str(error.value)
    assert "\n" not in message and "not a VISTA3D checkpoint" in message
    assert "medfm models download vista3d" in message


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*medfm models download vista3d"):
        load_vista3d_network(tmp_path / "absent.pt")


def test_other_width_names_the_counts(checkpoint):
    with pytest.raises(ModelError) as error:
        load_vista3d_network(checkpoint, embed_dim=16)
    message = str(error.value)
    assert "\n" not in message
    assert "0 missing, 0 unexpected and " in message and "mismatched weights" in message
    mismatched = int(message.split("unexpected and ")[1].split()[0])
    assert 0 < mismatched < 259
    assert "width 8" in message


# ------------------------------------------------------------------ class table
def test_label_table_is_the_bundles():
    table = label_table()
    ids = [label["id"] for label in table["labels"]]
    assert ids == [i for i in range(1, 133) if i not in (16, 18, 129, 130, 131)]
    names = {label["id"]: label["name"] for label in table["labels"]}
    assert (names[1], names[2], names[5], names[14], names[57], names[132]) == (
        "liver", "kidney", "right kidney", "left kidney", "trachea", "airway",
    )  # fmt: skip
    assert len(set(names.values())) == 127
    assert all(len(lb["color"]) == 3 and all(0.0 <= c <= 1.0 for c in lb["color"]) for lb in table["labels"])
    assert "model-zoo" in table["source"] and "GenericAnatomyColors" in table["colour_source"]
    assert len(table["everything"]) == 117 and set(table["everything"]) <= set(ids)
    assert not {2, 20, 21, 23, 24, 25, 26, 27, 128, 132} & set(table["everything"])


def test_class_names_groups_and_everything(stub):
    assert len(stub.classes) == 127 and stub.classes["liver"] == 1
    assert stub.class_ids("Liver") == [1]
    assert stub.class_ids("vertebrae_L5") == [33]
    assert stub.class_ids("kidney") == [14, 5]
    assert stub.class_ids("lung") == [28, 29, 30, 31, 32]
    assert len(stub.class_ids("bone")) == 62
    everything = stub.class_ids("everything")
    assert len(everything) == 117 == len(set(everything))
    assert stub.class_colors["liver"] == tuple(label_table()["labels"][0]["color"])


def test_unknown_class_suggests_close_names(stub):
    with pytest.raises(PromptError) as error:
        stub.interact(Interaction("class", class_name="livr"))
    assert "\n" not in str(error.value) and "livr" in str(error.value) and "liver" in str(error.value)
    with pytest.raises(PromptError, match="left kidney"):
        stub.segment_classes(["left kidny"])
    with pytest.raises(PromptError, match="many classes"):
        stub.interact(Interaction("class", class_name="everything"))


# ------------------------------------------------------------------ geometry
def test_voxel_to_model_grid_and_back(stub, volume):
    rng = np.random.default_rng(0)
    kji = rng.uniform(0, np.array(SHAPE) - 1, size=(20, 3))
    xyz = stub.to_model_grid(kji)
    np.testing.assert_allclose(stub.from_model_grid(xyz), kji, atol=1e-6)
    # the same millimetres: model affine at the model coordinates is the volume's RAS at the voxel
    model_ras = xyz @ stub.model_affine[:3, :3].T + stub.model_affine[:3, 3]
    np.testing.assert_allclose(model_ras, ras(volume, kji), atol=1e-6)
    assert np.all(np.abs(np.linalg.norm(stub.model_affine[:3, :3], axis=0) - 1.5) < 1e-6)  # 1.5 mm


def test_image_lands_where_the_voxels_map(stub):
    """A bright blob off the centre appears in the model's image where ``to_model_grid`` says."""
    array = np.full(SHAPE, 40, np.int16)
    array[7:10, 28:31, 9:12] = 1000
    stub.set_volume(Volume(array, MATRIX))
    image = stub._image[0, 0]
    peak = np.unravel_index(int(torch.argmax(image)), tuple(image.shape))
    expected = stub.to_model_grid(np.array([[8.0, 29.0, 10.0]]))[0]
    assert np.linalg.norm(np.array(peak) - expected) <= 1.0
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_click_comes_back_where_it_was_made(stub, volume):
    prediction = stub.interact(Interaction("point", CLICK[None]))
    full = prediction.full(SHAPE)
    assert full.shape == SHAPE and full.dtype == bool and full[tuple(CLICK.astype(int))]
    voxels = np.argwhere(full)
    centre = ras(volume, voxels.mean(axis=0))
    assert np.linalg.norm(centre - ras(volume, CLICK)) < 0.6  # mm
    # a ball of 3 model voxels (4.5 mm): its size in the volume's voxels, and nothing far from the click
    expected = 4 / 3 * np.pi * 4.5**3 / abs(np.linalg.det(MATRIX[:3, :3]))
    assert 0.8 * expected < len(voxels) < 1.2 * expected
    assert np.linalg.norm(ras(volume, voxels) - ras(volume, CLICK), axis=1).max() < 4.5 + 1.5


def test_class_prompt_comes_back_on_the_cube(stub, volume):
    prediction = stub.interact(Interaction("class", class_name="liver"))
    full = prediction.full(SHAPE)
    cube = np.zeros(SHAPE, bool)
    cube[CUBE] = True
    assert (full & cube).sum() / (full | cube).sum() > 0.7
    centre = np.argwhere(full).mean(axis=0)
    assert np.linalg.norm(ras(volume, centre) - ras(volume, np.argwhere(cube).mean(axis=0))) < 1.0
    # clicks on a class object tell the point head the class; tumours and vessels take labels 3 and 2
    stub.interact(Interaction("point", CLICK[None], positive=False))
    assert int(stub.network.calls[-1]["prompt_class"]) == 1 and stub.network.calls[-1]["labels"].tolist() == [[0]]
    stub.interact(Interaction("class", class_name="hepatic vessel"))
    stub.interact(Interaction("point", CLICK[None]))
    stub.interact(Interaction("point", CLICK[None] + 2, positive=False))
    assert int(stub.network.calls[-1]["prompt_class"]) == 25
    assert stub.network.calls[-1]["labels"].tolist() == [[3, 2]]


def test_windows_a_click_misses_keep_the_mask_exactly(stub):
    # speckle: resampled to 1.5 mm and back it would not survive, so any voxel that was recomputed shows
    initial = np.random.default_rng(1).random(SHAPE) < 0.3
    assert stub.start_object(initial) is None
    click = np.array([[8.0, 30.0, 8.0]])
    prediction = stub.interact(Interaction("point", click))
    full = prediction.full(SHAPE, previous=initial)
    assert full[8, 30, 8]
    region = np.zeros(SHAPE, bool)
    region[prediction.region] = True
    assert not region.all()  # a region, not the whole volume
    window = stub.network.calls[-1]["window"]
    xyz = stub.to_model_grid(np.argwhere(region))
    # (a hundredth of a voxel off the window's faces, where rounding decides)
    missed = ~np.all([(xyz[:, a] > s.start - 0.51) & (xyz[:, a] < s.stop - 0.49) for a, s in enumerate(window)], 0)
    outside = np.argwhere(region)[missed]
    assert len(outside) > 1000  # the region's corners that the oblique window does not cover
    np.testing.assert_array_equal(full[tuple(outside.T)], initial[tuple(outside.T)])
    np.testing.assert_array_equal(full[~region], initial[~region])


def test_mask_interaction_starts_the_object_from_it(stub):
    initial = np.zeros(SHAPE, bool)
    initial[10:14, 12:20, 15:25] = True
    prediction = stub.interact(Interaction("mask", mask=initial))
    np.testing.assert_array_equal(prediction.full(SHAPE), initial)
    assert stub._prev is not None and float(stub._prev.max()) > 0 and float(stub._prev.min()) < 0


def test_box_is_given_as_its_centre_with_a_note(stub):
    box = np.array([[14.0, 15.0, 19.0], [20.0, 23.0, 27.0]])
    prediction = stub.interact(Interaction("box", box))
    assert stub.last_note == BOX_NOTE
    assert prediction.full(SHAPE)[17, 19, 23]
    np.testing.assert_allclose(stub._points[-1], stub.to_model_grid(box.mean(axis=0)[None])[0], atol=1e-6)
    stub.interact(Interaction("point", CLICK[None]))
    assert stub.last_note is None


def test_clicks_outside_the_cropped_body(volume):
    array = np.full(SHAPE, -1000, np.int16)
    array[2:8, 2:8, 2:8] = 50  # a small body in a corner: the crop keeps it and 15 mm around it
    engine = Vista3DEngine(StubVista(), roi_size=16)
    engine.set_volume(Volume(array, MATRIX))
    assert max(engine.model_shape) < 32
    far = np.array([[30.0, 38.0, 46.0]])
    with pytest.raises(PromptError, match="outside the body"):
        engine.interact(Interaction("point", far))
    prediction = engine.interact(Interaction("point", far, positive=False))
    assert prediction.mask.size == 0 and "nothing changed" in engine.last_note
    assert engine._points == []
    with pytest.raises(PromptError, match="outside the volume"):
        engine.interact(Interaction("point", np.array([[40.0, 1.0, 1.0]])))


def test_segment_classes_groups_everything_and_progress(stub, monkeypatch):
    monkeypatch.setattr(vista3d, "CLASS_PASS_BYTES", 1)  # one pass per class: the passes must compete fairly
    seen, calls = [], len(stub.network.calls)
    masks = stub.segment_classes(["kidney", "Liver"], progress=lambda done, total: seen.append((done, total)))
    assert list(masks) == ["left kidney", "right kidney", "liver"]
    assert all(m.shape == SHAPE and m.dtype == bool for m in masks.values())
    # the classes compete: with identical logits the first takes the voxels, as an argmax does
    assert masks["left kidney"][CUBE].mean() > 0.7 and not masks["right kidney"].any() and not masks["liver"].any()
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    windows = len(stub.network.calls) - calls
    assert windows == seen[-1][1] == 3 * vista3d._window_count(stub.model_shape, (16,) * 3, 0.3)
    monkeypatch.undo()
    everything = stub.segment_classes(["everything"])
    assert len(everything) == 117 and set(everything) == {stub._names[i] for i in stub.everything}


# ------------------------------------------------------------------ the real network
def test_real_network_clicks_accumulate_and_reuse_the_window(real, monkeypatch):
    calls = []
    original = monai_inferer.point_based_window_inferer

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(monai_inferer, "point_based_window_inferer", spy)
    encoder_runs = []
    hook = real.network.image_encoder.register_forward_hook(lambda *args: encoder_runs.append(1))
    try:
        assert max(real.model_shape) <= 32  # one window holds the whole model grid
        first = real.interact(Interaction("point", CLICK[None]))
        second = real.interact(Interaction("point", CLICK[None] + [2, 3, -2], positive=False))
    finally:
        hook.remove()
    assert [c["point_coords"].shape[1] for c in calls] == [1, 2]
    assert calls[1]["point_labels"].tolist() == [[1, 0]] and calls[1]["point_start"] == 1
    np.testing.assert_allclose(calls[1]["point_coords"][0, 0].numpy(), real.to_model_grid(CLICK[None])[0], atol=1e-5)
    assert torch.isfinite(calls[0]["prev_mask"]).all() and calls[1]["prev_mask"] is not None
    assert len(encoder_runs) == 1  # the second click in the same window reuses the image features
    for prediction in (first, second):
        assert prediction.mask.dtype == bool and prediction.full(SHAPE).shape == SHAPE
    assert torch.isfinite(real._prev).all() and real._prev.shape[-3:] == real.model_shape


def test_real_network_class_prompt_and_segment_classes(real):
    prediction = real.interact(Interaction("class", class_name="Liver"))
    assert prediction.full(SHAPE).shape == SHAPE and real._class_id == 1
    assert torch.isfinite(real._prev).all()
    masks = real.segment_classes(["kidney"])
    assert list(masks) == ["left kidney", "right kidney"]
    assert all(m.shape == SHAPE and m.dtype == bool for m in masks.values())
    assert not (masks["left kidney"] & masks["right kidney"]).any()


def test_engine_without_a_volume_says_so(network):
    engine = Vista3DEngine(network)
    with pytest.raises(PromptError, match="No volume"):
        engine.start_object()
    assert vista3d.SPECIAL_CLASSES == (23, 24, 25, 26, 27, 57, 128)
