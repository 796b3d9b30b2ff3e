"""LiteMedSAM and MobileSAM: MedFM's own TinyViT encoder, the real LiteMedSAM weights, and real scans.

The real-scan tests check what a trained model does through MedFM's whole path (geometry, intensity,
preprocessing, decode, write) on brain1 (an enhancing tumour on 6.5 mm MRI slices): a box on each labelled
slice, the reference's bounding box, must give 3D Dice >= 0.85 and every slice >= 0.75.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import (
    SERVER_TOKEN,
    ServerProcess,
    add_segmentation_node,
    real_case,
    run_medfm,
)
from MedFMLib.engines import create_engine
from MedFMLib.engines.base import Prompts2D
from MedFMLib.engines.sam import SamEngine, build_sam_model, get_architecture
from MedFMLib.errors import ModelError, PromptError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def reference_boxes(volume, label: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per labelled slice k: the RAS corners of the label's bounding box (pixel centres), as a reader draws it."""
    boxes = []
    for k in range(label.shape[0]):
        rows, cols = np.nonzero(label[k])
        if len(rows):
            low = volume.ijk_to_ras_points(np.array([cols.min(), rows.min(), k], float))
            high = volume.ijk_to_ras_points(np.array([cols.max(), rows.max(), k], float))
            boxes.append((k, low, high))
    return boxes


def check_brain1(mask: np.ndarray, label: np.ndarray) -> None:
    per_slice = [dice(mask[k], label[k]) for k in range(label.shape[0]) if label[k].any()]
    assert len(per_slice) == 7
    assert dice(mask, label) >= 0.85, (dice(mask, label), per_slice)
    assert min(per_slice) >= 0.75, per_slice
    assert not mask[[k for k in range(label.shape[0]) if not label[k].any()]].any()  # only the boxed slices


# ------------------------------------------------------------------ the encoder and the checkpoints
def test_the_real_litemedsam_checkpoint_loads_strictly_into_medfms_tinyvit(litemedsam_store):
    engine = create_engine("litemedsam", device="cpu", store=litemedsam_store)
    assert isinstance(engine, SamEngine) and engine.image_size == 256 and engine.preprocessing == "litemedsam"
    encoder = engine.model.image_encoder
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(5.7e6, rel=0.05)
    embedding = engine.encode(np.random.default_rng(0).random((200, 120), dtype=np.float32))
    assert tuple(embedding.features.shape) == (1, 256, 64, 64) and embedding.extra["input_size"] == (256, 154)
    with pytest.raises(PromptError, match="box-prompted"):
        engine.check_prompts(Prompts2D([[50, 50]], [1]))


def test_mobilesam_in_its_official_format_loads_and_answers_a_click(tmp_path):
    """MobileSAM's file is a bare state dict of the whole model; a random one, full size, stands in for it."""
    torch.manual_seed(0)
    network = build_sam_model(get_architecture("tiny_vit_1024"))
    with torch.no_grad():
        for parameter in network.mask_decoder.parameters():
            parameter.mul_(3.0)
    path = tmp_path / "mobile_sam.pt"
    torch.save(network.state_dict(), path)
    engine = create_engine("mobilesam", checkpoint=path, device="cpu")
    image = np.zeros((300, 400), np.float32)
    image[100:200, 150:250] = 1.0
    embedding = engine.encode(image)
    assert tuple(embedding.features.shape) == (1, 256, 64, 64)  # 1024 input, 3x3 stride-2 patch embedding
    assert embedding.extra["input_size"] == (768, 1024)
    prediction = engine.decode(embedding, Prompts2D([[200, 150]], [1]))
    assert prediction.mask.shape == (300, 400) and prediction.low_res_logits.shape[-2:] == (256, 256)


def test_a_checkpoint_of_another_model_is_named(litemedsam_store, tiny_sam_catalog):
    with pytest.raises(ModelError, match="looks like a TinyViT checkpoint"):
        create_engine("mobilesam", checkpoint=litemedsam_store.path("litemedsam"), device="cpu")
    with pytest.raises(ModelError, match="does not match litemedsam .*looks like a SAM (vit_tiny )?checkpoint"):
        create_engine("litemedsam", checkpoint=tiny_sam_catalog.parent / "sam_tiny.pth", device="cpu")


# ------------------------------------------------------------------ a real model on a real scan
@pytest.fixture(scope="module")
def brain1():
    return real_case("brain1")


def test_litemedsam_boxes_on_brain1_through_medfm_segment(litemedsam_store, brain1, tmp_path):
    from MedFMLib.imaging.io import read_volume

    volume, label = brain1
    boxes = []
    for _, low, high in reference_boxes(volume, label):
        boxes += ["--box", ",".join(f"{v:.4f}" for v in (*low, *high))]
    out = tmp_path / "tumour.nrrd"
    source = str(volume_path("brain1"))
    result = run_medfm("segment", source, "--model", "litemedsam", "--device", "cpu", *boxes, "--out", out,
                       env={"MEDFM_HOME": str(litemedsam_store.home)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = read_volume(out)
    np.testing.assert_allclose(written.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    check_brain1(written.array > 0, label > 0)


def test_litemedsam_boxes_on_brain1_through_the_server(litemedsam_store, brain1, tmp_path):
    from MedFMLib.models.store import ModelStore
    from MedFMLib.remote.client import RemoteSession, ServerConnection

    volume, label = brain1
    ModelStore(tmp_path).import_file(litemedsam_store.path("litemedsam"), "litemedsam")
    server = ServerProcess(tmp_path, ["--models", "litemedsam", "--device", "cpu"]).start()
    try:
        remote = RemoteSession(ServerConnection(server.url, SERVER_TOKEN), volume, "litemedsam")
        tumour = remote.add_object("tumour")
        for index, (_, low, high) in enumerate(reference_boxes(volume, label)):
            remote.set_box(tumour, low, high, keep_other_slices=index > 0)
        check_brain1(remote.mask(tumour), label > 0)
        remote.close()
    finally:
        server.stop()


def test_litemedsam_boxes_on_brain1_through_the_slicer_logic(litemedsam_store, brain1, mrml_scene):
    from MedFMLib.mrml.bridge import add_volume_node, segment_array
    from MedFMLib.mrml.logic import SegmentationLogic

    volume, label = brain1
    volume_node = add_volume_node(mrml_scene, volume)
    segmentation = add_segmentation_node(mrml_scene, volume_node)
    rois = []
    for k, low, high in reference_boxes(volume, label):
        roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"box{k}")
        roi.SetXYZ(*((low + high) / 2.0))
        roi.SetRadiusXYZ(*(np.abs(high - low) / 2.0))
        rois.append(roi)
    logic = SegmentationLogic(store=litemedsam_store)
    segment_id = logic.segment(volume_node, segmentation, "tumour", roiNode=rois, modelName="litemedsam", device="cpu")
    check_brain1(segment_array(segmentation, segment_id, volume), label > 0)


def volume_path(name: str):
    from conftest import REAL_DATA

    return REAL_DATA / f"{name}_image.nrrd"


def test_litemedsam_one_box_propagated_through_brain1_stays_on_the_tumour(litemedsam_store, brain1):
    """Issue 15: one box on the largest labelled slice, then propagate both ways, must give 3D Dice >= 0.80 with
    no slice written more than one slice beyond the tumour. Before the appearance rule the walk went through the
    whole volume (0.48); with it, 0.767. The rest comes from widening a carried box that the mask fills to a side
    (slice 13 grows 2.5x over slice 14): 0.8002 here, the same with torch and OpenVINO. One pixel is worth 0.0003
    of Dice, so the guard sits at 0.79: another CPU's float rounding may flip a few pixels at the edges."""
    from MedFMLib.interaction.propagation import PropagationOptions
    from MedFMLib.interaction.session import Session

    volume, label = brain1
    label = label > 0
    engine = create_engine("litemedsam", device="cpu", store=litemedsam_store)
    k = int(np.argmax(label.sum(axis=(1, 2))))
    _, low, high = next(box for box in reference_boxes(volume, label) if box[0] == k)
    scores = {}
    cache = None
    for widenings in (3, 0):
        session = Session(volume, engine, cache=cache)
        cache = session.cache  # the second walk decodes the same embeddings again
        tumour = session.add_object()
        session.set_box(tumour, low, high)
        result = session.propagate(tumour, "both", options=PropagationOptions(box_widenings=widenings))
        mask = session.mask(tumour)
        labelled, written = np.flatnonzero(label.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(1, 2)))
        assert labelled[0] - 1 <= written[0] and written[-1] <= labelled[-1] + 1
        assert "edge" not in {reason for _, _, reason, _ in result.stops}
        scores[widenings] = dice(mask, label)
    assert scores[3] >= 0.79, scores
    assert scores[0] < scores[3] - 0.02, scores


def test_litemedsam_in_openvino_gives_torchs_embedding_and_runs_no_split(litemedsam_store, tmp_path):
    """TinyViT is converted with q, k and v as three products (OpenVINO's CPU split is a reference kernel):
    the same embedding as torch, no split left in the graph, and torch's own modules left as they were."""
    import openvino as ov

    from MedFMLib.models.store import ModelStore

    checkpoint = litemedsam_store.checkpoint("litemedsam")
    store = ModelStore(tmp_path / "home")
    torch_engine = create_engine("litemedsam", checkpoint=checkpoint, device="cpu", store=store, runtime="torch")
    ov_engine = create_engine("litemedsam", checkpoint=checkpoint, device="cpu", store=store, runtime="openvino")
    image = np.random.default_rng(0).random((200, 160), dtype=np.float32)
    a, b = torch_engine.encode(image), ov_engine.encode(image)
    np.testing.assert_allclose(b.features.numpy(), a.features.numpy(), atol=1e-4)
    (converted,) = (tmp_path / "home" / "openvino").glob("*.xml")
    kinds = {op.get_type_name() for op in ov.Core().read_model(converted).get_ops()}
    assert "ScaledDotProductAttention" in kinds or "MatMul" in kinds
    assert not kinds & {"Split", "VariadicSplit"}, kinds
    flags = [m.separate_qkv for m in ov_engine.model.image_encoder.modules() if hasattr(m, "separate_qkv")]
    assert flags and not any(flags)  # torch keeps the one product that LoRA's adapters wrap


def test_a_box_carried_from_a_small_section_is_grown_where_the_model_rates_that_clearly_higher(
    litemedsam_store, brain1, monkeypatch
):
    """The challenge's box on brain1 is drawn on slice 14, the tumour's waist (247 voxels); slice 15 holds 842.
    The box carried there holds only its bright core, and the mask fits that box, so widening to fit never
    starts (slice 15's Dice 0.31). Decoded again with the box grown by a quarter on each side, which the model
    rates clearly higher, slice 15 scores 0.90 and the box step 0.629 -> 0.736."""
    import dataclasses

    from MedFMLib.evaluation import protocols
    from MedFMLib.interaction.session import Session

    volume, label = brain1
    label = label > 0
    engine = create_engine("litemedsam", device="cpu", store=litemedsam_store)
    scores = {}
    for fraction in (0.25, 0.0):
        monkeypatch.setattr(protocols, "CHALLENGE_BOX", dataclasses.replace(protocols.CHALLENGE_BOX,
                                                                            grown_box_fraction=fraction))  # fmt: skip
        results, final = protocols.run_cvpr25(Session(volume, engine), volume, label, clicks=0)
        scores[fraction] = (results[0].steps[0]["dsc"], dice(final[15] > 0, label[15]))
    assert scores[0.25][1] >= 0.8 and scores[0.0][1] < 0.5, scores
    assert scores[0.25][0] >= scores[0.0][0] + 0.05, scores
