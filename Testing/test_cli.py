"""`medfm` end to end, in a real subprocess, on real files: outputs Slicer reads, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import slicerio

from conftest import enclosed_holes, face_components, sphere_volume, voxel_of
from conftest import run_medfm as run
from MedFMLib.imaging.geometry import extract_slice, plane_through, resolve_axis
from MedFMLib.imaging.io import read_volume, write_volume
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.imaging.volume import ras_to_lps_matrix
from MedFMLib.models.catalog import get_model_info


def coords(ras) -> str:
    return ",".join(f"{v:.4f}" for v in ras)


@pytest.fixture(scope="module")
def sphere_file(tmp_path_factory):
    volume, sphere, centre = sphere_volume("oblique_lps", noise_sd=2.0)
    path = write_volume(tmp_path_factory.mktemp("input") / "sphere.nii.gz", volume)
    return path, read_volume(path), sphere, centre


def test_segment_writes_a_slicer_segmentation_with_the_input_geometry(sphere_file, tmp_path):
    path, volume, sphere, centre = sphere_file
    out = tmp_path / "result.seg.nrrd"
    result = run("segment", path, "--model", "classic", "--view", "coronal", "--point", coords(centre), "--out", out)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout

    segmentation = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ras_to_lps_matrix(volume.ijk_to_ras), atol=1e-4)
    assert [s["name"] for s in segmentation["segments"]] == ["Segment_1"]
    voxels_kji = np.transpose(segmentation["voxels"], (2, 1, 0)) > 0
    plane = plane_through(volume, centre, "coronal")
    expected = np.zeros_like(sphere)
    expected[plane.array_index()] = extract_slice(sphere, plane)
    np.testing.assert_array_equal(voxels_kji, expected)


def test_slicer_itself_reads_the_segmentation(sphere_file, tmp_path):
    """Slicer's own storage node (slicer-core) loads the file onto the right voxels."""
    from slicer import vtkMRMLScene, vtkMRMLSegmentationNode, vtkMRMLSegmentationStorageNode
    from vtk.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    path, volume, sphere, centre = sphere_file
    out = tmp_path / "for_slicer.seg.nrrd"
    assert run("segment", path, "--point", coords(centre), "--name", "tumour", "--out", out).returncode == 0

    scene = vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert isinstance(node, vtkMRMLSegmentationNode)
    storage = vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment_id = segmentation.GetNthSegmentID(0)
    assert segmentation.GetSegment(segment_id).GetName() == "tumour"

    labelmap = node.GetBinaryLabelmapInternalRepresentation(segment_id)
    matrix = vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    image_to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(image_to_world, volume.ijk_to_ras, atol=1e-4)  # Slicer's world is RAS
    extent = labelmap.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    loaded = np.zeros(volume.array.shape, bool)
    loaded[extent[4] : extent[5] + 1, extent[2] : extent[3] + 1, extent[0] : extent[1] + 1] = values > 0
    plane = plane_through(volume, centre, "axial")
    expected = np.zeros_like(sphere)
    expected[plane.array_index()] = extract_slice(sphere, plane)
    np.testing.assert_array_equal(loaded, expected)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_segment_writes_a_labelmap(sphere_file, tmp_path, suffix):
    path, volume, sphere, centre = sphere_file
    ijk = volume.ras_to_ijk_points(centre)
    corner_a = volume.ijk_to_ras_points(ijk + np.array([-9, -9, 0]))
    corner_b = volume.ijk_to_ras_points(ijk + np.array([9, 9, 0]))
    out = tmp_path / f"labels{suffix}"
    result = run("segment", path, "--box", coords(corner_a) + "," + coords(corner_b), "--out", out)
    assert result.returncode == 0, result.stderr
    labels = read_volume(out)
    np.testing.assert_allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    plane = plane_through(volume, centre, "axial")
    np.testing.assert_array_equal(extract_slice(labels.array, plane) > 0, extract_slice(sphere, plane))
    assert labels.array.sum() == extract_slice(sphere, plane).sum()


def test_segment_with_a_sam_checkpoint(sphere_file, tmp_path, tiny_sam):
    path, volume, sphere, centre = sphere_file
    out = tmp_path / "sam.seg.nrrd"
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"]}
    negative = volume.ijk_to_ras_points(volume.ras_to_ijk_points(centre) + np.array([15, 0, 0]))
    result = run(
        "segment", path, "--model", "sam_tiny", "--checkpoint", tiny_sam, "--device", "cpu",
        "--point", coords(centre), "--negative", coords(negative), "--window", "400,100", "--out", out, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sam_tiny on cpu" in result.stdout
    segmentation = slicerio.read_segmentation(str(out))
    voxels = np.transpose(segmentation["voxels"], (2, 1, 0)) > 0
    plane = plane_through(volume, centre, "axial")
    # Whatever the random model draws, it draws it on the clicked slice only.
    outside = voxels.copy()
    outside[plane.array_index()] = False
    assert not outside.any()


def test_segment_says_once_that_a_box_only_model_left_the_clicks_unanswered(sphere_file, tmp_path, tiny_sam):
    """Two negative clicks that nothing can answer (no side of the box moves past them, and a flat image has no
    edge to correct the mask by): the note comes once, and the mask stays as the box gave it."""
    _, sphere_volume_, _, centre = sphere_file
    flat = read_volume(write_volume(tmp_path / "flat.nii.gz", type(sphere_volume_)(
        np.full(sphere_volume_.array.shape, 100.0), sphere_volume_.ijk_to_ras)))  # fmt: skip
    path = tmp_path / "flat.nii.gz"
    middle = flat.ras_to_ijk_points(centre)
    corners = [flat.ijk_to_ras_points(middle + np.array([d, d, 0])) for d in (-8, 8)]
    box = ["--box", coords(corners[0]) + "," + coords(corners[1])]
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"]}
    common = ["--model", "medsam_tiny", "--checkpoint", tiny_sam, "--device", "cpu", *box]
    boxed = run("segment", path, *common, "--out", tmp_path / "box.seg.nrrd", env=env)
    assert boxed.returncode == 0, boxed.stderr
    mask = slicerio.read_segmentation(str(tmp_path / "box.seg.nrrd"))["voxels"] > 0  # (I, J, K)
    k = int(round(middle[2]))
    inside = [(i, j) for i in range(int(middle[0]) - 2, int(middle[0]) + 3)
              for j in range(int(middle[1]) - 2, int(middle[1]) + 3) if mask[i, j, k]][:2]  # fmt: skip
    assert len(inside) == 2, "the tiny model's mask must hold the box's middle for this test"
    negatives = [arg for i, j in inside for arg in ("--negative", coords(flat.ijk_to_ras_points(np.array([i, j, k]))))]
    result = run("segment", path, *common, *negatives, "--out", tmp_path / "clicked.seg.nrrd", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("medsam_tiny reads boxes only") == 1  # two clicks unanswered, said once
    clicked = slicerio.read_segmentation(str(tmp_path / "clicked.seg.nrrd"))["voxels"] > 0
    np.testing.assert_array_equal(clicked, mask)


def test_negative_coordinates_are_read_as_values(sphere_file, tmp_path):
    path, volume, _, _ = sphere_file
    point = volume.ijk_to_ras_points(np.array([3.0, 3.0, 3.0]))
    assert point[0] < 0 or point[1] < 0 or point[2] < 0  # the geometry puts this corner at negative RAS
    result = run("segment", path, "--point", coords(point), "--out", tmp_path / "corner.nrrd")
    assert result.returncode == 0, result.stderr


BAD_INPUTS = {
    "missing input": (["segment", "{missing}", "--point", "0,0,0", "--out", "{out}"], "does not exist"),
    "not an image": (["segment", "{text}", "--point", "0,0,0", "--out", "{out}"], "Cannot read"),
    "bad suffix": (["segment", "{input}", "--point", "0,0,0", "--out", "{tmp}/out.png"], "Cannot write"),
    "bad point": (["segment", "{input}", "--point", "1,2", "--out", "{out}"], "Cannot read coordinates"),
    "outside": (["segment", "{input}", "--point", "9999,0,0", "--out", "{out}"], "outside the volume"),
    "no prompt": (["segment", "{input}", "--out", "{out}"], "at least one --point"),
    "unknown model": (
        ["segment", "{input}", "--model", "sam_vit_x", "--point", "0,0,0", "--out", "{out}"],
        "Unknown model",
    ),
    "no download address": (
        ["segment", "{input}", "--model", "medsam_vit_b", "--box", "{box2d}", "--out", "{out}"],
        "models import",
    ),
    "corrupt checkpoint": (
        [
            "segment",
            "{input}",
            "--model",
            "sam_vit_b",
            "--checkpoint",
            "{text}",
            "--point",
            "{centre}",
            "--out",
            "{out}",
        ],
        "not a readable PyTorch checkpoint",
    ),
    "bad window": (["segment", "{input}", "--window", "0,40", "--point", "{centre}", "--out", "{out}"], "width"),
    "bad preset": (["segment", "{input}", "--preset", "liver", "--point", "{centre}", "--out", "{out}"], "preset"),
    "3D box outside the volume": (["segment", "{input}", "--box", "{box3d}", "--out", "{out}"], "outside the volume"),
    "offline": (
        ["segment", "{input}", "--model", "sam_vit_b", "--point", "{centre}", "--out", "{out}"],
        "Download failed",
    ),
    "no output folder": (
        ["segment", "{input}", "--point", "{centre}", "--out", "{tmp}/nope/out.nrrd"],
        "does not exist",
    ),
}


def read_mask(path: Path) -> np.ndarray:
    """The first segment of a .seg.nrrd on the input's grid, as a (K, J, I) bool array."""
    return np.transpose(slicerio.read_segmentation(str(path))["voxels"], (2, 1, 0)) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("view", ["axial", "sagittal"])
def test_segment_propagate_gives_the_whole_sphere(sphere_file, tmp_path, view):
    path, volume, sphere, centre = sphere_file
    out = tmp_path / "sphere3d.seg.nrrd"
    result = run("segment", path, "--view", view, "--point", coords(centre), "--propagate", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "propagated from slice" in result.stderr and "forward" in result.stderr and "backward" in result.stderr
    assert dice(read_mask(out), sphere) >= 0.9
    # One direction only gives about half of it.
    result = run("segment", path, "--view", view, "--point", coords(centre), "--propagate", "forward", "--out", out)
    assert result.returncode == 0 and "backward" not in result.stderr
    assert 0.4 < dice(read_mask(out), sphere) < 0.85


def test_a_box_across_slices_is_a_3d_box(sphere_file, tmp_path):
    path, volume, sphere, centre = sphere_file
    corners = np.concatenate([centre - 12.0, centre + 12.0])  # a RAS-aligned box around the 9 mm sphere
    out = tmp_path / "box3d.seg.nrrd"
    result = run("segment", path, "--box", coords(corners), "--keep-connected", "--fill-holes", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "3D box: segmented" in result.stderr
    assert dice(read_mask(out), sphere) >= 0.9


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(case, sphere_file, tmp_path):
    path, volume, _, centre = sphere_file
    text = tmp_path / "notes.nrrd"
    text.write_text("hello")
    ijk = volume.ras_to_ijk_points(centre)
    box3d = np.concatenate([volume.ijk_to_ras_points(ijk - 1000), volume.ijk_to_ras_points(ijk - 990)])
    values = {
        "missing": tmp_path / "missing.nrrd",
        "text": text,
        "input": path,
        "out": tmp_path / "out.seg.nrrd",
        "tmp": tmp_path,
        "centre": coords(centre),
        "box3d": coords(box3d),
    }
    args, expected = BAD_INPUTS[case]
    values["box2d"] = coords(
        np.concatenate([volume.ijk_to_ras_points(ijk - [3, 3, 0]), volume.ijk_to_ras_points(ijk + [3, 3, 0])])
    )
    # An empty model folder, and a download address nobody answers at.
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            {"models": [dict(vars(get_model_info("sam_vit_b")), url="http://127.0.0.1:9/sam.pth")]}, default=list
        )
    )
    env = {"MEDFM_HOME": str(tmp_path / "home"), "MEDFM_CATALOG": str(catalog)}
    result = run(*[a.format(**values) for a in args], env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medfm: error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.seg.nrrd").exists()


def test_models_lists_names_and_licences(tmp_path):
    env = {"MEDFM_HOME": str(tmp_path / "home")}  # never the user's own models folder
    result = run("models", env=env)
    assert result.returncode == 0
    for name in ("classic", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "litemedsam", "mobilesam"):
        assert name in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line and line[0] != " "}
    assert rows["litemedsam"][-2:] == ["box", "Apache-2.0"]  # box prompts only: the list says so
    assert rows["mobilesam"][-2:] == ["point,box", "Apache-2.0"]
    listed = json.loads(run("models", "--json", env=env).stdout)
    assert {m["name"] for m in listed} >= {"classic", "medsam_vit_b"}
    assert all("license" in m and "commercial_use" in m for m in listed)


def test_bench_json_reports_the_required_fields():
    result = run("bench", "--model", "classic", "--size", "96", "--first-clicks", "2", "--clicks", "6", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("first_click_ms", "next_click_ms_p50", "next_click_ms_p95", "peak_rss_mb", "device", "model"):
        assert key in report
    assert report["model"] == "classic" and report["device"] == "cpu"
    assert report["cache_misses"] == 2 and report["cache_hits"] == 6
    assert report["next_click_ms_p95"] >= report["next_click_ms_p50"] > 0


def test_bench_with_a_sam_model(tiny_sam):
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"]}
    result = run(
        "bench", "--model", "sam_tiny", "--checkpoint", tiny_sam, "--device", "cpu", "--size", "64",
        "--first-clicks", "1", "--clicks", "3", "--json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "sam_tiny" and report["torch_threads"] >= 1


@pytest.mark.parametrize("model", ["sam_tiny", "medsam_tiny"])
def test_bench_propagate_walks_every_slice_with_point_and_box_only_models(tiny_sam, model):
    """A box-only model (MedSAM) is given the organ's box instead of a click: it used to stop at "draw a box"."""
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"]}
    result = run("bench", "--model", model, "--checkpoint", tiny_sam, "--device", "cpu", "--size", "64",
                 "--propagate", "--slices", "6", "--json", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == model and report["slices"] == 6
    # Which is faster is the benchmark's finding, not a test's: a 64-pixel tiny model's encoder costs next to
    # nothing, so cached and uncached walks differ by noise (this comparison failed under load).
    assert report["uncached_ms_p50"] > 0 and report["cached_ms_p50"] > 0


def test_demo_writes_a_segmentation(tmp_path):
    result = run("demo", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    segmentation = slicerio.read_segmentation(str(tmp_path / "demo_segmentation.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == ["organ", "lesion"]
    assert "Dice 1.000" in result.stdout


def test_bench_measures_the_gui_thread_during_a_background_encode():
    result = run("bench", "--model", "classic", "--size", "64", "--first-clicks", "2", "--clicks", "3", "--background",
                 "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["first_click_runs"] == 2 and report["gui_ticks_during_encode"] >= 1
    assert 0 < report["gui_tick_ms_p50_during_encode"] <= report["gui_tick_ms_max_during_encode"]
    assert report["click_on_prefetched_slice_ms"] > 0


# ------------------------------------------------------------ each option changes the result as it says
def phantom_file(folder: Path, shapes: list[Ellipsoid], name: str, dims=(48, 44, 24)):
    """An axis-aligned 1 mm phantom (R = +I, A = +J, S = +K) saved to a file: (path, volume, true masks)."""
    volume, masks = render(dims, make_ijk_to_ras(), shapes, name=name)
    return write_volume(folder / f"{name}.nrrd", volume), volume, masks


def test_a_negative_click_removes_what_it_points_at(sphere_file, tmp_path):
    path, volume, sphere, centre = sphere_file
    negative = volume.ijk_to_ras_points(volume.ras_to_ijk_points(centre) + np.array([4, 0, 0]))
    out = tmp_path / "negative.seg.nrrd"
    result = run("segment", path, "--point", coords(centre), "--negative", coords(negative), "--out", out)
    assert result.returncode == 0, result.stderr
    mask = read_mask(out)
    assert mask[voxel_of(volume, centre)] and not mask[voxel_of(volume, negative)]
    assert not (mask & ~sphere).any()
    # The same click without the negative one takes that voxel: the negative point is what removed it.
    alone = tmp_path / "alone.seg.nrrd"
    assert run("segment", path, "--point", coords(centre), "--out", alone).returncode == 0
    assert read_mask(alone)[voxel_of(volume, negative)]


def test_keep_connected_drops_the_part_a_negative_click_cut_off(tmp_path):
    # A bar along R: a negative click in its middle cuts it in two; only the clicked half touches the prompt.
    bar_centre = np.array([24.0, 22.0, 12.0])
    path, volume, (bar,) = phantom_file(tmp_path, [Ellipsoid(tuple(bar_centre), (18.0, 3.0, 6.0), 200.0)], "bar")
    positive, negative = bar_centre - [10.0, 0, 0], bar_centre
    args = ["segment", path, "--point", coords(positive), "--negative", coords(negative)]
    assert run(*args, "--out", tmp_path / "both.nrrd").returncode == 0
    assert run(*args, "--keep-connected", "--out", tmp_path / "kept.nrrd").returncode == 0
    both, kept = read_volume(tmp_path / "both.nrrd").array > 0, read_volume(tmp_path / "kept.nrrd").array > 0
    far_side = np.zeros_like(bar)
    far_side[:, :, int(bar_centre[0]) + 1 :] = True  # R beyond the negative click (R = I here)
    assert face_components(both)[1] == 2 and (both & far_side).any()  # the far half is there without the option
    assert kept[voxel_of(volume, positive)] and not (kept & far_side).any()
    assert np.array_equal(kept, both & ~far_side)


def test_fill_holes_fills_what_the_model_left_open(sphere_file, tmp_path, tiny_sam):
    path, volume, _, centre = sphere_file
    env = {"MEDFM_CATALOG": os.environ["MEDFM_CATALOG"]}
    args = ["segment", path, "--model", "sam_tiny", "--checkpoint", tiny_sam, "--device", "cpu",
            "--view", "sagittal", "--point", coords(centre), "--propagate"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "open.seg.nrrd", env=env).returncode == 0
    assert run(*args, "--fill-holes", "--out", tmp_path / "filled.seg.nrrd", env=env).returncode == 0
    unfilled, filled = read_mask(tmp_path / "open.seg.nrrd"), read_mask(tmp_path / "filled.seg.nrrd")
    axis = resolve_axis(volume.ijk_to_ras, "sagittal")  # IJK axis; the array is (K, J, I)
    planes = lambda mask: np.moveaxis(mask, 2 - axis, 0)  # noqa: E731 - slices across the view
    holes = np.stack([enclosed_holes(plane) for plane in planes(unfilled)])
    assert holes.sum() > 20, "the tiny random model should leave holes in its masks"
    assert np.array_equal(planes(filled), planes(unfilled) | holes)


def test_min_score_stops_propagation_where_the_model_is_less_sure(sphere_file, tmp_path):
    path, volume, sphere, centre = sphere_file
    out = tmp_path / "strict.seg.nrrd"
    # The classic model scores 1.0 wherever it finds something: asking for more stops every walk at once.
    result = run("segment", path, "--point", coords(centre), "--propagate", "--min-score", "1.5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "confidence dropped" in result.stderr
    plane = plane_through(volume, centre, "axial")
    expected = np.zeros_like(sphere)
    expected[plane.array_index()] = extract_slice(sphere, plane)
    np.testing.assert_array_equal(read_mask(out), expected)
    lenient = tmp_path / "lenient.seg.nrrd"
    assert run("segment", path, "--point", coords(centre), "--propagate", "--min-score", "0.5", "--out", lenient)
    assert dice(read_mask(lenient), sphere) >= 0.9


@pytest.mark.parametrize("window", [["--window", "100,50"], ["--preset", "brain"]])
def test_the_intensity_window_decides_what_the_model_sees(tmp_path, window):
    # A bright core (200) in a fainter shell (100): the automatic window tells them apart; a window whose top
    # is at or below 100 (width 100 at level 50; the brain preset, 80 at 40) makes both white, so they merge.
    centre = (24.0, 22.0, 12.0)
    shell, core = Ellipsoid(centre, (12.0, 12.0, 8.0), 100.0), Ellipsoid(centre, (5.0, 5.0, 4.0), 200.0)
    path, volume, (shell_mask, core_mask) = phantom_file(tmp_path, [shell, core], "layers")
    k = voxel_of(volume, centre)[0]
    assert run("segment", path, "--point", coords(centre), "--out", tmp_path / "auto.nrrd").returncode == 0
    assert run("segment", path, "--point", coords(centre), *window, "--out", tmp_path / "w.nrrd").returncode == 0
    automatic, windowed = read_volume(tmp_path / "auto.nrrd").array > 0, read_volume(tmp_path / "w.nrrd").array > 0
    np.testing.assert_array_equal(automatic[k], core_mask[k])
    np.testing.assert_array_equal(windowed[k], shell_mask[k])
