"""`medfm segment` and `medfm models` with native 3D models (tiny nnInteractive and VISTA3D), as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_medfm, sphere_volume
from MedFMLib.app.files import read_segments
from MedFMLib.imaging.io import write_volume
from MedFMLib.segment_volume import read_stroke_file


def env_of(home, catalog) -> dict:
    return {"MEDFM_HOME": str(home), "MEDFM_CATALOG": str(catalog)}


@pytest.fixture
def phantom_file(tmp_path):
    volume, _, centre = sphere_volume("oblique_lps", dims=(40, 36, 20), radius_mm=8.0, noise_sd=5.0)
    path = tmp_path / "phantom.nrrd"
    write_volume(path, volume)
    return path, volume, centre


def ras_text(point) -> str:
    return ",".join(f"{v:.3f}" for v in point)


def test_stroke_files_slicer_markups_in_lps_or_json_points(tmp_path):
    markups = {"markups": [{"type": "Curve", "coordinateSystem": "LPS",
                            "controlPoints": [{"position": [10.0, -20.0, 5.0]}, {"position": [12.0, -18.0, 5.0]}]}]}
    (tmp_path / "curve.mrk.json").write_text(json.dumps(markups))
    (stroke,) = read_stroke_file(tmp_path / "curve.mrk.json")
    np.testing.assert_allclose(stroke, [[-10.0, 20.0, 5.0], [-12.0, 18.0, 5.0]])  # LPS becomes RAS
    (tmp_path / "two.json").write_text(json.dumps([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9]]]))
    assert [s.shape for s in read_stroke_file(tmp_path / "two.json")] == [(2, 3), (1, 3)]
    (tmp_path / "bad.json").write_text('{"points": 3}')
    from MedFMLib.errors import MedFMError

    with pytest.raises(MedFMError, match="no usable stroke"):
        read_stroke_file(tmp_path / "bad.json")


def test_models_list_and_info_show_what_kind_each_model_is(tmp_path):
    listed = run_medfm("models", "list", env={"MEDFM_HOME": str(tmp_path)})
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert "3D + classes" in rows["vista3d"] and " 3D " in rows["nninteractive"] and "slice" in rows["sam_vit_b"]
    assert "NO" in rows["nninteractive"] and "CC-BY-NC-SA-4.0" in rows["nninteractive"]
    info = run_medfm("models", "info", "vista3d", env={"MEDFM_HOME": str(tmp_path)})
    assert info.returncode == 0, info.stderr
    assert "NON-COMMERCIAL" in info.stdout and "classes (127; `everything` = 117 of them)" in info.stdout
    assert " liver," in info.stdout and "left kidney" in info.stdout.lower()


def test_importing_an_incomplete_model_folder_says_what_is_missing(tmp_path, tiny_volume_catalog):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "plans.json").write_text("{}")
    result = run_medfm("models", "import", folder, "--name", "nninteractive_tiny",
                       env=env_of(tmp_path / "home", tiny_volume_catalog))  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "fold_0/checkpoint_final.pth" in result.stderr
    assert "dataset.json" in result.stderr and "Traceback" not in result.stderr


def test_segment_with_nninteractive_points_box_scribble_and_lasso(tmp_path, phantom_file, tiny_volume_models,
                                                                  tiny_volume_catalog):  # fmt: skip
    path, volume, centre = phantom_file
    k, j, i = np.rint(volume.ras_to_ijk_points(centre)[::-1])

    def ras(dk, dj, di):
        return volume.ijk_to_ras_points(np.array([i + di, j + dj, k + dk]))

    (tmp_path / "scribble.json").write_text(json.dumps([ras(0, -3, -3).tolist(), ras(0, 3, 3).tolist()]))
    (tmp_path / "lasso.json").write_text(json.dumps([ras(0, -6, -6).tolist(), ras(0, -6, 6).tolist(),
                                                     ras(0, 6, 6).tolist(), ras(0, 6, -6).tolist()]))  # fmt: skip
    out = tmp_path / "lesion.seg.nrrd"
    result = run_medfm(
        "segment", path, "--model", "nninteractive_tiny", "--device", "cpu", "--point", ras_text(centre),
        "--negative", ras_text(ras(0, 12, 12)), "--box", ras_text(ras(0, -8, -8)) + "," + ras_text(ras(0, 8, 8)),
        "--scribble", tmp_path / "scribble.json", "--lasso", tmp_path / "lasso.json", "--view", "axial",
        "--propagate", "--name", "lesion", "--out", out, env=env_of(tiny_volume_models, tiny_volume_catalog),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "answers in 3D already" in result.stderr and "with nninteractive_tiny on cpu" in result.stdout
    segments = read_segments(out, volume)
    assert [s.name for s in segments] == ["lesion"] and segments[0].mask.shape == volume.array.shape


def test_segment_with_vista3d_classes_gives_named_segments(tmp_path, phantom_file, tiny_volume_models,
                                                           tiny_volume_catalog):  # fmt: skip
    path, volume, _ = phantom_file
    out = tmp_path / "organs.seg.nrrd"
    env = env_of(tiny_volume_models, tiny_volume_catalog)
    result = run_medfm("segment", path, "--model", "vista3d_tiny", "--device", "cpu", "--class", "liver,spleen",
                       "--out", out, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    segments = read_segments(out, volume)
    assert [s.name for s in segments] == ["liver", "spleen"]
    assert segments[0].color != segments[1].color
    no_classes = run_medfm("segment", path, "--model", "nninteractive_tiny", "--class", "liver", "--out", out,
                           env=env)  # fmt: skip
    assert no_classes.returncode == 1 and "takes no class prompts" in no_classes.stderr
    slice_model = run_medfm("segment", path, "--model", "classic", "--scribble", tmp_path / "x.json", "--out", out,
                            env=env)  # fmt: skip
    assert slice_model.returncode == 1 and "need a 3D model" in slice_model.stderr


def test_bench_times_first_and_further_interactions_of_a_3d_model(tmp_path, tiny_volume_catalog):
    result = run_medfm("bench", "--model", "nninteractive_tiny", "--random-weights", "--device", "cpu",
                       "--volume-sizes", "48,40x36x24", "--clicks", "2", "--json",
                       env=env_of(tmp_path / "home", tiny_volume_catalog))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["size"] for row in report["sizes"]] == [[48, 48, 48], [40, 36, 24]]
    for row in report["sizes"]:
        assert row["first_s"] > 0 and len(row["further_s"]) == 2 and row["further_median_s"] > 0
        assert row["peak_rss_mb"] > 100 and row["peak_gpu_mb"] is None
    assert "further 2/2" in result.stderr  # progress, step by step
    bad = run_medfm("bench", "--model", "nninteractive_tiny", "--random-weights", "--volume-sizes", "12x3",
                    env=env_of(tmp_path / "home", tiny_volume_catalog))  # fmt: skip
    assert bad.returncode == 1 and "Cannot read the volume size '12x3'" in bad.stderr
