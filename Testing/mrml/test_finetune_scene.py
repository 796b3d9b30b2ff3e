"""Fine-tuning from a Slicer scene: segmentations exported as cases, and training on a worker thread (slicer-core)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from conftest import add_segmentation_node, sphere_volume
from MedFMLib.errors import MedFMError
from MedFMLib.models.store import ModelStore
from MedFMLib.mrml.bridge import add_volume_node, ensure_segment, set_segment_mask
from MedFMLib.mrml.finetune import FinetuneTask, casesFromScene, describeProgress, finetuneBaseModels
from MedFMLib.testing import write_tiny_sam_catalog

# Three phantoms, oblique and LPS among them: (geometry, dims, sphere radius in mm)
PHANTOMS = [("oblique_lps", (40, 36, 16), 8.0), ("lps_anisotropic", (44, 40, 12), 9.0),
            ("oblique_anisotropic", (36, 40, 14), 7.0)]  # fmt: skip


def _add_case(scene, geometry, dims, radius, extra_segment=False):
    """A volume node and its segmentation node: a 'sphere' segment (and a 'block' one): the expected labels."""
    volume, sphere, _ = sphere_volume(geometry, dims=dims, radius_mm=radius)
    volume_node = add_volume_node(scene, volume, f"{geometry} volume")
    segmentation_node = add_segmentation_node(scene, volume_node)
    segmentation_node.SetName(f"{geometry} segmentation")
    set_segment_mask(segmentation_node, ensure_segment(segmentation_node, "sphere"), sphere, volume)
    expected = sphere.astype(np.int32)
    if extra_segment:
        block = np.zeros(sphere.shape, bool)
        block[1:4, 2:8, 3:9] = True  # a corner of the volume, away from the sphere
        assert not (block & sphere).any()
        set_segment_mask(segmentation_node, ensure_segment(segmentation_node, "block"), block, volume)
        expected[block] = 2
    return volume_node, segmentation_node, expected


@pytest.fixture
def scene_cases(mrml_scene):
    """Three phantom volume nodes, each with a segmentation node; the first has two segments."""
    added = [_add_case(mrml_scene, *phantom, extra_segment=index == 0) for index, phantom in enumerate(PHANTOMS)]
    return mrml_scene, added


def _slicer_export(scene, segmentation_node, volume_node) -> np.ndarray:
    """Slicer's own export of all segments to a label map on the volume's geometry: the oracle."""
    from slicer import vtkSlicerSegmentationsModuleLogic

    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "oracle")
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    assert vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap_node,
                                                                          volume_node)  # fmt: skip
    image = labelmap_node.GetImageData()
    columns, rows, slices = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(slices, rows, columns).copy()
    scene.RemoveNode(labelmap_node)
    return array


def test_cases_from_scene_are_the_segments_on_each_volumes_own_grid(scene_cases):
    scene, added = scene_cases
    cases = casesFromScene(scene)
    assert [c.name for c in cases] == [s.GetName() for _, s, _ in added]
    for case, (volume_node, segmentation_node, expected) in zip(cases, added):
        volume, labels = case.load()
        assert labels.dtype == np.int32 and labels.shape == expected.shape
        np.testing.assert_array_equal(labels, expected)  # segment n is label n, voxel for voxel
        np.testing.assert_array_equal(labels, _slicer_export(scene, segmentation_node, volume_node))
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(volume.ijk_to_ras, [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert set(np.unique(cases[0].labels)) == {0, 1, 2}
    # Segmentation nodes alone, or paired with their volumes, give the same cases.
    for source in ([s for _, s, _ in added], [(s, v) for v, s, _ in added]):
        for again, case in zip(casesFromScene(source), cases):
            np.testing.assert_array_equal(again.labels, case.labels)


def test_a_segmentation_paired_with_another_volume_is_resampled_onto_that_volume(scene_cases):
    scene, added = scene_cases
    volume_node, segmentation_node, _ = added[0]
    # The first segmentation on a second grid: the sphere's world position, with the other volume's geometry.
    volume, _, _ = sphere_volume("ras_aligned", dims=(40, 40, 40), radius_mm=1.0)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    grid_node = add_volume_node(scene, volume, "ras grid")
    grid_node.SetIJKToRASMatrix(matrix)
    grid_node.SetSpacing(1.1, 0.9, 1.3)
    (case,) = casesFromScene([(segmentation_node, grid_node)])
    assert case.labels.shape == (40, 40, 40)
    np.testing.assert_array_equal(case.labels, _slicer_export(scene, segmentation_node, grid_node))
    assert set(np.unique(case.labels)) == {0, 1, 2}


def test_empty_or_volumeless_segmentations_are_refused_with_one_line_naming_them(scene_cases):
    scene, added = scene_cases
    volume_node = added[0][0]
    empty = add_segmentation_node(scene, volume_node)
    empty.SetName("Liver draft")
    for _ in range(2):  # no segment at all, then a segment without a voxel
        with pytest.raises(MedFMError) as raised:
            casesFromScene(scene)
        message = str(raised.value)
        assert "'Liver draft' is empty" in message and "\n" not in message
        ensure_segment(empty, "liver")
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Loose segmentation")
    with pytest.raises(MedFMError, match="'Loose segmentation' has no volume"):
        casesFromScene([orphan])
    with pytest.raises(MedFMError, match="No segmentation selected"):
        casesFromScene([])


# ------------------------------------------------------------------ training on a worker thread
@pytest.fixture
def tiny_store(tmp_path, monkeypatch):
    """A fresh MEDFM_HOME with the tiny SAM imported, its catalog active; torch on one thread meanwhile.

    The tiny decoder's steps are too small for threads to help: on a busy two-core machine torch's threads
    wait on each other, and an epoch of a dozen objects took 15 s instead of 0.7 s.
    """
    import torch

    catalog = write_tiny_sam_catalog(tmp_path / "tiny")
    monkeypatch.setenv("MEDFM_CATALOG", str(catalog))
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    ModelStore().import_file(catalog.parent / "sam_tiny.pth", "sam_tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelStore()
    torch.set_num_threads(threads)


def _poll(task, on_snapshot=None, patience=600.0):
    """Poll as the GUI's timer does; the snapshots seen. ``patience`` only guards against a hang."""
    seen = []
    deadline = time.monotonic() + patience
    while task.isRunning and time.monotonic() < deadline:
        seen.append(task.progress())
        if on_snapshot is not None:
            on_snapshot(seen[-1])
        time.sleep(0.005)
    assert task.wait(1.0), "the fine-tuning thread did not end"
    seen.append(task.progress())
    return seen


def test_task_checks_what_it_can_before_starting(scene_cases, tiny_store):
    cases = casesFromScene(scene_cases[0])
    assert "sam_tiny" in finetuneBaseModels(tiny_store) and "classic" not in finetuneBaseModels(tiny_store)
    for base, name, cases_given, match in (
        ("sam_tiny", "sam_tiny", cases, "catalog model"),
        ("classic", "mine", cases, "not a SAM-family model"),
        ("sam_tiny", "", cases, "Give the fine-tuned model a name"),
        ("sam_tiny", "mine", cases[:1], "two segmentations or more"),
    ):
        with pytest.raises(MedFMError, match=match):
            FinetuneTask(cases_given, base, name, tiny_store, device="cpu")


def test_task_trains_in_the_background_reports_progress_and_registers_the_model(scene_cases, tiny_store):
    scene, _ = scene_cases
    cases = casesFromScene(scene)
    task = FinetuneTask(cases, "sam_tiny", "sphere_sam", tiny_store, epochs=2, valFraction=0.34, device="cpu")
    assert (len(task.trainCases), len(task.valCases)) == (2, 1)
    task.start()
    scene.Clear(True)  # the worker has its own copies: the scene may change while it trains
    seen = _poll(task)
    assert task.error is None, task.error
    run = task.result
    assert run.name == "sphere_sam" and len(run.result.history) == 2 and not run.result.stopped
    phases = {s["phase"] for s in seen}
    assert {"embedding", "training"} <= phases and seen[-1]["phase"] == "done"
    last = [s for s in seen if s["phase"] == "training"][-1]
    assert last["epoch"] == 2 and last["valDice"] is not None and last["loss"] is not None
    assert "Epoch 2/2" in describeProgress(last) and "validation Dice" in describeProgress(last)
    assert any(s["phase"] == "embedding" and s["total"] > 0 for s in seen)
    store = ModelStore()
    card = store.card("sphere_sam")
    assert card is not None and card["base_model"] == "sam_tiny" and store.is_ready("sphere_sam")
    assert card["data"]["training_cases"] == 2 and card["validation_dice"]["after"] == round(run.result.best_dice, 4)
    assert "sphere_sam" in finetuneBaseModels(store)  # a fine-tune can be fine-tuned again


def test_stop_during_training_keeps_the_best_weights_and_registers_the_model(scene_cases, tiny_store):
    import torch

    from MedFMLib.training.trainer import FinetuneConfig

    cases = casesFromScene(scene_cases[0])
    config = FinetuneConfig(epochs=500, patience=500, batch_size=2)
    task = FinetuneTask(cases, "sam_tiny", "stopped_sam", tiny_store, valFraction=0.34, device="cpu", config=config)
    task.start()
    # Stop once an epoch has been validated: the next one is under way, its weights not yet the best.
    seen = _poll(task, lambda snapshot: snapshot["dicedEpoch"] >= 1 and task.stop())
    assert task.error is None, task.error
    result = task.result.result
    assert result.stopped and result.reason == "stopped" and len(result.history) < 500
    assert seen[-1]["phase"] == "done"
    store = ModelStore()
    assert store.card("stopped_sam")["training"]["ended_by"] == "stopped" and store.is_ready("stopped_sam")
    # The registered weights are the best epoch's (the base model's when no epoch was done or better).
    saved = torch.load(store.path("stopped_sam"), map_location="cpu", weights_only=True)
    if result.best_epoch:
        best = torch.load(task.work / "state.pt", map_location="cpu", weights_only=True)["best"]
    else:
        base = torch.load(store.path("sam_tiny"), map_location="cpu", weights_only=True)
        best = {name: value for name, value in base.items() if name.startswith("mask_decoder.")}
    assert best and all(torch.equal(saved[name], value) for name, value in best.items())


def test_stop_before_training_is_one_line_and_registers_nothing(scene_cases, tiny_store):
    task = FinetuneTask(casesFromScene(scene_cases[0]), "sam_tiny", "never_sam", tiny_store, device="cpu")
    task.stop()  # before a slice is embedded
    task.start()
    seen = _poll(task)
    assert task.result is None and task.errorDetails is None and seen[-1]["phase"] == "failed"
    assert task.error.startswith("Stopped while embedding the slices") and "\n" not in task.error
    assert "never_sam" not in ModelStore().models()
