"""`medfm evaluate` end to end: dataset layouts (and broken ones), the protocols' mechanics, resume, compare."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import REAL_DATA, run_medfm, sphere_volume
from MedFMLib.engines import create_engine
from MedFMLib.errors import MedFMError
from MedFMLib.evaluation.datasets import find_cases
from MedFMLib.evaluation.runner import evaluate
from MedFMLib.imaging.io import read_volume, write_labelmap, write_volume
from MedFMLib.interaction.session import Session


def phantom_dataset(folder, cases=("a", "b"), suffix=".nii.gz"):
    """An MSD-layout dataset of sphere phantoms (two objects each: label 1 the sphere, label 2 a slab)."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for index, name in enumerate(cases):
        volume, sphere, _ = sphere_volume(("ras_aligned", "lps_anisotropic")[index % 2], noise_sd=2.0)
        labels = sphere.astype(np.uint16)
        write_volume(folder / "imagesTr" / f"{name}_0000{suffix}", volume)
        write_labelmap(folder / "labelsTr" / f"{name}{suffix}", labels, volume)
    return folder


def classic_factory():
    engine = create_engine("classic")
    return lambda volume: Session(volume, engine)


def test_each_dataset_layout_is_read(tmp_path):
    msd = phantom_dataset(tmp_path / "msd")
    assert [c.name for c in find_cases(msd)] == ["a", "b"]
    table = tmp_path / "cases.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["image", "label"], ["msd/imagesTr/a_0000.nii.gz", "msd/labelsTr/a.nii.gz"]])
    (case,) = find_cases(table)
    assert case.name == "a" and case.load()[1].max() == 1
    npz = tmp_path / "npz"
    npz.mkdir()
    volume, labels = case.load()
    np.savez_compressed(npz / "c.npz", imgs=volume.array.astype(np.uint8), gts=labels.astype(np.uint8),
                        spacing=np.array([1.0, 1.0, 1.0]))  # fmt: skip
    (from_npz,) = find_cases(npz)
    image, gts = from_npz.load()
    assert from_npz.name == "c" and np.array_equal(gts, labels) and image.array.shape == volume.array.shape
    for bad in (tmp_path / "nothing_here", table.with_suffix(".txt")):
        bad.mkdir() if bad.suffix == "" else bad.write_text("x")
        with pytest.raises(MedFMError, match="not a dataset MedFM knows|not a CSV"):
            find_cases(bad)


def test_a_broken_case_is_reported_and_the_others_go_on(tmp_path):
    dataset = phantom_dataset(tmp_path / "ds", cases=("good", "shape", "empty", "junk"))
    volume = read_volume(dataset / "imagesTr" / "shape_0000.nii.gz")
    write_labelmap(dataset / "labelsTr" / "shape.nii.gz", np.zeros((3, 4, 5), np.uint16),
                   type(volume)(np.zeros((3, 4, 5)), volume.ijk_to_ras))  # fmt: skip
    write_labelmap(dataset / "labelsTr" / "empty.nii.gz", np.zeros(volume.array.shape, np.uint16), volume)
    (dataset / "labelsTr" / "junk.nii.gz").write_text("not an image")
    results = evaluate(dataset, tmp_path / "out", classic_factory(), "classic", "cpu", clicks=1)
    errors = {name: case.get("error", "") for name, case in results["cases"].items()}
    assert errors["good"] == "" and "objects" in results["cases"]["good"]
    assert "label's shape (3, 4, 5)" in errors["shape"] and "empty" in errors["empty"]
    assert "Cannot read" in errors["junk"] or "junk" in errors["junk"]
    assert all("\n" not in e for e in errors.values())
    assert "FAILED" in (tmp_path / "out" / "results.csv").read_text(encoding="utf-8")


def test_the_cvpr25_protocol_with_classic_on_phantoms_and_resume(tmp_path):
    dataset = phantom_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    seen = []
    results = evaluate(dataset, out, classic_factory(), "classic", "cpu", progress=lambda *a: seen.append(a))
    steps = results["cases"]["a"]["objects"]["1"]["steps"]
    assert len(steps) == 6 and steps[0]["prompt"] == "box" and all(s["prompt"] == "click" for s in steps[1:])
    assert steps[0]["dsc"] >= 0.9  # a phantom: the box alone finds the sphere
    objects = results["cases"]["a"]["objects"]["1"]
    assert objects["dsc_final"] == steps[-1]["dsc"] and 0 <= objects["dsc_auc"] <= 4
    assert results["protocol"] == "cvpr25" and results["seeds"] == {"box": 2025, "click": 42}
    prediction = read_volume(out / "predictions" / "a.nii.gz")
    image = read_volume(dataset / "imagesTr" / "a_0000.nii.gz")
    np.testing.assert_allclose(prediction.ijk_to_ras, image.ijk_to_ras, atol=1e-4)
    assert {"results.json", "results.csv", "summary.md", "dice_vs_clicks.png"} <= {p.name for p in out.iterdir()}
    # Resume: nothing is evaluated again.
    seen.clear()
    again = evaluate(dataset, out, classic_factory(), "classic", "cpu", resume=True, progress=lambda *a: seen.append(a))
    assert not seen and again["cases"] == results["cases"]


def test_the_ritm_protocol_counts_clicks(tmp_path):
    dataset = phantom_dataset(tmp_path / "ds", cases=("a",))
    results = evaluate(dataset, tmp_path / "out", classic_factory(), "classic", "cpu", protocol="ritm")
    summary = results["cases"]["a"]["objects"]["1"]
    per_slice = {}
    for step in summary["steps"]:
        per_slice.setdefault(step["slice"], []).append(step["iou"])
    # The classic model returns a bright sphere's exact section from one click at its deepest point; only a
    # pole's few pixels, where its seed's neighbourhood is mostly background, are never found.
    found_at_once = [k for k, curve in per_slice.items() if curve == [1.0]]
    assert len(per_slice) == summary["slices"] >= 10 and len(found_at_once) >= len(per_slice) - 2
    assert summary["nof90"] == len(per_slice) - len(found_at_once)
    expected_noc = (len(found_at_once) + 20 * summary["nof90"]) / len(per_slice)
    assert summary["noc90"] == pytest.approx(expected_noc) and summary["miou_at"]["1"] >= 0.9


def test_a_tiny_sam_goes_through_the_whole_protocol_and_runs_compare(tmp_path, tiny_sam):
    dataset = phantom_dataset(tmp_path / "ds", cases=("a",))
    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    results = evaluate(dataset, tmp_path / "sam", lambda v: Session(v, engine), "sam_tiny", "cpu")
    steps = results["cases"]["a"]["objects"]["1"]["steps"]
    assert len(steps) == 6 and all("click" in s for s in steps[1:] if s["dsc"] < 1.0)
    evaluate(dataset, tmp_path / "classic", classic_factory(), "classic", "cpu")
    result = run_medfm("evaluate", "--compare", tmp_path / "sam", tmp_path / "classic", "--out", tmp_path / "both",
                       "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [run["model"] for run in json.loads(result.stdout)] == ["sam_tiny", "classic"]
    summary = (tmp_path / "both" / "summary.md").read_text(encoding="utf-8")
    assert "| sam_tiny |" in summary and "| classic |" in summary
    assert (tmp_path / "both" / "dice_vs_clicks.png").stat().st_size > 10_000


def test_the_command_line_on_a_real_case(tmp_path):
    dataset = tmp_path / "real"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    shutil.copy(REAL_DATA / "breast1_image.nrrd", dataset / "imagesTr" / "breast1_0000.nrrd")
    shutil.copy(REAL_DATA / "breast1_label.nrrd", dataset / "labelsTr" / "breast1.nrrd")
    result = run_medfm("evaluate", dataset, "--model", "classic", "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["objects"] == 1 and figures["failed"] == 0 and 0.0 <= figures["dsc_final"] <= 1.0
    missing = run_medfm("evaluate", tmp_path / "nope", "--out", tmp_path / "out2")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr


def test_evaluate_through_a_server_scores_as_in_process(tmp_path):
    """--server: the same protocol, run by a real `medfm serve` on 127.0.0.1, gives the same figures."""
    from conftest import SERVER_TOKEN, ServerProcess

    dataset = phantom_dataset(tmp_path / "ds", cases=("a",))
    local = evaluate(dataset, tmp_path / "local", classic_factory(), "classic", "cpu", clicks=2)
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", ["--models", "classic", "--device", "cpu"]).start()
    try:
        result = run_medfm("evaluate", dataset, "--model", "classic", "--clicks", "2", "--server", server.url,
                           "--token", SERVER_TOKEN, "--out", tmp_path / "remote", "--json")  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    remote = json.loads((tmp_path / "remote" / "results.json").read_text(encoding="utf-8"))
    local_steps = local["cases"]["a"]["objects"]["1"]["steps"]
    remote_steps = remote["cases"]["a"]["objects"]["1"]["steps"]
    assert [s["dsc"] for s in remote_steps] == [s["dsc"] for s in local_steps] and len(remote_steps) == 3
    assert remote["device"] != "cpu (torch)"  # the server's device, as it reported it


def test_a_3d_model_gets_the_challenges_box_and_clicks_directly(tmp_path, tiny_volume_catalog):
    from MedFMLib.engines.nninteractive import NNInteractiveEngine
    from MedFMLib.evaluation.simulator import challenge_box
    from MedFMLib.interaction.volume_session import VolumeSession

    dataset = phantom_dataset(tmp_path / "ds", cases=("a",))
    engine = NNInteractiveEngine.from_folder(tiny_volume_catalog.parent / "nninteractive_tiny", autozoom=False)
    sessions = []

    def factory(volume):
        sessions.append(VolumeSession(volume, engine))
        return sessions[-1]

    results = evaluate(dataset, tmp_path / "out", factory, "nninteractive_tiny", "cpu")
    steps = results["cases"]["a"]["objects"]["1"]["steps"]
    assert len(steps) == 6 and steps[0]["prompt"] == "box"
    (session,) = sessions
    prompts = session.volume_prompts(1)
    box = session._interaction(prompts[0])
    labels = read_volume(dataset / "labelsTr" / "a.nii.gz").array > 0
    expected = challenge_box(labels, np.random.default_rng(2025))
    # The challenge's own box: the 2D box on the object's median slice, not a 3D box segmented slice by slice.
    assert prompts[0].kind == "box" and box.is_2d_box
    assert box.points.tolist() == [[expected.drawn_on, expected.j0, expected.i0],
                                   [expected.drawn_on, expected.j1, expected.i1]]  # fmt: skip
    clicks = [s["click"] for s in steps[1:] if "click" in s]
    assert [p.kind for p in prompts[1:]] == ["point"] * len(clicks)
    for prompt, click in zip(prompts[1:], clicks):
        assert session._interaction(prompt).points.tolist() == [click["kji"]] and prompt.positive == click["positive"]
