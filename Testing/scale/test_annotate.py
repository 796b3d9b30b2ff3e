"""`medfm annotate`: a whole dataset pre-segmented, in this process or through Ray Data, with the same files.

Real components throughout: the classic engine (deterministic, no weights) and a tiny random-weight SAM,
phantoms with known answers on oblique and LPS grids, the real MRI cases of Testing/data/real, and the run's
one local Ray cluster (the ``ray_cluster`` fixture, one GPU declared for placement only). Every Ray run goes
through ``main([... "--ray"])`` and is waited for with a time limit.
"""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import slicerio

from conftest import REAL_DATA, run_medfm, sphere_volume
from MedFMLib.cli import main
from MedFMLib.imaging.io import read_volume, write_labelmap, write_volume
from MedFMLib.imaging.volume import ras_to_lps_matrix
from MedFMLib.scale.annotate import label_box, label_names

# Every test here on one test worker (pytest -n): the run's one Ray cluster is started once.
pytestmark = pytest.mark.xdist_group("ray")

RAY_LIMIT_S = 240
PHANTOMS = ("oblique_lps", "lps_anisotropic")
REAL = {"brain1": ("brain1_image.nrrd", "brain1_label.nrrd"),
        "breast1": ("breast1_image.nrrd", "breast1_label.nrrd"),
        "prostate": ("prostate_phantom_subvolume.nrrd", "prostate_phantom_subvolume-label.nrrd")}  # fmt: skip


def within(seconds: float, function, *args):
    """Run ``function`` on a thread and wait at most ``seconds`` (a stuck Ray job fails the test, not the run)."""
    result: dict = {}

    def target():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def segmentation(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A .seg.nrrd read back with slicerio: (segment index map K, J, I, per segment), names, IJK→LPS."""
    seg = slicerio.read_segmentation(str(path))
    voxels = seg["voxels"] if seg["voxels"].ndim == 4 else seg["voxels"][None]  # (layer, I, J, K)
    masks = []
    for segment in seg["segments"]:
        layer = voxels[segment.get("layer", 0)]
        masks.append(np.transpose(layer == segment["labelValue"], (2, 1, 0)))
    return np.stack(masks), [s["name"] for s in seg["segments"]], np.asarray(seg["ijkToLPS"])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def write_csv(path: Path, header: str, rows: list) -> Path:
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in row) for row in rows) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- a mixed dataset
@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """A CSV dataset: two noisy phantom spheres (oblique LPS, anisotropic LPS), the three real MRI cases, a
    label of another shape than its image and an image that is no image. Returns (csv, truths by case)."""
    folder = tmp_path_factory.mktemp("mixed")
    rows, truths = [], {}
    for geometry in PHANTOMS:
        volume, mask, _ = sphere_volume(geometry, noise_sd=10.0)
        write_volume(folder / f"{geometry}.nrrd", volume)
        write_labelmap(folder / f"{geometry}_label.nrrd", mask.astype(np.uint8), volume)
        rows.append((f"{geometry}.nrrd", f"{geometry}_label.nrrd"))
        truths[geometry] = mask
    for image, label in REAL.values():
        rows.append((REAL_DATA / image, REAL_DATA / label))
    volume, mask, _ = sphere_volume("ras_aligned", dims=(20, 20, 10))
    write_volume(folder / "mismatch.nrrd", volume)
    write_labelmap(folder / "mismatch_label.nrrd", np.ones((9, 20, 20), np.uint8),
                   type(volume)(np.zeros((9, 20, 20)), volume.ijk_to_ras))  # fmt: skip
    (folder / "corrupt.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    rows += [("mismatch.nrrd", "mismatch_label.nrrd"), ("corrupt.nrrd", "oblique_lps_label.nrrd")]
    return write_csv(folder / "dataset.csv", "image,label", rows), truths


@pytest.fixture(scope="module")
def runs(mixed_dataset, ray_cluster, tmp_path_factory):
    """The mixed dataset annotated from its labels' boxes by the CLI, in this process and on Ray."""
    dataset, _ = mixed_dataset
    outs, codes = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDFM_HOME", str(tmp_path_factory.mktemp("home")))
        for where, extra in (("local", []), ("ray", ["--ray"])):
            outs[where] = tmp_path_factory.mktemp(where)
            argv = [str(dataset), "--model", "classic", "--out", str(outs[where]), "--boxes-from-labels", *extra]
            codes[where] = within(RAY_LIMIT_S, main, ["annotate", *argv])
    return outs, codes


def test_boxes_from_labels_give_the_phantoms_answer_in_their_geometry(mixed_dataset, runs):
    _, truths = mixed_dataset
    outs, codes = runs
    assert codes["local"] == 1  # two cases failed; the others are written
    rows = summary(outs["local"])
    for geometry, truth in truths.items():
        masks, names, ijk_to_lps = segmentation(outs["local"] / f"{geometry}.seg.nrrd")
        assert names == ["label 1"]
        # A bright sphere in noise, its tight box: classic finds the sphere itself.
        assert dice(masks[0], truth) > 0.97, geometry
        image = read_volume(Path(mixed_dataset[0]).parent / f"{geometry}.nrrd")
        np.testing.assert_allclose(ijk_to_lps, ras_to_lps_matrix(image.ijk_to_ras), atol=1e-6)
        row = rows[geometry]
        assert row["status"] == "done" and row["segments"] == "1" and row["output"] == f"{geometry}.seg.nrrd"
        voxel_ml = abs(np.linalg.det(image.ijk_to_ras[:3, :3])) / 1000
        assert float(row["volume_ml"]) == pytest.approx(masks[0].sum() * voxel_ml, abs=1e-3)
    # The prostate phantom's label map holds four structures: four segments.
    assert rows["prostate_phantom_subvolume"]["segments"] == "4"


def test_bad_cases_are_recorded_with_their_reason_and_the_others_go_on(runs):
    outs, codes = runs
    for where in ("local", "ray"):
        rows = summary(outs[where])
        assert [r["status"] for r in rows.values()].count("done") == 5, where
        assert rows["mismatch"]["status"] == "failed" and "shape" in rows["mismatch"]["reason"]
        assert rows["corrupt"]["status"] == "failed" and "Cannot read corrupt.nrrd" in rows["corrupt"]["reason"]
        assert all("\n" not in r["reason"] for r in rows.values())
        assert not (outs[where] / "mismatch.seg.nrrd").exists() and not (outs[where] / "corrupt.seg.nrrd").exists()
        assert not [p for p in outs[where].iterdir() if "partial" in p.name or p.name.startswith(".")]
    assert codes["ray"] == 1


def test_ray_gives_the_same_files_as_in_process_on_phantoms_and_real_scans(runs):
    outs, _ = runs
    written = sorted(p.name for p in outs["local"].glob("*.seg.nrrd"))
    assert len(written) == 5 and written == sorted(p.name for p in outs["ray"].glob("*.seg.nrrd"))
    for name in written:
        local, ray = segmentation(outs["local"] / name), segmentation(outs["ray"] / name)
        np.testing.assert_array_equal(local[0], ray[0], err_msg=name)
        assert local[1] == ray[1]
        np.testing.assert_array_equal(local[2], ray[2])
        assert local[0].any(), name  # (classic finds nothing of the prostate phantom's labels 8 and 9: the model)
    local_rows, ray_rows = summary(outs["local"]), summary(outs["ray"])
    for case, row in local_rows.items():
        same = ("status", "segments", "volume_ml", "output", "reason")
        assert {k: row[k] for k in same} == {k: ray_rows[case][k] for k in same}, case


# ------------------------------------------------------------------------------------- resume
def phantom_dataset(folder: Path, count: int = 3, names: dict | None = None) -> Path:
    """An MSD folder of phantom spheres (oblique LPS grid), with dataset.json naming label 1."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        volume, mask, _ = sphere_volume("oblique_lps", dims=(32, 30, 16), radius_mm=6.0 + index)
        write_volume(folder / "imagesTr" / f"case{index}_0000.nii.gz", volume)
        write_labelmap(folder / "labelsTr" / f"case{index}.nii.gz", mask.astype(np.uint8), volume)
    (folder / "dataset.json").write_text(json.dumps({"labels": names or {"0": "background", "1": "sphere"}}))
    return folder


def test_resume_skips_finished_cases_and_redoes_failed_and_missing_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    dataset, out = phantom_dataset(tmp_path / "ds"), tmp_path / "out"
    good_label = (dataset / "labelsTr" / "case2.nii.gz").read_bytes()
    (dataset / "labelsTr" / "case2.nii.gz").write_bytes(b"broken")
    argv = ["annotate", str(dataset), "--model", "classic", "--out", str(out), "--boxes-from-labels"]
    assert main(argv) == 1
    first = summary(out)
    assert [first[c]["status"] for c in ("case0", "case1", "case2")] == ["done", "done", "failed"]
    assert segmentation(out / "case0.seg.nrrd")[1] == ["sphere"]  # named from dataset.json
    kept = (out / "case0.seg.nrrd").stat().st_mtime_ns
    (out / "case1.seg.nrrd").unlink()  # done, but its file is gone: done again
    (dataset / "labelsTr" / "case2.nii.gz").write_bytes(good_label)  # fixed: done now
    assert main([*argv, "--resume"]) == 0
    second = summary(out)
    assert [second[c]["status"] for c in ("case0", "case1", "case2")] == ["skipped", "done", "done"]
    assert second["case0"]["segments"] == "1" and second["case0"]["output"] == "case0.seg.nrrd"
    assert (out / "case0.seg.nrrd").stat().st_mtime_ns == kept
    assert (out / "case1.seg.nrrd").is_file() and (out / "case2.seg.nrrd").is_file()
    assert main([*argv, "--resume"]) == 0
    assert {row["status"] for row in summary(out).values()} == {"skipped"}


def test_dataset_json_names_in_both_layouts(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2,
                                                                  "both": [1, 2]}}))  # fmt: skip
    assert label_names(tmp_path) == {1: "liver", 2: "tumour"}  # nnU-Net v2 (regions are no label value)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "kidney"}}))
    assert label_names(tmp_path / "any.csv") == {1: "kidney"}  # MSD, beside a CSV
    mask = np.zeros((6, 7, 8), bool)
    mask[2:4, 1, 3:6] = True
    assert label_box(mask) == (2, 3, 1, 1, 3, 5)


# ------------------------------------------------------------------------------------- prompts CSV
def sphere_prompts(folder: Path) -> tuple[Path, np.ndarray, dict]:
    """A folder of one image (no labels): an oblique LPS sphere, and prompts that should find it."""
    folder.mkdir(parents=True, exist_ok=True)
    volume, truth, centre = sphere_volume("oblique_lps", noise_sd=10.0)
    write_volume(folder / "sphere_0000.nii.gz", volume)
    k = int(np.rint(volume.ras_to_ijk_points(centre)[2]))
    k0, k1, j0, j1, i0, i1 = label_box(truth)
    on_slice = [volume.ijk_to_ras_points(np.array([i, j, k], float)) for i, j in ((i0 - 2, j0 - 2), (i1 + 2, j1 + 2))]
    in_3d = [volume.ijk_to_ras_points(np.array([i, j, kk], float)) for i, j, kk in ((i0, j0, k0), (i1, j1, k1))]
    far = volume.ijk_to_ras_points(np.array([2.0, 2.0, k]))
    objects = {"clicked": [("point", centre), ("negative", far)], "boxed": [("box", *on_slice)],
               "boxed_3d": [("box", *in_3d)]}  # fmt: skip
    return folder, truth, objects


def prompts_csv(path: Path, case: str, objects: dict) -> Path:
    rows = []
    for name, prompts in objects.items():
        for kind, *corners in prompts:
            numbers = [round(float(v), 4) for corner in corners for v in corner]
            rows.append([case, name, kind, *numbers, *[""] * (6 - len(numbers))])
    return write_csv(path, "case,object,kind,r,a,s,r2,a2,s2", rows)


def test_a_prompts_csv_of_points_and_boxes_segments_a_folder_of_images(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    folder, truth, objects = sphere_prompts(tmp_path / "images")
    prompts = prompts_csv(tmp_path / "prompts.csv", "sphere", objects)
    out = tmp_path / "out"
    argv = ["annotate", str(folder), "--model", "classic", "--out", str(out), "--prompts", str(prompts)]
    assert main([*argv, "--propagate"]) == 0
    masks, names, _ = segmentation(out / "sphere.seg.nrrd")
    assert names == ["clicked", "boxed", "boxed_3d"]
    assert dice(masks[0], truth) > 0.97 and dice(masks[1], truth) > 0.97
    # A 3D box under `medfm segment`'s own stop rules (not the challenge's): the sphere, less some of its rim.
    assert dice(masks[2], truth) > 0.85
    # Without --propagate a click and a 2D box give their own slice only; the 3D box its whole range.
    assert main([*argv, "--out", str(tmp_path / "flat")]) == 0
    flat, _, _ = segmentation(tmp_path / "flat" / "sphere.seg.nrrd")
    assert flat[0].any(axis=(1, 2)).sum() == 1 and flat[1].any(axis=(1, 2)).sum() == 1
    np.testing.assert_array_equal(flat[2], masks[2])
    assert summary(tmp_path / "flat")["sphere"]["segments"] == "3"


def test_a_prompt_outside_the_image_fails_that_case_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    folder, _, objects = sphere_prompts(tmp_path / "images")
    volume, _, _ = sphere_volume("lps_anisotropic")
    write_volume(folder / "other_0000.nii.gz", volume)
    prompts = prompts_csv(tmp_path / "prompts.csv", "sphere", {"far": [("point", (900.0, 0.0, 0.0))]})
    out = tmp_path / "out"
    assert main(["annotate", str(folder), "--model", "classic", "--out", str(out), "--prompts", str(prompts)]) == 1
    rows = summary(out)
    assert rows["sphere"]["status"] == "failed" and "outside the volume" in rows["sphere"]["reason"]
    assert rows["other"]["status"] == "skipped" and rows["other"]["reason"] == "no prompts for this case"


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([["nosuch", "a", "point", 1, 2, 3, "", "", ""]], "does not have: nosuch"),
        ([["sphere", "a", "circle", 1, 2, 3, "", "", ""]], "prompts.csv line 2: kind 'circle'"),
        ([["sphere", "a", "box", 1, 2, 3, "", "", ""]], "prompts.csv line 2: a box needs numbers"),
        ([["sphere", "a", "point", "x", 2, 3, "", "", ""]], "prompts.csv line 2: a point needs numbers"),
    ],
)
def test_a_bad_prompts_file_is_one_clear_line_before_any_work(tmp_path, capsys, rows, expected):
    folder, _, _ = sphere_prompts(tmp_path / "images")
    prompts = write_csv(tmp_path / "prompts.csv", "case,object,kind,r,a,s,r2,a2,s2", rows)
    out = tmp_path / "out"
    assert main(["annotate", str(folder), "--model", "classic", "--out", str(out), "--prompts", str(prompts)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medfm: error:") and expected in err[0], err
    assert not (out / "sphere.seg.nrrd").exists()


def test_classes_for_a_model_without_them_is_one_line_and_no_work(tmp_path):
    folder, _, _ = sphere_prompts(tmp_path / "images")
    result = run_medfm("annotate", folder, "--model", "classic", "--out", tmp_path / "out", "--class", "liver,spleen")
    assert result.returncode == 1
    assert result.stderr.strip() == ("medfm: error: classic takes no class prompts; give --prompts or "
                                     "--boxes-from-labels instead.")  # fmt: skip
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- a real model on Ray
def test_tiny_sam_on_ray_workers_finds_its_catalog_and_matches_in_process(tiny_sam, tmp_path, monkeypatch,
                                                                          ray_cluster):  # fmt: skip
    """The cluster started before MEDFM_CATALOG and MEDFM_HOME were set: the workers get them from the command."""
    import torch

    from MedFMLib.models.store import ModelStore

    home = tmp_path / "home"
    monkeypatch.setenv("MEDFM_HOME", str(home))
    ModelStore(home).import_file(tiny_sam, "sam_tiny")
    folder, _, objects = sphere_prompts(tmp_path / "images")
    prompts = prompts_csv(tmp_path / "prompts.csv", "sphere", objects)
    argv = ["annotate", str(folder), "--model", "sam_tiny", "--prompts", str(prompts), "--propagate",
            "--runtime", "torch"]  # fmt: skip
    threads = torch.get_num_threads()
    # A Ray actor of one CPU runs torch on one thread; random weights make the sums' order show in the masks.
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert within(RAY_LIMIT_S, main, [*argv, "--out", str(tmp_path / "ray"), "--ray", "--gpus", "1"]) == 0
    assert summary(tmp_path / "ray")["sphere"]["status"] == "done"
    local = segmentation(tmp_path / "local" / "sphere.seg.nrrd")
    ray = segmentation(tmp_path / "ray" / "sphere.seg.nrrd")
    assert local[1] == ray[1] == ["clicked", "boxed", "boxed_3d"]
    assert all(mask.any() for mask in local[0])
    np.testing.assert_array_equal(local[0], ray[0])


def test_more_actors_than_the_cluster_has_gpus_is_one_line(tmp_path, ray_cluster, capsys):
    folder = phantom_dataset(tmp_path / "ds", count=1)
    argv = ["annotate", str(folder), "--model", "classic", "--out", str(tmp_path / "out"), "--boxes-from-labels"]
    assert within(RAY_LIMIT_S, main, [*argv, "--ray", "--gpus", "3"]) == 1
    assert "--gpus 3, but the Ray cluster has 1 GPU(s)" in capsys.readouterr().err
    assert main([*argv, "--gpus", "2"]) == 1
    assert "--gpus sizes the Ray actor pool; give it with --ray." in capsys.readouterr().err


def test_the_ray_serve_benchmark_times_the_same_clicks_through_both_servers(ray_cluster, capsys):
    """`medfm bench --ray-serve`: a click through the plain server and through Ray, alternately, in one run."""
    from MedFMLib.cli import main

    assert main(["bench", "--ray-serve", "--size", "64", "--slices", "8", "--clicks", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["masks_equal"] and result["clicks"] == 4
    assert result["plain_click_ms"]["median"] > 0 and result["ray_click_ms"]["median"] > 0
    assert result["ray_session_start_ms"] > 0 and result["session_actor_mib"] > 50
    # Serve is taken down again: the next server on this cluster may choose its own port.
    from ray import serve

    assert not serve.status().applications
