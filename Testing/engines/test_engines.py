"""Engines on real (tiny, random-weight) SAM checkpoints and the weight-free classic engine."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedFMLib.engines import Prompts2D, create_engine, resolve_device
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.engines.sam import read_state_dict
from MedFMLib.errors import DeviceError, ModelError, PromptError
from MedFMLib.models.catalog import get_model_info, load_catalog
from MedFMLib.models.store import ModelStore


def _disc_image(rows=96, cols=120, centre=(40, 70), radius=18) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    image = np.full((rows, cols), 0.2, np.float32)
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = 0.8
    return image


# ------------------------------------------------------------------ SAM family
def test_tiny_checkpoint_loads_with_the_saved_weights(tiny_sam):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    saved = torch.load(tiny_sam, map_location="cpu", weights_only=True)
    loaded = engine.model.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert engine.device == "cpu" and "sam_tiny" in engine.cache_id


def test_sam_encode_and_decode_shapes(tiny_sam):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    image = _disc_image()
    embedding = engine.encode(image)
    assert embedding.image_shape == image.shape
    # Longest side resized to the model's input size, aspect ratio kept.
    assert embedding.extra["input_size"] == (205, 256)
    assert embedding.nbytes == embedding.features.numel() * 4  # float32 on the CPU
    prediction = engine.decode(embedding, Prompts2D([[70, 40]], [1]))
    assert prediction.mask.shape == image.shape and prediction.mask.dtype == bool
    assert prediction.low_res_logits.shape == (1, 64, 64)
    assert np.isfinite(prediction.score)


def test_sam_decode_matches_segment_anything_predictor(tiny_sam):
    """Our decode path gives what segment-anything's own SamPredictor gives on the same embedding."""
    from segment_anything import SamPredictor

    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    image = _disc_image()
    embedding = engine.encode(image)
    prompts = Prompts2D([[70, 40], [20, 80]], [1, 0], box=[40, 15, 100, 70])
    ours = engine.decode(embedding, prompts)

    predictor = SamPredictor(engine.model)
    predictor.features = embedding.features
    predictor.original_size = image.shape
    predictor.input_size = embedding.extra["input_size"]
    predictor.is_image_set = True
    scaled = prompts.scaled(256 / 120, 205 / 96)
    masks, scores, low_res = predictor.predict_torch(
        torch.as_tensor(scaled.points)[None],
        torch.as_tensor(scaled.labels)[None],
        torch.as_tensor(scaled.box)[None],
        multimask_output=False,
    )
    np.testing.assert_array_equal(ours.mask, masks[0, 0].numpy())
    assert ours.score == pytest.approx(float(scores[0, 0]))
    # The same arithmetic in another order (engines/sam_decoder.py): float rounding, on logits of about 50.
    np.testing.assert_allclose(ours.low_res_logits, low_res[0].numpy(), rtol=1e-5, atol=1e-4)


def test_single_point_takes_the_best_of_three_masks(tiny_sam):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    embedding = engine.encode(_disc_image())
    prompts = Prompts2D([[70, 40]], [1])
    prediction = engine.decode(embedding, prompts)
    model = engine.model
    with torch.no_grad():
        scaled = prompts.scaled(256 / 120, 205 / 96)
        sparse, dense = model.prompt_encoder(
            points=(torch.as_tensor(scaled.points)[None], torch.as_tensor(scaled.labels)[None]), boxes=None, masks=None
        )
        low_res, iou = model.mask_decoder(
            image_embeddings=embedding.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    assert iou.shape == (1, 3)
    best = int(torch.argmax(iou[0]))
    assert prediction.score == pytest.approx(float(iou[0, best]))
    np.testing.assert_allclose(prediction.low_res_logits, low_res[0, best : best + 1].numpy(), rtol=1e-5, atol=1e-4)


def test_previous_logits_change_the_decoding(tiny_sam):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    embedding = engine.encode(_disc_image())
    prompts = Prompts2D([[70, 40], [60, 45]], [1, 1])
    fresh = engine.decode(embedding, prompts)
    refined = engine.decode(embedding, prompts, previous_logits=np.full((1, 64, 64), 8.0, np.float32))
    assert not np.allclose(fresh.low_res_logits, refined.low_res_logits)


def test_medsam_follows_the_official_inference(tiny_sam):
    engine = create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu")
    image = _disc_image()
    with pytest.raises(PromptError, match="box"):
        engine.decode(engine.encode(image), Prompts2D([[70, 40]], [1]))
    box = np.array([45.0, 18.0, 95.0, 62.0], np.float32)
    prediction = engine.decode(engine.encode(image), Prompts2D(box=box))

    # MedSAM's published recipe: resize to 256 (here) square, [0, 1], 3 channels, no mean/std;
    # box scaled to the square; one mask; sigmoid, resize to the image, threshold 0.5.
    model = engine.model
    with torch.no_grad():
        x = F.interpolate(torch.from_numpy(image)[None, None], (256, 256), mode="bilinear", antialias=True)
        features = model.image_encoder(x.expand(1, 3, 256, 256))
        box_256 = (box + 0.5) * np.array([256 / 120, 256 / 96] * 2, np.float32) - 0.5
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.as_tensor(box_256)[None], masks=None)
        low_res, _ = model.mask_decoder(
            image_embeddings=features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        expected = F.interpolate(torch.sigmoid(low_res), image.shape, mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(prediction.mask, (expected[0, 0] > 0.5).numpy())


def test_random_weights_full_size_architecture_builds():
    engine = create_engine("sam_vit_b", random_weights=True, device="cpu")
    assert engine.model.image_encoder.patch_embed.proj.weight.shape[0] == 768
    assert engine.cache_id.startswith("sam_vit_b:random0@cpu")


# ------------------------------------------------------------- bad checkpoints
def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_sam):
    with pytest.raises(ModelError, match="does not exist"):
        create_engine("sam_tiny", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(ModelError, match="no download address"):
        create_engine("medsam_vit_b", store=ModelStore(tmp_path / "home"))


def test_corrupt_and_truncated_checkpoints(tmp_path, tiny_sam):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 100)
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        create_engine("sam_tiny", checkpoint=garbage)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_sam.read_bytes()[: tiny_sam.stat().st_size // 2])
    with pytest.raises(ModelError, match="download it again"):
        create_engine("sam_tiny", checkpoint=truncated)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (marker.write_text, ("code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"weight": Exploit()}, evil)
    assert zipfile.is_zipfile(evil)
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        read_state_dict(evil)
    assert not marker.exists()


def test_mismatched_checkpoint_names_the_likely_model(tmp_path, tiny_sam):
    create_engine("sam_tiny", checkpoint=tiny_sam)  # makes the tiny architecture known
    with pytest.raises(ModelError, match=r"does not match sam_vit_b .*wrong-shaped.*looks like a SAM vit_tiny"):
        create_engine("sam_vit_b", checkpoint=tiny_sam)
    state = torch.load(tiny_sam, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    partial = tmp_path / "partial.pth"
    torch.save({"model": state}, partial)  # wrapped, as fine-tuning scripts save
    with pytest.raises(ModelError, match="1 missing, 0 unexpected"):
        create_engine("sam_tiny", checkpoint=partial)
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(ModelError, match="holds no model weights"):
        create_engine("sam_tiny", checkpoint=tmp_path / "no_weights.pth")


# ------------------------------------------------------------------- classic
def test_classic_point_box_and_negative():
    engine = ClassicEngine()
    image = _disc_image()
    truth = image > 0.5
    embedding = engine.encode(image)
    np.testing.assert_array_equal(engine.decode(embedding, Prompts2D([[70, 40]], [1])).mask, truth)
    # A box alone seeds from its centre and never leaks outside it.
    boxed = engine.decode(embedding, Prompts2D(box=[55, 25, 85, 55])).mask
    assert boxed.any() and not boxed[:, :55].any() and not boxed[:25].any()
    assert np.array_equal(boxed, truth & np.pad(np.ones((31, 31), bool), ((25, 40), (55, 34))))
    # Background clicked: the disc is a hole in it, filled unless a negative point marks it.
    assert engine.decode(embedding, Prompts2D([[5, 5]], [1])).mask[40, 70]
    assert not engine.decode(embedding, Prompts2D([[5, 5], [70, 40]], [1, 0])).mask[40, 70]
    # Two touching discs of nearly equal brightness grow together; a negative point separates them.
    twins = _disc_image()
    yy, xx = np.mgrid[:96, :120]
    twins[(yy - 40) ** 2 + (xx - 100) ** 2 <= 15**2] = 0.76
    embedding = engine.encode(twins)
    assert engine.decode(embedding, Prompts2D([[70, 40]], [1])).mask[40, 105]
    separated = engine.decode(embedding, Prompts2D([[70, 40], [105, 40]], [1, 0])).mask
    assert separated[40, 70] and not separated[40, 100:].any()
    with pytest.raises(PromptError):
        engine.decode(embedding, Prompts2D([[70, 40]], [0]))


def test_classic_negative_click_inside_the_object_cuts_a_disc_and_keeps_the_object():
    """A negative click on the object's own tissue: no tolerance or threshold excludes it without excluding the
    object too; the click takes a disc away, not the object (a real lung nodule's slice went to Dice 0.0)."""
    engine = ClassicEngine()
    noise = np.random.default_rng(1).normal(0.0, 0.03, (96, 120))
    image = (_disc_image() + noise).astype(np.float32)
    truth = _disc_image() > 0.5
    embedding = engine.encode(image)
    for prompts in (Prompts2D([[70, 40], [76, 44]], [1, 0]), Prompts2D([[76, 44]], [0], box=[45, 15, 95, 65])):
        mask = engine.decode(embedding, prompts).mask
        assert not mask[44, 76]
        assert (mask & truth).sum() >= 0.8 * truth.sum(), prompts


# --------------------------------------------------------------- catalog/device
def test_catalog_entries_are_complete():
    catalog = load_catalog()
    assert {"classic", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= catalog.keys()
    for info in catalog.values():
        assert info.license and info.homepage.startswith("https://")
        allowed = {"point", "box", "mask"} | ({"scribble", "lasso", "class"} if info.kind == "volume" else set())
        assert set(info.prompts) <= allowed and info.prompts
        assert isinstance(info.commercial_use, bool)
    assert get_model_info("medsam_vit_b").prompts == ("box",)
    with pytest.raises(ModelError, match="Unknown model 'sam_vit_x'"):
        get_model_info("sam_vit_x")


def test_device_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="Unknown device"):
        resolve_device("tpu")
