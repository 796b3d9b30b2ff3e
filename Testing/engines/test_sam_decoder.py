"""The decoder pass with its prompt-independent part done once per slice (engines/sam_decoder.py) gives
segment-anything's own masks, reuses that part click after click, and notices weights changed in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedFMLib.engines import Prompts2D, create_engine
from MedFMLib.engines.sam_decoder import decode_masks, prepare_image

PROMPTS = {
    "box": Prompts2D(box=[10.0, 12.0, 40.0, 44.0]),
    "points": Prompts2D([[20.0, 20.0], [30.0, 36.0]], [1, 0]),
    "box and points": Prompts2D([[25.0, 28.0], [12.0, 14.0]], [1, 0], box=[8.0, 10.0, 44.0, 46.0]),
    "one point": Prompts2D([[33.0, 21.0]], [1]),
}


@pytest.fixture
def engine_and_embedding(tiny_sam):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    image = np.random.default_rng(3).random((56, 64)).astype(np.float32)
    return engine, engine.encode(image)


def segment_anythings_own(engine, embedding, prompts):
    """MaskDecoder.predict_masks: every mask token's logits and IoU, as segment-anything computes them."""
    points, boxes = engine.prompt_tensors(prompts, embedding.image_shape, embedding.extra["input_size"])
    sparse, dense = engine.model.prompt_encoder(points, boxes, None)
    masks, iou = engine.model.mask_decoder.predict_masks(
        embedding.features, engine.model.prompt_encoder.get_dense_pe(), sparse, dense
    )
    return sparse, masks, iou


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_the_prepared_pass_gives_segment_anythings_masks(engine_and_embedding, kind):
    engine, embedding = engine_and_embedding
    with torch.inference_mode():
        sparse, expected_masks, expected_iou = segment_anythings_own(engine, embedding, PROMPTS[kind])
        masks, iou = decode_masks(engine.model, prepare_image(engine.model, embedding.features), sparse)
    assert masks.shape == expected_masks.shape == (1, 4, *expected_masks.shape[-2:])
    assert expected_masks.abs().max() > 1.0  # the tiny decoder's logits are not all near zero
    torch.testing.assert_close(masks, expected_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=1e-5)


def test_clicks_on_one_slice_reuse_its_prepared_part_and_another_slice_gets_its_own(engine_and_embedding):
    engine, embedding = engine_and_embedding
    engine.decode(embedding, PROMPTS["box"])
    prepared = engine._prepared
    assert prepared is not None and prepared.features is embedding.features
    engine.decode(embedding, PROMPTS["box and points"])
    assert engine._prepared is prepared
    other = engine.encode(np.random.default_rng(4).random((56, 64)).astype(np.float32))
    engine.decode(other, PROMPTS["box"])
    assert engine._prepared is not prepared and engine._prepared.features is other.features


def test_weights_changed_in_place_are_not_answered_from_the_old_prepared_part(engine_and_embedding):
    """Fine-tuning steps the decoder's weights in place; the next click must use the new ones."""
    engine, embedding = engine_and_embedding
    before = engine.decode(embedding, PROMPTS["box"])
    with torch.no_grad():
        engine.model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.v_proj.weight.mul_(-3.0)
    after = engine.decode(embedding, PROMPTS["box"])
    with torch.inference_mode():
        sparse, expected, _ = segment_anythings_own(engine, embedding, PROMPTS["box"])
    np.testing.assert_allclose(after.low_res_logits, expected[0, :1].numpy(), atol=1e-4, rtol=1e-4)
    assert not np.allclose(after.low_res_logits, before.low_res_logits, atol=1e-3)


def test_a_click_refined_from_the_previous_logits_gives_segment_anythings_answer(engine_and_embedding):
    """The previous logits change the image side of the pass: that click computes its own first block, and
    the slice's prepared part stays as it was for the clicks without a mask input."""
    engine, embedding = engine_and_embedding
    first = engine.decode(embedding, PROMPTS["box"])
    refined = engine.decode(embedding, PROMPTS["box and points"], previous_logits=first.low_res_logits)
    with torch.inference_mode():
        low_res, _ = engine.decoder_forward(
            embedding.features, PROMPTS["box and points"], embedding.image_shape, embedding.extra["input_size"],
            torch.as_tensor(first.low_res_logits)[None],
        )  # fmt: skip
    assert not np.allclose(refined.low_res_logits, first.low_res_logits, atol=1e-2)
    np.testing.assert_allclose(refined.low_res_logits, low_res[0].numpy(), rtol=1e-5, atol=1e-4)
    prepared = engine._prepared
    assert prepared.features is embedding.features
    again = engine.decode(embedding, PROMPTS["box"])
    assert engine._prepared is prepared
    np.testing.assert_array_equal(again.low_res_logits, first.low_res_logits)
