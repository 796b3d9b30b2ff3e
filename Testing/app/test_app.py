"""`medfm app`, headless, with real Qt mouse and key events on Slicer's own slice views (slicer-core).

The window is the real one; clicks go where the RAS point is drawn in the view, as a user's would, and
results are read back from the files the app saves (slicerio) and from the pixels it shows. Headless: Qt's
offscreen platform, VTK drawing through OSMesa (Debian's libosmesa6, which `make test` installs as root).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import slicerio

from conftest import run_medfm, sphere_volume
from MedFMLib.imaging.io import read_volume, write_volume

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before the QApplication exists
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
os.environ.setdefault("QT_LOGGING_RULES", "qt.qpa.*=false")

def _headless_qt_problem() -> str | None:
    """Why a headless Qt window with VTK cannot open here (a missing system library), or None."""
    if ctypes.util.find_library("OSMesa") is None:
        return "the OSMesa library is missing (Debian: apt install libosmesa6)"
    probe = "from Qt import QtWidgets; QtWidgets.QApplication([])"
    environment = {**os.environ, "QT_LOGGING_RULES": ""}  # let Qt name the library it misses
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=environment)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "setParent" not in line]
        return f"Qt's offscreen platform does not start: {lines[0] if lines else result.returncode}"
    return None


_PROBLEM = _headless_qt_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"the app's headless tests need a platform: {_PROBLEM}")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def phantom(tmp_path):
    volume, truth, centre = sphere_volume("oblique_anisotropic")
    path = tmp_path / "sphere.nrrd"
    write_volume(path, volume)
    return path, volume, truth, centre


@pytest.fixture
def window(qapp, home, phantom):
    from MedFMLib.app.window import MedFMWindow

    made = MedFMWindow(interactive=False)
    made.show()
    qapp.processEvents()
    assert made.openVolume(phantom[0])
    yield made
    made.unsaved = False
    made.controller.cancel()
    made.shutdown()
    made.close()


def replay(window, *actions):
    from MedFMLib.app.replay import Replayer

    Replayer(window, timeoutSeconds=120).run([*actions, {"action": "wait"}])


def saved_segments(window, path) -> dict:
    """name -> (K, J, I) mask, read back from the saved .seg.nrrd with slicerio."""
    from MedFMLib.app.files import read_segments

    assert window.save(path), window.lastMessage
    assert slicerio.read_segmentation(str(path))["segments"]  # Slicer's own reader opens it
    return {segment.name: segment.mask for segment in read_segments(path, window.volume)}


def ijk(volume, ras) -> np.ndarray:
    return np.linalg.solve(volume.ijk_to_ras[:3, :3], np.asarray(ras) - volume.ijk_to_ras[:3, 3])


AXIS_OF_VIEW = {"axial": 2, "coronal": 1, "sagittal": 0}  # this phantom's IJK axis nearest each view's normal


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_a_click_at_the_centre_in_each_view_saves_exactly_that_cross_section(window, phantom, tmp_path, view):
    _, volume, truth, centre = phantom
    replay(window, {"action": "click", "view": view, "ras": list(centre)}, {"action": "key", "key": "Return"})
    assert window.lastMessage == "Applied."
    saved = saved_segments(window, tmp_path / "out.seg.nrrd")["Segment_1"]
    axis = AXIS_OF_VIEW[view]
    index = int(round(ijk(volume, centre)[axis]))
    selector = [slice(None)] * 3
    selector[2 - axis] = index
    expected = np.zeros_like(truth)
    expected[tuple(selector)] = truth[tuple(selector)]
    np.testing.assert_array_equal(saved, expected)


def test_shift_click_is_negative_and_undo_takes_it_back(window, phantom):
    _, volume, truth, centre = phantom
    replay(window, {"action": "click", "ras": list(centre)})
    whole = window.controller.previewMask().copy()
    edge = volume.ijk_to_ras[:3, :3] @ (ijk(volume, centre) + [5.0, 0.0, 0.0]) + volume.ijk_to_ras[:3, 3]
    replay(window, {"action": "click", "ras": list(edge), "negative": True})
    assert window.controller.negativeNode.GetNumberOfControlPoints() == 1
    assert window.controller.previewMask().sum() < whole.sum()
    replay(window, {"action": "key", "key": "z"})
    np.testing.assert_array_equal(window.controller.previewMask(), whole)
    assert window.controller.negativeNode.GetNumberOfControlPoints() == 0


def test_a_drag_moves_a_point_with_slicers_markups(window, phantom):
    _, volume, truth, centre = phantom
    replay(window, {"action": "click", "ras": list(centre)})
    target = volume.ijk_to_ras[:3, :3] @ (ijk(volume, centre) + [3.0, 2.0, 0.0]) + volume.ijk_to_ras[:3, 3]
    replay(window, {"action": "drag", "view": "axial", "from": list(centre), "to": list(target)})
    moved = [0.0, 0.0, 0.0]
    window.controller.positiveNode.GetNthControlPointPositionWorld(0, moved)
    assert window.controller.positiveNode.GetNumberOfControlPoints() == 1  # moved, not a second point
    assert np.linalg.norm(np.subtract(moved, target)[:2]) < 1.5, (moved, target)
    assert window.controller.previewMask().any()


def test_a_box_then_propagation_with_progress_and_stop(window, phantom):
    _, volume, truth, centre = phantom
    low, high = centre - [11.0, 11.0, 0.0], centre + [11.0, 11.0, 0.0]  # drawn in the axial view's plane
    replay(window, {"action": "box", "view": "axial", "from": list(low), "to": list(high)})
    assert window.controller.roiNode.GetNumberOfControlPoints() == 1
    k = int(round(ijk(volume, centre)[2]))
    assert window.controller.previewMask()[k].sum() > 0.8 * truth[k].sum()
    window.buttons["propagate-both"].trigger()
    assert window.controller.propagating and window.progress.isVisibleTo(window)
    window.buttons["stop"].trigger()
    replay(window)
    assert not window.controller.propagating and not window.progress.isVisibleTo(window)
    assert "slices" in window.lastMessage or "stopped" in window.lastMessage.lower()
    window.buttons["propagate-both"].trigger()
    replay(window)
    preview = window.controller.previewMask()
    assert 2 * (preview & truth).sum() / (preview.sum() + truth.sum()) > 0.85


def test_apply_save_and_reopen_to_refine(window, phantom, tmp_path, qapp):
    from MedFMLib.app.window import MedFMWindow

    path, volume, truth, centre = phantom
    replay(window, {"action": "click", "ras": list(centre)}, {"action": "key", "key": "Return"})
    saved = saved_segments(window, tmp_path / "work.seg.nrrd")
    labelmap = tmp_path / "work.nii.gz"
    assert window.save(labelmap)
    np.testing.assert_array_equal(read_volume(labelmap).array > 0, saved["Segment_1"])
    second = MedFMWindow(interactive=False)
    try:
        assert second.openVolume(path) and second.openSegmentation(tmp_path / "work.seg.nrrd")
        from MedFMLib.mrml.bridge import segment_array

        names = [second.segmentsPanel.list.item(i).text() for i in range(second.segmentsPanel.list.count())]
        assert "Segment_1" in names
        segment_id = second.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Segment_1")
        np.testing.assert_array_equal(segment_array(second.segmentationNode, segment_id, volume), saved["Segment_1"])
    finally:
        second.shutdown()
        second.close()


def test_bad_files_get_one_line_and_nothing_open_is_lost(window, phantom, tmp_path):
    import SimpleITK as sitk

    replay(window, {"action": "click", "ras": list(phantom[3])})
    preview = window.controller.previewMask().copy()
    junk = tmp_path / "notes.nrrd"
    junk.write_text("not an image")
    assert not window.openVolume(junk) and "Cannot read notes.nrrd" in window.lastMessage
    rgb = tmp_path / "photo.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(rgb))
    assert not window.openVolume(rgb) and "values per voxel" in window.lastMessage
    other, _, _ = sphere_volume("ras_aligned")
    write_volume(tmp_path / "other_label.nrrd", other)
    assert not window.openSegmentation(tmp_path / "other_label.nrrd") and "does not match" in window.lastMessage
    assert window.volume.name == "sphere.nrrd"
    np.testing.assert_array_equal(window.controller.previewMask(), preview)  # the work in progress is still there
    assert not window.openVolume(phantom[0]) and "unsaved work" in window.lastMessage  # never dropped unasked


def test_a_model_change_goes_to_the_new_model(window, phantom, tiny_sam):
    window.logic.store.import_file(tiny_sam, "sam_tiny")
    window.modelPanel.fillModels(window.logic.modelNames(), "sam_tiny")
    window.modelPanel.device.setCurrentText("cpu")
    replay(window, {"action": "click", "ras": list(phantom[3])})
    assert window.controller.modelDescription.startswith("sam_tiny on cpu")
    assert window.settings.value("modelName") == "sam_tiny"  # settings persist


def test_the_zoom_checkbox_reaches_the_engine_and_persists(window, phantom, litemedsam_store):
    """*Zoom on small objects* (on by default) turns LiteMedSAM's small-object zoom off and on again for the
    engines made after it; the choice is kept in the settings."""
    window.logic.store.import_file(litemedsam_store.path("litemedsam"), "litemedsam")
    assert window.modelPanel.zoom.isChecked()
    window.modelPanel.zoom.setChecked(False)
    replay(window, {"action": "click", "ras": list(phantom[3])})  # the next click's session has it
    assert window.settings.value("zoom") == "false" and window.logic.zoom is False
    assert window.controller.sessionKey[-1] is False
    assert window.logic.engine("litemedsam", "cpu").zooms_on_small_objects is False
    window.modelPanel.zoom.setChecked(True)
    replay(window, {"action": "click", "ras": list(phantom[3])})
    assert window.logic.engine("litemedsam", "cpu").zooms_on_small_objects is True


def test_the_screenshot_shows_the_segment_where_it_was_clicked(window, phantom, tmp_path):
    from Qt import QtGui

    _, volume, truth, centre = phantom
    replay(window, {"action": "click", "ras": list(centre)}, {"action": "key", "key": "Return"},
           {"action": "screenshot", "path": str(tmp_path / "shot.png")})  # fmt: skip
    image = QtGui.QImage(str(tmp_path / "shot.png"))
    view = window.views["axial"]
    x, y = view.rasToWidget(centre)
    origin = view.widget.mapTo(window, view.widget.rect().topLeft())
    inside = QtGui.QColor(image.pixel(origin.x() + x, origin.y() + y))
    corner = QtGui.QColor(image.pixel(origin.x() + 3, origin.y() + 3))
    red, green, blue = inside.red(), inside.green(), inside.blue()
    assert green > red + 10 and green > blue + 10, (red, green, blue)  # Segment_1's green over the white sphere
    assert corner.red() == corner.green() == corner.blue() < 40  # dark background, no segment


def test_closing_and_reopening_the_window(qapp, home, phantom):
    from MedFMLib.app.window import MedFMWindow

    for _ in range(2):
        window = MedFMWindow(interactive=False)
        window.show()
        assert window.openVolume(phantom[0])
        qapp.processEvents()
        window.close()
        qapp.processEvents()
        assert window.views["axial"]._closed


def test_medfm_app_replays_a_script_and_saves(phantom, tmp_path, home):
    path, volume, truth, centre = phantom
    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([{"action": "click", "view": "axial", "ras": list(centre)},
                                   {"action": "key", "key": "Return"}]))  # fmt: skip
    out, shot = tmp_path / "out.seg.nrrd", tmp_path / "shot.png"
    result = run_medfm("app", path, "--replay", actions, "--save", out, "--screenshot", shot, "--exit",
                       env={"MEDFM_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert shot.stat().st_size > 10_000
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["Segment_1"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"action": "dance"}]')
    result = run_medfm("app", path, "--replay", bad, "--exit", env={"MEDFM_HOME": str(home)})
    assert result.returncode == 1 and "'action' must be one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_segment_list_adds_renames_hides_and_deletes(window, phantom):
    from Qt import QtCore

    panel = window.segmentsPanel
    segmentation = window.segmentationNode.GetSegmentation()
    second = panel.addSegment()
    assert segmentation.GetNumberOfSegments() == 2 and window.editorNode.GetSelectedSegmentID() == second
    item = panel.list.item(1)
    item.setText("tumour")  # what a double-click edit does
    assert segmentation.GetSegment(second).GetName() == "tumour"
    item.setCheckState(QtCore.Qt.Unchecked)
    assert not window.segmentationNode.GetDisplayNode().GetSegmentVisibility(second)
    replay(window, {"action": "click", "ras": list(phantom[3])}, {"action": "key", "key": "Return"})
    assert window.unsaved and "*" in window.windowTitle()
    panel.list.setCurrentRow(1)
    panel.deleteSegment()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetSegment(second) is None


def test_the_app_segments_on_a_server(start_server, phantom, window):
    """Connecting changes the panel's size: the views must keep their slice (a refit once moved it under the click)."""
    from conftest import SERVER_TOKEN

    server = start_server(["--models", "classic"])  # started first, so the window closes its session before it stops
    window.connectServer(server.url, SERVER_TOKEN)
    assert window.lastMessage == f"Models run on {server.url}."
    assert window.modelPanel.licence.text() == "slice · runs on the server"
    replay(window, {"action": "click", "ras": list(phantom[3])})
    assert window.controller.modelDescription == f"classic on cpu at {server.url}"
    point = [0.0, 0.0, 0.0]
    window.controller.positiveNode.GetNthControlPointPositionWorld(0, point)
    np.testing.assert_allclose(point, phantom[3], atol=0.5)  # where the click was
    k = int(round(ijk(phantom[1], phantom[3])[2]))
    mask = window.controller.previewMask()
    assert mask[k].sum() == phantom[2][k].sum() == mask.sum(), (mask.sum(axis=(1, 2)).nonzero(), k)
    window.connectServer("http://127.0.0.1:9", SERVER_TOKEN)  # nothing listens there: one line, still usable
    assert "127.0.0.1:9" in window.lastMessage


def _send_mouse(widget, kind, x, y, buttons, button=None):
    from Qt import QtCore, QtGui, QtWidgets

    point = QtCore.QPointF(x, y)
    button = button if button is not None else (QtCore.Qt.NoButton if kind == QtCore.QEvent.MouseMove else
                                                QtCore.Qt.LeftButton)  # fmt: skip
    event = QtGui.QMouseEvent(kind, point, widget.mapToGlobal(point), button, buttons, QtCore.Qt.NoModifier)
    QtWidgets.QApplication.sendEvent(widget, event)
    QtWidgets.QApplication.processEvents()


def test_navigation_wheel_through_slices_and_window_level_by_drag(window, phantom):
    from Qt import QtCore, QtGui, QtWidgets

    view = window.views["axial"]
    widget = view.widget
    before = view.sliceNode.GetSliceOffset()
    centre = QtCore.QPointF(widget.width() / 2, widget.height() / 2)
    _send_mouse(widget, QtCore.QEvent.MouseMove, centre.x(), centre.y(), QtCore.Qt.NoButton)
    wheel = QtGui.QWheelEvent(centre, widget.mapToGlobal(centre), QtCore.QPoint(0, 0), QtCore.QPoint(0, 120),
                              QtCore.Qt.NoButton, QtCore.Qt.NoModifier, QtCore.Qt.NoScrollPhase, False)  # fmt: skip
    QtWidgets.QApplication.sendEvent(widget, wheel)
    QtWidgets.QApplication.processEvents()
    assert view.sliceNode.GetSliceOffset() != before  # Slicer's interactor style moved the slice
    display = window.volumeNode.GetDisplayNode()
    window_before = display.GetWindow()
    window.setMode("navigate")
    x, y = centre.x(), centre.y()
    _send_mouse(widget, QtCore.QEvent.MouseButtonPress, x, y, QtCore.Qt.LeftButton)
    for step in range(1, 6):
        _send_mouse(widget, QtCore.QEvent.MouseMove, x + 12 * step, y, QtCore.Qt.LeftButton)
    _send_mouse(widget, QtCore.QEvent.MouseButtonRelease, x + 60, y, QtCore.Qt.NoButton)
    assert display.GetWindow() != window_before  # window/level by drag
    assert window.controller.positiveNode.GetNumberOfControlPoints() == 0  # navigating adds no prompt
    window.setWindowPreset("brain")
    assert (display.GetWindow(), display.GetLevel()) == (80.0, 40.0)


def test_a_dropped_file_opens_and_a_checkpoint_is_imported(window, phantom, tmp_path, tiny_sam):
    from Qt import QtCore, QtGui, QtWidgets

    from MedFMLib.imaging.io import SegmentData, write_segmentation

    _, volume, truth, _ = phantom
    write_segmentation(tmp_path / "prior.seg.nrrd", [SegmentData("prior", truth)], volume)
    data = QtCore.QMimeData()
    data.setUrls([QtCore.QUrl.fromLocalFile(str(tmp_path / "prior.seg.nrrd"))])
    enter = QtGui.QDragEnterEvent(QtCore.QPoint(50, 50), QtCore.Qt.CopyAction, data, QtCore.Qt.LeftButton,
                                  QtCore.Qt.NoModifier)  # fmt: skip
    assert QtWidgets.QApplication.sendEvent(window, enter) and enter.isAccepted()
    drop = QtGui.QDropEvent(QtCore.QPointF(50, 50), QtCore.Qt.CopyAction, data, QtCore.Qt.LeftButton,
                            QtCore.Qt.NoModifier)  # fmt: skip
    QtWidgets.QApplication.sendEvent(window, drop)
    assert window.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("prior")
    window.modelPanel.fillModels(window.logic.modelNames(), "sam_tiny")
    assert "not downloaded" in window.modelPanel.licence.text() and window.modelPanel.download.isEnabled()
    window.importModel(str(tiny_sam), "sam_tiny")
    assert "ready" in window.modelPanel.licence.text() and not window.modelPanel.download.isEnabled()


def test_download_with_progress_from_a_local_http_server(window, tmp_path, tiny_sam, monkeypatch):
    """The model chooser's Download, against a real HTTP server on 127.0.0.1 serving the official-format file."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    payload = tiny_sam.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        catalog = json.loads(tiny_sam.with_name("catalog.json").read_text())
        entry = next(e for e in catalog["models"] if e["name"] == "sam_tiny")
        entry["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/sam_tiny.pth"
        entry["sha256"] = hashlib.sha256(payload).hexdigest()
        path = tmp_path / "catalog.json"
        path.write_text(json.dumps(catalog))
        monkeypatch.setenv("MEDFM_CATALOG", str(path))
        window.modelPanel.fillModels(window.logic.modelNames(), "sam_tiny")
        assert "not downloaded" in window.modelPanel.licence.text()
        assert window.downloadModel("sam_tiny")
        assert "ready" in window.modelPanel.licence.text() and window.logic.isModelReady("sam_tiny")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_3d_model_in_the_window_scribble_and_lasso_by_mouse_and_classes_offered(qapp, phantom, tmp_path,
                                                                                  tiny_volume_models):  # fmt: skip
    from MedFMLib.app.window import MedFMWindow

    made = MedFMWindow(interactive=False)
    made.show()
    try:
        assert made.openVolume(phantom[0])
        _, volume, _, centre = phantom
        made.modelPanel.fillModels(made.logic.modelNames(), "nninteractive_tiny")
        made.modelPanel.device.setCurrentText("cpu")
        assert made.modelPanel.licence.text().startswith("3D · CC-BY-NC-SA-4.0 licence · NON-COMMERCIAL")
        assert not made.modelPanel.classRow.isVisibleTo(made)  # nnInteractive takes no class prompts
        step = volume.ijk_to_ras[:3, :3] @ np.array([1.0, 0.0, 0.0])
        down = volume.ijk_to_ras[:3, :3] @ np.array([0.0, 1.0, 0.0])
        stroke = [list(centre + n * 1.5 * step) for n in range(-3, 4)]
        lasso = [list(centre + a * step + b * down) for a, b in ((-6, -6), (6, -6), (6, 6), (-6, 6))]
        replay(made, {"action": "scribble", "points": stroke}, {"action": "wait"},
               {"action": "lasso", "points": lasso, "negative": True}, {"action": "wait"})  # fmt: skip
        prompts = made.controller.session.volume_prompts(made.controller.objectId)
        assert [(p.kind, p.positive) for p in prompts] == [("scribble", True), ("lasso", False)]
        assert len(prompts[0].ras) >= 5 and made.controller.mode == "positive"  # back to the mode it was in
        assert not made.buttons["propagate-both"].isEnabled()
        assert "3D already" in made.buttons["propagate-both"].toolTip()
        made.modelPanel.fillModels(made.logic.modelNames(), "vista3d_tiny")
        made.refresh()
        assert made.modelPanel.classRow.isVisibleTo(made) and made.modelPanel.classChooser.count() == 127
        replay(made, {"action": "class", "name": "liver"})
        assert made.controller.session.volume_prompts(made.controller.objectId)[0].class_name == "liver"
        assert made.lastMessage.startswith("liver: ")
    finally:
        made.unsaved = False
        made.controller.cancel()
        made.shutdown()
        made.close()
