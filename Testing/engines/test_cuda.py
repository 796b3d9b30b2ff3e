"""The CUDA code paths: the encoder under half-precision autocast, fp16 embeddings in the cache, masks back on
the CPU. CI has no GPU, so these run where one is lent (see README, "GPU checks"); elsewhere they skip, saying so.

The check that matters is a trained model on a real scan: LiteMedSAM on brain1 must segment on the GPU as it
does on the CPU (the same 3D Dice targets), so half precision costs no accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import real_case, run_medfm, sphere_volume
from MedFMLib.engines import create_engine
from MedFMLib.engines.base import Prompts2D

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA code paths)")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def brain1():
    volume, label = real_case("brain1")
    return volume, label > 0


def boxed_session(engine, volume, label):
    """A session with the reference's bounding box on every labelled slice, as a reader draws them."""
    from MedFMLib.interaction.session import Session

    session = Session(volume, engine)
    tumour = session.add_object()
    for k in range(label.shape[0]):
        rows, cols = np.nonzero(label[k])
        if len(rows):
            low = volume.ijk_to_ras_points(np.array([cols.min(), rows.min(), k], float))
            high = volume.ijk_to_ras_points(np.array([cols.max(), rows.max(), k], float))
            session.set_box(tumour, low, high, keep_other_slices=True)
    return session, tumour


def test_litemedsam_on_cuda_segments_brain1_as_on_the_cpu(litemedsam_store, brain1):
    volume, label = brain1
    masks = {}
    for device in ("cuda", "cpu"):
        engine = create_engine("litemedsam", device=device, store=litemedsam_store)
        session, tumour = boxed_session(engine, volume, label)
        masks[device] = session.mask(tumour)
        if device == "cuda":
            from MedFMLib.imaging.geometry import SlicePlane

            assert engine.cache_id.endswith("@cuda/fp16"), engine.cache_id
            k = int(np.argmax(label.sum(axis=(1, 2))))
            embedding = session.embedding(SlicePlane(2, k))  # encoded already: the cache answers
            assert session.cache.stats.hits >= 1
            assert embedding.features.dtype == torch.float16 and embedding.features.is_cuda
    per_slice = [dice(masks["cuda"][k], label[k]) for k in range(label.shape[0]) if label[k].any()]
    assert dice(masks["cuda"], label) >= 0.85 and min(per_slice) >= 0.75, per_slice
    assert dice(masks["cuda"], masks["cpu"]) >= 0.97, dice(masks["cuda"], masks["cpu"])


def test_litemedsam_on_cuda_propagates_one_box_through_brain1(litemedsam_store, brain1):
    from MedFMLib.interaction.session import Session

    volume, label = brain1
    session = Session(volume, create_engine("litemedsam", device="cuda", store=litemedsam_store))
    k = int(np.argmax(label.sum(axis=(1, 2))))
    rows, cols = np.nonzero(label[k])
    tumour = session.add_object()
    session.set_box(tumour, volume.ijk_to_ras_points(np.array([cols.min(), rows.min(), k], float)),
                    volume.ijk_to_ras_points(np.array([cols.max(), rows.max(), k], float)))  # fmt: skip
    session.propagate(tumour, "both")
    mask = session.mask(tumour)
    labelled, written = np.flatnonzero(label.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(1, 2)))
    assert labelled[0] - 1 <= written[0] and written[-1] <= labelled[-1] + 1
    assert dice(mask, label) >= 0.75, dice(mask, label)


@pytest.mark.parametrize("architecture", ["vit_b", "tiny_vit_1024"])
def test_full_size_encoders_under_autocast_give_the_cpus_logits(architecture):
    """Random full-size weights: bf16/fp16 autocast must keep the decoder's logits close to float32 on the CPU."""
    from MedFMLib.engines.sam import SamEngine, build_sam_model, get_architecture

    torch.manual_seed(0)
    network = build_sam_model(get_architecture(architecture))
    image = np.zeros((300, 400), np.float32)
    image[100:200, 150:250] = 1.0
    prompts = Prompts2D([[200, 150]], [1], np.array([140, 90, 260, 210], np.float32))
    logits = {}
    for device in ("cpu", "cuda"):
        engine = SamEngine(network, architecture, device=device)
        prediction = engine.decode(engine.encode(image), prompts)
        logits[device] = prediction.low_res_logits.ravel()
    correlation = float(np.corrcoef(logits["cpu"], logits["cuda"])[0, 1])
    assert correlation >= 0.98, correlation


def test_medfm_segment_runs_on_cuda_with_the_tiny_model(tiny_sam, tmp_path):
    from MedFMLib.imaging.io import read_volume, write_volume

    volume, _, centre = sphere_volume("oblique_lps")
    source = tmp_path / "sphere.nrrd"
    write_volume(source, volume)
    out = tmp_path / "mask.nrrd"
    result = run_medfm("segment", source, "--model", "sam_tiny", "--checkpoint", tiny_sam, "--device", "cuda",
                       "--point", ",".join(f"{v:.3f}" for v in centre), "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = read_volume(out)
    np.testing.assert_allclose(written.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert written.array.any() and "sam_tiny on cuda" in result.stdout


def test_openvino_asked_for_by_name_runs_on_the_cpu_when_the_device_is_auto(tiny_sam, tmp_path):
    """On a GPU machine "auto" means CUDA, which OpenVINO cannot use: `--runtime openvino` alone used to fail."""
    from MedFMLib.engines.runtime import openvino_available
    from MedFMLib.models.store import ModelStore

    if not openvino_available():
        pytest.skip("needs the openvino package on this GPU machine")
    store = ModelStore(tmp_path)
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="auto", store=store, runtime="openvino")
    assert engine.device == "cpu" and engine.runtime == "openvino-f32"
    assert create_engine("sam_tiny", checkpoint=tiny_sam, device="auto", runtime="torch").device == "cuda"


@pytest.mark.parametrize("kind", ["nninteractive", "vista3d"])
def test_3d_models_on_the_gpu_answer_as_on_the_cpu(kind, tiny_volume_catalog):
    """The same clicks through a VolumeSession on CUDA and on the CPU: (nearly) the same 3D masks."""
    from MedFMLib.interaction.volume_session import VolumeSession

    volume, _, centre = sphere_volume("oblique_lps", dims=(40, 36, 20), radius_mm=8.0, noise_sd=5.0)
    volume.array = (volume.array * 5 - 200).astype(np.int16)  # CT-like: VISTA3D crops to the body (HU > 0)
    folder = tiny_volume_catalog.parent
    masks = {}
    for device in ("cpu", "cuda"):
        if kind == "nninteractive":
            from MedFMLib.engines.nninteractive import NNInteractiveEngine

            engine = NNInteractiveEngine.from_folder(folder / "nninteractive_tiny", device=device, autozoom=False)
        else:
            from MedFMLib.engines.vista3d import Vista3DEngine, load_vista3d_network

            engine = Vista3DEngine(load_vista3d_network(folder / "vista3d_tiny.pt", embed_dim=8), device=device)
        session = VolumeSession(volume, engine)
        object_id = session.add_object()
        session.add_point(object_id, centre)
        session.add_point(object_id, volume.ijk_to_ras_points(np.array([30.0, 8.0, 10.0])), positive=False)
        masks[device] = session.mask(object_id).copy()
        assert engine.device == device
    agreement = float((masks["cpu"] == masks["cuda"]).mean())
    assert agreement > 0.99, agreement
