"""OpenVINO as the runtime of SAM-family encoders on a CPU: the same masks as torch, converted once."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import run_medfm, sphere_volume
from MedFMLib.engines import create_engine
from MedFMLib.engines.runtime import bf16_supported, resolve_runtime
from MedFMLib.errors import ModelError
from MedFMLib.interaction.session import Session
from MedFMLib.models.store import ModelStore


def test_openvino_gives_torchs_embeddings_and_masks_and_converts_once(tiny_sam, tmp_path):
    store = ModelStore(tmp_path / "home")
    notes = []
    torch_engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu", store=store, runtime="torch")
    ov_engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu", store=store, runtime="openvino",
                              notify=notes.append)  # fmt: skip
    assert torch_engine.runtime == "torch" and ov_engine.runtime == "openvino-f32"  # fp32 unless asked
    assert len(notes) == 1 and "converting" in notes[0]
    assert ov_engine.cache_id != torch_engine.cache_id  # their embeddings are cached apart
    converted = sorted((tmp_path / "home" / "openvino").glob("*.xml"))
    assert len(converted) == 1 and converted[0].with_suffix(".bin").is_file()
    image = np.random.default_rng(0).random((90, 120), dtype=np.float32)
    a, b = torch_engine.encode(image), ov_engine.encode(image)
    np.testing.assert_allclose(b.features.numpy(), a.features.numpy(), atol=1e-4)
    volume, sphere, centre = sphere_volume("oblique_lps", noise_sd=2.0)
    masks = []
    for engine in (torch_engine, ov_engine):
        session = Session(volume, engine)
        object_id = session.add_object()
        session.add_point(object_id, centre)
        masks.append(session.mask(object_id))
    assert masks[0].any() and np.array_equal(masks[0], masks[1])
    # A second engine reads the converted model: no conversion, the same file.
    stamp = converted[0].stat().st_mtime_ns
    again = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu", store=store, runtime="openvino",
                          notify=notes.append)  # fmt: skip
    assert len(notes) == 1 and converted[0].stat().st_mtime_ns == stamp and again.runtime == "openvino-f32"


def test_fast_asks_for_bf16_only_where_the_cpu_has_it(tiny_sam, tmp_path):
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu", store=ModelStore(tmp_path),
                           runtime="openvino", fast=True)  # fmt: skip
    assert engine.runtime == ("openvino-bf16" if bf16_supported() else "openvino-f32")


def test_runtime_choice_and_its_errors():
    assert resolve_runtime("auto", "cpu") == "openvino"  # installed in the test environment
    assert resolve_runtime("auto", "cuda") == "torch" and resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ModelError, match="runs on the CPU, not on 'cuda'"):
        resolve_runtime("openvino", "cuda")
    with pytest.raises(ModelError, match="Unknown runtime 'tpu'"):
        resolve_runtime("tpu", "cpu")


def test_bench_reports_its_runtime_and_compares_runtimes(tiny_sam, tmp_path):
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"], "MEDFM_HOME": str(tmp_path)}
    common = ["bench", "--model", "sam_tiny", "--checkpoint", tiny_sam, "--size", "64", "--first-clicks", "2",
              "--clicks", "3", "--json"]  # fmt: skip
    for runtime in ("torch", "openvino"):
        result = run_medfm(*common, "--runtime", runtime, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["runtime"] == ("torch" if runtime == "torch" else "openvino-f32")
    compared = run_medfm(*common, "--compare-runtimes", env=env)
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["runtimes"] == ["torch", "openvino-f32"] and report["speedup"] > 0
    assert report["mask_dice_min"] >= 0.999 and report["prompts_compared"] == 5
    from MedFMLib.bench.runtimes import format_runtime_comparison

    text = format_runtime_comparison(report)  # what the command prints without --json
    assert "speed-up:" in text and "masks agree (Dice):" in text
