"""The interaction controller that the Segment Editor effect and the app share: headless, on real MRML
(slicer-core), with real worker threads, a real engine and, for remote use, a real server.

Every path the effect had is here: encode-then-decode, a drag, a negative click, a box, propagation with
progress, cancel and failure, a correction that re-propagates, undo and redo, Apply with masking, Cancel,
a model change, a remote session, and running out of GPU memory.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import vtk

from conftest import SERVER_TOKEN, add_segmentation_node
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.imaging.volume import Volume
from MedFMLib.models.store import ModelStore
from MedFMLib.mrml.bridge import add_volume_node, ensure_segment, segment_array
from MedFMLib.mrml.controller import ControllerSettings, InteractionController
from MedFMLib.mrml.logic import SegmentationLogic

MATRIX = make_ijk_to_ras((0.9, 0.8, 2.0), (20.0, -30.0, 5.0), (10, -5, 20), (1, 1, 1))
DIMS = (48, 44, 30)


def ras_of(ijk) -> np.ndarray:
    return MATRIX[:3, :3] @ np.asarray(ijk, float) + MATRIX[:3, 3]


# A long organ (through most slices) on the left, a small lesion on the right, on a dark body.
ORGAN_AT, LESION_AT = ras_of((14.3, 22.2, 15.1)), ras_of((36.2, 20.7, 15.1))


@pytest.fixture
def phantom():
    organ = Ellipsoid(tuple(ORGAN_AT), (7.0, 7.0, 22.0), 200.0)
    lesion = Ellipsoid(tuple(LESION_AT), (4.5, 4.5, 4.5), 200.0)
    volume, (organ_mask, lesion_mask) = render(DIMS, MATRIX, [organ, lesion], background=0.0, name="phantom")
    return volume, organ_mask, lesion_mask


class Editor:
    """What a front end holds: the scene, the editor node, the controller, and its answers to questions."""

    def __init__(self, scene, volume, tmp_path, settings: ControllerSettings | None = None) -> None:
        self.scene, self.volume = scene, volume
        self.volumeNode = add_volume_node(scene, volume)
        self.segmentation = add_segmentation_node(scene, self.volumeNode)
        self.segmentId = ensure_segment(self.segmentation, "organ", color=(0.9, 0.6, 0.2))
        self.editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.editorNode.SetAndObserveSourceVolumeNode(self.volumeNode)
        self.editorNode.SetAndObserveSegmentationNode(self.segmentation)
        self.editorNode.SetSelectedSegmentID(self.segmentId)
        self.logic = SegmentationLogic(store=ModelStore(tmp_path / "home"))
        self.logic.runtime = "torch"  # OpenVINO's conversion is tested elsewhere
        self.questions: list[str] = []
        self.answer = True
        self.undoStates = 0
        self.fallbacks: list[str] = []
        self.changes = 0
        self.now = 0.0
        self.controller = InteractionController(
            self.logic,
            self.editorNode,
            settings or ControllerSettings(),
            ask=self._ask,
            saveUndoState=self._saveUndo,
            onDeviceFallback=self.fallbacks.append,
            clock=lambda: self.now,
        )
        self.controller.onChanged = self._changed
        self.axial = self.sliceNode((0, 0, 1))

    def _ask(self, question: str) -> bool:
        self.questions.append(question)
        return self.answer

    def _saveUndo(self) -> None:
        self.undoStates += 1

    def _changed(self) -> None:
        self.changes += 1

    def sliceNode(self, normal):
        """A slice view whose normal is ``normal``: 0.5 mm per pixel."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        matrix = vtk.vtkMatrix4x4()
        z = np.asarray(normal, float) / np.linalg.norm(normal)
        x = np.cross([0.0, 1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0], z)
        x /= np.linalg.norm(x)
        for row, column in enumerate(zip(x, np.cross(z, x), z)):
            for col, value in enumerate(column):
                matrix.SetElement(row, col, float(value))
        node.GetSliceToRAS().DeepCopy(matrix)
        node.SetDimensions(200, 200, 1)
        node.SetFieldOfView(100.0, 100.0, 1.0)
        node.UpdateMatrices()
        return node

    def click(self, ras, shift=False) -> bool:
        return self.controller.pressAt(ras, self.axial, shift=shift)

    def idle(self) -> None:
        assert self.controller.waitUntilIdle(60), self.controller.status

    def preview(self) -> np.ndarray:
        return self.controller.previewMask()

    def segment(self) -> np.ndarray:
        return segment_array(self.segmentation, self.segmentId, self.volume)


@pytest.fixture
def editor(mrml_scene, phantom, tmp_path):
    made = Editor(mrml_scene, phantom[0], tmp_path)
    yield made
    made.controller.close()


def k_of(ras) -> int:
    return int(round(np.linalg.solve(MATRIX[:3, :3], np.asarray(ras) - MATRIX[:3, 3])[2]))


def dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# ------------------------------------------------------------------ clicks
def test_a_click_segments_the_clicked_slice_into_the_preview(editor, phantom):
    _, organ, lesion = phantom
    assert editor.click(ORGAN_AT)
    editor.idle()
    k = k_of(ORGAN_AT)
    preview = editor.preview()
    assert dice(preview[k], organ[k]) > 0.9 and not preview[k][lesion[k]].any()
    assert preview.sum() == preview[k].sum()  # only the clicked slice
    assert editor.controller.positiveNode.GetNumberOfControlPoints() == 1
    assert editor.controller.modelDescription == "classic on cpu"
    # The preview segmentation shows it, in the selected segment's colour.
    shown = segment_array(editor.controller.previewNode, editor.controller.previewSegmentId, editor.volume)
    np.testing.assert_array_equal(shown, preview)
    colour = editor.controller.previewNode.GetSegmentation().GetSegment(editor.controller.previewSegmentId).GetColor()
    np.testing.assert_allclose(colour, (0.9, 0.6, 0.2), atol=1e-6)


def test_a_click_on_an_unencoded_slice_waits_for_the_encoder_then_decodes(mrml_scene, phantom, tmp_path, tiny_sam):
    made = Editor(mrml_scene, phantom[0], tmp_path, ControllerSettings(modelName="sam_tiny", device="cpu"))
    made.logic.store.import_file(tiny_sam, "sam_tiny")
    engine = made.logic.engine("sam_tiny", "cpu")
    gate, encode = threading.Event(), engine.encode
    engine.encode = lambda image: (gate.wait(30), encode(image))[1]  # the encoder thread waits for the test
    try:
        made.click(ORGAN_AT)
        assert made.controller.encoding and made.controller.busy
        assert not made.preview().any()  # nothing decoded before the embedding exists
        made.controller.poll()
        assert made.controller.encoding
        gate.set()
        made.idle()
        k = k_of(ORGAN_AT)
        assert not made.controller.encoding and made.controller.session.is_encoded(_plane(k))
        assert made.preview()[k].any() and made.controller.status == ""
    finally:
        gate.set()
        made.controller.close()


def _plane(k):
    from MedFMLib.imaging.geometry import SlicePlane

    return SlicePlane(2, k)


def test_shift_click_and_negative_mode_add_negative_points(editor, phantom):
    _, organ, _ = phantom
    k = k_of(ORGAN_AT)
    editor.click(ORGAN_AT)
    editor.idle()
    whole = editor.preview()[k].sum()
    inside = ras_of((9.5, 22.2, 15.1))  # inside the organ, near its left edge
    editor.click(inside, shift=True)
    editor.idle()
    assert editor.controller.negativeNode.GetNumberOfControlPoints() == 1
    after = editor.preview()[k]
    assert after.sum() < whole and not after[tuple(np.round(_ij(inside)).astype(int))]
    editor.controller.setMode("negative")
    editor.click(ras_of((18.0, 22.2, 15.1)))
    editor.idle()
    assert editor.controller.negativeNode.GetNumberOfControlPoints() == 2
    assert editor.controller.positiveNode.GetNumberOfControlPoints() == 1


def _ij(ras):
    ijk = np.linalg.solve(MATRIX[:3, :3], np.asarray(ras) - MATRIX[:3, 3])
    return ijk[1], ijk[0]  # (row j, column i) on an axial slice


def test_a_press_near_a_point_is_left_to_the_markups_and_a_drag_decodes_a_few_times_a_second(editor, phantom):
    _, organ, lesion = phantom
    k = k_of(ORGAN_AT)
    editor.click(ORGAN_AT)
    editor.idle()
    assert editor.click(ORGAN_AT + 1.0) is False  # 1 mm from the point: Slicer's markups drag it
    node = editor.controller.positiveNode
    node.SetNthControlPointPositionWorld(0, *LESION_AT)  # the markups move it while the mouse drags
    assert editor.controller.busy
    editor.controller.poll()  # no time has passed: no decode yet
    assert dice(editor.preview()[k], organ[k]) > 0.9
    editor.now += 0.2
    editor.controller.poll()
    assert dice(editor.preview()[k], lesion[k]) > 0.8 and not editor.preview()[k][organ[k]].any()
    assert not editor.controller.busy


def test_a_box_drawn_in_box_mode(editor, phantom):
    _, organ, _ = phantom
    k = k_of(ORGAN_AT)
    assert editor.controller.handleKey("b") and editor.controller.mode == "box"
    assert editor.click(ras_of((5.0, 12.0, 15.1)))
    assert editor.controller.releaseAt(ras_of((24.0, 32.0, 15.1)))
    editor.idle()
    assert editor.controller.roiNode.GetNumberOfControlPoints() == 1
    assert dice(editor.preview()[k], organ[k]) > 0.85
    assert editor.controller.releaseAt(ORGAN_AT) is False  # no box started


def test_a_small_box_and_its_zoom_crop_are_encoded_off_the_gui_thread(mrml_scene, tmp_path, litemedsam_store):
    """LiteMedSAM, a box drawn around breast1's lesion: the slice and the crop that the small-object zoom wants
    around the box are both encoded on the encoder's thread, never on the GUI's, and the preview is the zoomed
    answer (the slice's Dice 0.85 against 0.33 from the whole slice)."""
    from conftest import real_case

    volume, label = real_case("breast1")
    label = label > 0
    made = Editor(mrml_scene, volume, tmp_path, ControllerSettings(modelName="litemedsam", device="cpu"))
    try:
        made.logic.store.import_file(litemedsam_store.path("litemedsam"), "litemedsam")
        engine = made.logic.engine("litemedsam", "cpu")
        threads, encode = [], engine.encode
        engine.encode = lambda image: (threads.append(threading.current_thread().name), encode(image))[1]
        k = int(np.argmax(label.sum(axis=(1, 2))))
        rows, cols = np.nonzero(label[k])
        low, high = (volume.ijk_to_ras_points(np.array([c, r, k], float)) for c, r in
                     ((cols.min(), rows.min()), (cols.max(), rows.max())))  # fmt: skip
        made.controller.handleKey("b")
        made.click(low)
        made.controller.releaseAt(high)
        made.idle()
        crops = [key for key in made.controller.session.cache.keys() if key.crop is not None]
        assert len(crops) == 1 and crops[0].index == k
        assert threads and set(threads) == {"MedFM encoder"}, threads
        assert dice(made.preview()[k], label[k]) >= 0.75
    finally:
        made.controller.close()


def test_a_click_a_box_only_model_cannot_answer_is_said_in_the_status(mrml_scene, phantom, tiny_sam, tmp_path):
    """On a flat image a negative click deep inside the box moves no side, and there is no edge to correct the
    mask by: the mask stays, and the status line says why and what to do."""
    flat = Volume(np.full(phantom[0].array.shape, 100.0), phantom[0].ijk_to_ras)
    editor = Editor(mrml_scene, flat, tmp_path)
    try:
        editor.logic.store.import_file(tiny_sam, "medsam_tiny")
        editor.controller._settings.modelName = "medsam_tiny"
        editor.controller.handleKey("b")
        editor.click(ras_of((5.0, 12.0, 15.1)))
        editor.controller.releaseAt(ras_of((24.0, 32.0, 15.1)))
        editor.idle()
        boxed = editor.preview().copy()
        assert editor.controller.status == "" and boxed.any()
        # The masked voxel nearest the box's middle: no side can move past it without cutting the mask in two.
        rows, cols = np.nonzero(boxed[15])
        nearest = int(np.argmin((rows - 22) ** 2 + (cols - 14.5) ** 2))
        assert (rows[nearest] - 22) ** 2 + (cols[nearest] - 14.5) ** 2 <= 9, "the mask must reach the middle"
        editor.controller.handleKey("n")
        editor.click(ras_of((cols[nearest], rows[nearest], 15.0)))
        editor.idle()
        assert "medsam_tiny reads boxes only" in editor.controller.status
        np.testing.assert_array_equal(editor.preview(), boxed)
    finally:
        editor.controller.close()


# ------------------------------------------------------------------ propagation
def propagated(editor, direction="both"):
    editor.click(ORGAN_AT)
    editor.idle()
    seen = []
    editor.controller.onChanged = lambda: seen.append(editor.controller.progress)
    editor.controller.propagate(direction)
    assert editor.controller.propagating and not editor.controller.canApply
    editor.idle()
    return seen


def test_propagation_reports_progress_and_carries_the_organ_through_the_volume(editor, phantom):
    _, organ, _ = phantom
    seen = propagated(editor)
    assert any(total > 0 for _, total in seen)  # the front end saw the progress move
    assert not editor.controller.propagating and "slices" in editor.controller.status
    preview = editor.preview()
    assert dice(preview, organ) > 0.85, dice(preview, organ)
    editor.controller.undo()  # the whole propagation is one undo step
    assert editor.preview().sum() == editor.preview()[k_of(ORGAN_AT)].sum()


def test_up_is_towards_superior_whatever_the_slice_order(editor):
    editor.click(ORGAN_AT)
    editor.idle()
    editor.controller.propagate("up")
    editor.idle()
    written = np.flatnonzero(editor.preview().any(axis=(1, 2)))
    k = k_of(ORGAN_AT)
    assert written.min() == k and written.max() > k  # this volume's k grows towards S


def test_a_stopped_propagation_keeps_the_slices_done(editor, phantom):
    editor.click(ORGAN_AT)
    editor.idle()
    session = editor.controller.session
    engine, decode = session.engine, session.engine.decode
    started = threading.Event()
    gate = threading.Event()

    calls = []

    def slow_decode(*args, **kwargs):  # the third slice waits until the user has pressed Stop
        calls.append(1)
        if len(calls) == 3:
            started.set()
            gate.wait(30)
        return decode(*args, **kwargs)

    engine.decode = slow_decode
    try:
        editor.controller.propagate("both")
        assert started.wait(30)
        editor.controller.cancelPropagation()
        gate.set()
        editor.idle()
    finally:
        engine.decode = decode
    written = np.flatnonzero(editor.preview().any(axis=(1, 2)))
    assert 3 <= len(written) <= 4, written  # the clicked slice, the two done, perhaps the one in hand
    assert "stopped" in editor.controller.status.lower() or "slices" in editor.controller.status


def test_a_failed_propagation_says_why_and_changes_nothing(editor):
    editor.click(ORGAN_AT)
    editor.idle()
    before = editor.preview().copy()
    engine = editor.controller.session.engine
    engine.decode = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("the model broke"))
    editor.controller.propagate("both")
    editor.idle()
    assert editor.controller.status == "Propagation failed: the model broke"
    np.testing.assert_array_equal(editor.preview(), before)


def test_a_correction_on_a_propagated_slice_propagates_again_from_there(editor, phantom):
    _, organ, _ = phantom
    propagated(editor)
    k = k_of(ORGAN_AT) + 4
    editor.controller.onChanged = lambda: None
    corrections = []
    start = editor.controller._startPropagation
    editor.controller._startPropagation = lambda work: (corrections.append(1), start(work))
    editor.click(ras_of((14.3, 22.2, k)))
    assert corrections, "a click on a propagated slice starts a re-propagation"
    editor.idle()
    assert dice(editor.preview(), organ) > 0.85


# ------------------------------------------------------------------ history, apply, cancel
def test_undo_and_redo_move_the_markups_and_the_preview(editor):
    editor.click(ORGAN_AT)
    editor.idle()
    first = editor.preview().copy()
    editor.click(LESION_AT)
    editor.idle()
    assert editor.controller.canUndo and editor.preview().sum() > first.sum()
    editor.controller.handleKey("z")
    np.testing.assert_array_equal(editor.preview(), first)
    assert editor.controller.positiveNode.GetNumberOfControlPoints() == 1 and editor.controller.canRedo
    editor.controller.handleKey("y")
    assert editor.controller.positiveNode.GetNumberOfControlPoints() == 2
    editor.controller.clear()
    assert not editor.preview().any() and editor.controller.positiveNode.GetNumberOfControlPoints() == 0


def test_apply_writes_through_the_editors_masking_and_cancel_leaves_the_segment_alone(editor, phantom):
    _, organ, _ = phantom
    assert not editor.controller.apply() and "Nothing to apply" in editor.controller.status
    # Another segment holds the organ's left part, and only voxels outside all segments may change.
    other = np.zeros_like(organ)
    other[:, :, :14] = True
    from MedFMLib.mrml.bridge import write_segment

    write_segment(other, editor.volume, editor.segmentation, ensure_segment(editor.segmentation, "other"))
    editor.editorNode.SetSelectedSegmentID(editor.segmentId)
    editor.editorNode.SetMaskMode(editor.segmentation.EditAllowedOutsideAllSegments)
    editor.click(ORGAN_AT)
    editor.idle()
    preview = editor.preview().copy()
    assert (preview & other).any()  # the masking has something to hold back
    assert editor.controller.handleKey("Return")
    assert editor.undoStates == 1 and editor.controller.status == "Applied."
    np.testing.assert_array_equal(editor.segment(), preview & ~other)
    assert editor.controller.positiveNode.GetNumberOfControlPoints() == 0  # ready for the next object
    written = editor.segment().copy()
    editor.click(LESION_AT)
    editor.idle()
    assert editor.preview().any()
    editor.controller.cancel()
    np.testing.assert_array_equal(editor.segment(), written)
    assert not editor.preview().any() and editor.undoStates == 1


# ------------------------------------------------------------------ sessions
def test_changing_the_model_mid_session_replays_the_prompts(editor, tiny_sam):
    editor.click(ORGAN_AT)
    editor.idle()
    classic = editor.controller.session
    editor.logic.store.import_file(tiny_sam, "sam_tiny")
    editor.controller._settings.modelName = "sam_tiny"
    editor.controller.requestSync()
    editor.idle()
    assert editor.controller.session is not classic and editor.controller.modelDescription.startswith("sam_tiny")
    assert len(editor.controller.session.prompts(editor.controller.objectId)) == 1
    assert editor.preview()[k_of(ORGAN_AT)].any()


def test_a_model_not_downloaded_is_one_line_and_the_click_is_dropped(editor):
    editor.controller._settings.modelName = "sam_vit_b"
    editor.click(ORGAN_AT)
    assert "sam_vit_b is not downloaded yet" in editor.controller.status
    assert editor.controller.session is None and editor.controller.positiveNode.GetNumberOfControlPoints() == 0


def test_a_remote_session_gives_the_local_masks(editor, start_server):
    editor.click(ORGAN_AT)
    editor.idle()
    local = editor.preview().copy()
    editor.controller.clear()
    server = start_server(["--models", "classic"])
    editor.logic.configureServer(server.url, SERVER_TOKEN)
    editor.click(ORGAN_AT)
    editor.idle()
    assert editor.controller.modelDescription.endswith(f"at {server.url}")
    np.testing.assert_array_equal(editor.preview(), local)
    editor.controller.close()  # closes the server's session too
    assert editor.controller.session is None


def test_out_of_memory_while_encoding_offers_the_cpu_and_keeps_the_click(editor, tiny_sam):
    import torch

    editor.logic.store.import_file(tiny_sam, "sam_tiny")
    editor.controller._settings.modelName, editor.controller._settings.device = "sam_tiny", "auto"
    engine = editor.logic.engine("sam_tiny", "auto")

    def out_of_memory(image):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.encode = out_of_memory
    editor.answer = False
    editor.click(ORGAN_AT)
    editor.idle()
    assert editor.questions and "ran out of memory" in editor.questions[0]
    assert editor.controller.status.startswith("Encoding failed: CUDA out of memory")
    editor.answer = True
    editor.controller.requestSync()
    editor.idle()
    assert editor.fallbacks == ["cpu"] and editor.controller.settings.device == "cpu"
    assert editor.preview()[k_of(ORGAN_AT)].any() and editor.controller.session.engine.device == "cpu"
