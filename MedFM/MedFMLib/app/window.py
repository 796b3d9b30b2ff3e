"""The app's main window: three Slicer slice views, the tools, the panels, files and settings.

A skin over the interaction controller, which the Segment Editor effect shares: the window forwards mouse
presses, keys and buttons to it, polls it from a timer and shows its state. Questions are asked in dialogs
when the window is interactive and answered "no" in scripted runs (``--replay``), which never block.
"""

from __future__ import annotations

import os
from pathlib import Path

from Qt import QtCore, QtGui, QtWidgets

from ..errors import MedFMError
from ..mrml.controller import KEY_ACTIONS, MODES, ControllerSettings, InteractionController
from .panels import ModelPanel, SegmentsPanel
from .scene import create_app_scene
from .views import VIEWS, SliceView

POLL_MILLISECONDS = 50
#: the buttons, by the names scripted runs use: (label, controller command, its arguments, tooltip)
BUTTONS = {
    "propagate-down": ("Down", "propagate", ("down",), "Carry the segmentation towards lower slice positions"),
    "propagate-both": ("Both", "propagate", ("both",), "Carry the segmentation up and down until the object ends"),
    "propagate-up": ("Up", "propagate", ("up",), "Carry the segmentation towards higher slice positions"),
    "propagate-box": ("Within box", "propagateWithinBox", (), "Segment every slice the box spans"),
    "stop": ("Stop", "cancelPropagation", (), "Stop propagating; the slices done so far stay (undo removes them)"),
    "undo": ("Undo", "undo", (), "Undo the last prompt or propagation (Z)"),
    "redo": ("Redo", "redo", (), "Redo (Y)"),
    "clear": ("Clear", "clear", (), "Remove every prompt of the object"),
    "apply": ("Apply", "apply", (), "Write the preview into the selected segment (Enter)"),
    "cancel": ("Cancel", "cancel", (), "Drop the preview and prompts; the segment stays as it was"),
}
MODE_LABELS = {"positive": "+ Point (P)", "negative": "− Point (N, Shift+click)", "box": "Box (B)",
               "scribble": "Scribble (S, Shift: background)", "lasso": "Lasso (L, Shift: background)",
               "navigate": "Navigate (window/level by drag)"}  # fmt: skip


def app_settings() -> QtCore.QSettings:
    """The app's settings, in MedFM's home folder (``MEDFM_HOME``) so that tests and users stay apart."""
    from ..home import default_home

    return QtCore.QSettings(str(Path(default_home()) / "app.ini"), QtCore.QSettings.IniFormat)


def _load_torch_before_opengl() -> None:
    """Import torch and triton (when installed) before VTK opens an OpenGL window.

    Mesa's software renderer and torch's triton each bring their own LLVM; triton loaded after Mesa crashed
    the process (a segmentation fault on `import torch`, as soon as a SAM-family model was chosen).
    """
    import importlib
    import importlib.util

    for name in ("torch", "triton"):  # triton's native library is what clashed; torch loads it late
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


class MedFMWindow(QtWidgets.QMainWindow):
    def __init__(self, interactive: bool = True, logic=None) -> None:
        super().__init__()
        from ..mrml.logic import SegmentationLogic

        _load_torch_before_opengl()
        self.setWindowTitle("MedFM")
        self.setObjectName("MedFMWindow")
        self.setAcceptDrops(True)
        self.interactive = interactive
        self.settings = app_settings()
        self.logic = logic if logic is not None else SegmentationLogic()
        self.appScene = create_app_scene()
        self.scene = self.appScene.scene
        self.volume = self.volumeNode = None
        self.segmentationNode = None
        self.unsaved = False
        self.lastMessage = ""
        self.editorNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedFM editor")
        self.controller = InteractionController(
            self.logic, self.editorNode, settings=self.controllerSettings, ask=self.askYesNo,
            prepareModel=self.prepareModel, saveUndoState=self.documentChanged,
        )  # fmt: skip
        self.navigating = False
        self._buildViews()
        self._buildTools()
        self._buildPanels()
        self.progress = QtWidgets.QProgressBar(objectName="progressBar", visible=False)
        self.statusBar().addPermanentWidget(self.progress)
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(POLL_MILLISECONDS)
        self.timer.timeout.connect(lambda: self.command("poll"))
        self.timer.start()
        self.applyRuntimeSettings()
        # A click in a view reaches the controller without a command: the choices apply as soon as they change.
        self.modelPanel.runtime.currentTextChanged.connect(lambda _: self.applyRuntimeSettings())
        for box in (self.modelPanel.fast, self.modelPanel.zoom):
            box.toggled.connect(lambda _: self.applyRuntimeSettings())
        self.modelPanel.fillModels(self.logic.modelNames(), str(self.settings.value("modelName", "classic")))
        self.resize(1200, 760)
        self.refresh()

    # ------------------------------------------------------------------ building
    def _buildViews(self) -> None:
        self.views = {name: SliceView(self.appScene, name) for name in VIEWS}
        self.viewArea = QtWidgets.QWidget(objectName="viewArea")
        layout = QtWidgets.QHBoxLayout(self.viewArea)
        layout.setContentsMargins(0, 0, 0, 0)
        for view in self.views.values():
            view.onPress = self._onPress
            view.onRelease = self._onRelease
            view.onMove = lambda ras: self.controller.moveAt(ras)
            view.onKey = self._onKey
            layout.addWidget(view.widget)
        self.setCentralWidget(self.viewArea)

    def _buildTools(self) -> None:
        tools = self.addToolBar("Tools")
        tools.setObjectName("tools")
        tools.addAction("Open…", self.openVolumeDialog).setObjectName("open")
        tools.addAction("Open DICOM…", self.openDicomDialog).setObjectName("open-dicom")
        tools.addAction("Open segmentation…", self.openSegmentationDialog).setObjectName("open-segmentation")
        tools.addAction("Save…", self.saveDialog).setObjectName("save")
        tools.addSeparator()
        self.modeActions = {}
        group = QtGui.QActionGroup(self)
        for mode, label in MODE_LABELS.items():
            action = tools.addAction(label, lambda mode=mode: self.setMode(mode))
            action.setObjectName(f"mode-{mode}")
            action.setCheckable(True)
            group.addAction(action)
            self.modeActions[mode] = action
        self.modeActions["positive"].setChecked(True)
        tools.addSeparator()
        self.buttons = {}
        for name, (label, command, args, tip) in BUTTONS.items():
            action = tools.addAction(label, lambda command=command, args=args: self.command(command, *args))
            action.setObjectName(name)
            action.setToolTip(tip)
            self.buttons[name] = action
        tools.addSeparator()
        self.layoutAction = tools.addAction("One view", self.toggleLayout)
        self.layoutAction.setObjectName("layout")
        self.layoutAction.setCheckable(True)

    def _buildPanels(self) -> None:
        dock = QtWidgets.QDockWidget("MedFM", self)
        dock.setObjectName("panels")
        body = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(body)
        self.modelPanel = ModelPanel(self, self.settings)
        self.segmentsPanel = SegmentsPanel(self)
        self.keepConnected = QtWidgets.QCheckBox("Keep parts touching prompts", objectName="keepConnected")
        self.fillHoles = QtWidgets.QCheckBox("Fill holes", objectName="fillHoles")
        self.windowPreset = QtWidgets.QComboBox(objectName="windowPreset")
        from ..imaging.intensity import CT_PRESETS

        self.windowPreset.addItems(["(window/level)", *CT_PRESETS])
        self.windowPreset.currentTextChanged.connect(self.setWindowPreset)
        for widget in (self.modelPanel, self.segmentsPanel, self.keepConnected, self.fillHoles, self.windowPreset):
            layout.addWidget(widget)
        layout.addStretch(1)
        dock.setWidget(body)
        self.addDockWidget(QtCore.Qt.RightDockWidgetArea, dock)

    # ------------------------------------------------------------------ controller glue
    def controllerSettings(self) -> ControllerSettings:
        return ControllerSettings(
            modelName=self.modelPanel.model.currentText() or "classic",
            device=self.modelPanel.device.currentText(),
            intensity=self.modelPanel.intensity.currentText(),
            keepConnected=self.keepConnected.isChecked(),
            fillHoles=self.fillHoles.isChecked(),
        )

    def applyRuntimeSettings(self) -> None:
        self.logic.runtime = self.modelPanel.runtime.currentText()
        self.logic.fast = self.modelPanel.fast.isChecked()
        self.logic.zoom = self.modelPanel.zoom.isChecked()

    def command(self, name: str, *args) -> None:
        """Run a controller command (a button, a key, the timer), then show the new state."""
        if name != "poll":
            self.applyRuntimeSettings()
        if name != "poll" and self.volumeNode is None:
            self.showMessage("Open a volume first (File dialog, drag and drop, or `medfm app VOLUME`).")
            return
        getattr(self.controller, name)(*args)
        self.refresh()

    def refresh(self) -> None:
        controller = self.controller
        if controller.status != self.lastMessage and controller.status:
            self.showMessage(controller.status, dialog=False)
        busy = controller.encoding or controller.propagating
        self.progress.setVisible(busy)
        done, total = controller.progress
        self.progress.setRange(0, total if controller.propagating else 0)
        self.progress.setValue(done)
        self.progress.setFormat("Propagating: %v of %m slices" if controller.propagating else "Encoding slice…")
        self.buttons["undo"].setEnabled(controller.canUndo)
        self.buttons["redo"].setEnabled(controller.canRedo)
        self.buttons["apply"].setEnabled(controller.canApply)
        self.buttons["stop"].setEnabled(controller.propagating)
        for name in ("propagate-down", "propagate-both", "propagate-up", "propagate-box"):
            self.buttons[name].setEnabled(controller.canPropagate)
            self.buttons[name].setToolTip(BUTTONS[name][3] if not controller.volumetric else
                                          "The model answers in 3D already: nothing to propagate")  # fmt: skip
        self.modelPanel.showTools(controller)
        self.setWindowTitle(f"MedFM — {self.volume.name if self.volume else 'no volume'}{' *' if self.unsaved else ''}")

    def setMode(self, mode: str) -> None:
        self.navigating = mode == "navigate"
        interaction = self.appScene.interactionNode
        # Navigating, the left button adjusts window/level, as in Slicer's window/level mouse mode.
        mode_id = interaction.AdjustWindowLevel if self.navigating else interaction.ViewTransform
        interaction.SetCurrentInteractionMode(mode_id)
        if not self.navigating:
            self.controller.setMode(mode)
        self.modeActions[mode].setChecked(True)

    def _onPress(self, ras, sliceNode, shift: bool) -> bool:
        if self.navigating or self.volumeNode is None:
            return False
        taken = self.controller.pressAt(ras, sliceNode, shift)
        if taken:
            self.linkViews(ras)
        self.refresh()
        return taken

    def _onRelease(self, ras) -> bool:
        taken = self.controller.releaseAt(ras)
        self.refresh()
        return taken

    def _onKey(self, keySym: str) -> bool:
        if keySym == "Escape":
            self.setMode("navigate")
            return True
        taken = self.controller.handleKey(keySym)
        if taken:
            if KEY_ACTIONS.get(keySym) in MODES:  # P, N, B also leave Navigate
                self.setMode(self.controller.mode)
            self.refresh()
        return taken

    def linkViews(self, ras) -> None:
        """The crosshair and the other views follow a click: each shows the slice through it."""
        crosshair = self.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            crosshair.SetCrosshairRAS(*[float(v) for v in ras])
        for view in self.views.values():
            view.showSliceThrough(ras)

    # ------------------------------------------------------------------ questions and messages
    def askYesNo(self, question: str) -> bool:
        if not self.interactive:
            self.showMessage(f"{question} (answered no: not interactive)", dialog=False)
            return False
        answer = QtWidgets.QMessageBox.question(self, "MedFM", question)
        return answer == QtWidgets.QMessageBox.Yes

    def showMessage(self, text: str, dialog: bool = True) -> None:
        """One clear line in the status bar (and a dialog for errors, when interactive)."""
        self.lastMessage = text
        self.statusBar().showMessage(text)
        if dialog and self.interactive:
            QtWidgets.QMessageBox.warning(self, "MedFM", text)

    def prepareModel(self, modelName: str) -> bool:
        if self.logic.isModelReady(modelName):
            return True
        info = self.logic.store.info(modelName)
        if not self.askYesNo(f"{modelName} is not downloaded yet. Download it now? ({info.license} licence)"):
            self.controller.setStatus(f"{modelName} is not downloaded yet: use Download or Import in the panel.")
            return False
        return self.downloadModel(modelName)

    def downloadModel(self, modelName: str) -> bool:
        dialog = QtWidgets.QProgressDialog(f"Downloading {modelName}…", "Cancel", 0, 100, self)
        dialog.setWindowModality(QtCore.Qt.WindowModal)

        def progress(report) -> None:  # a models.download.Progress: bytes done and in all
            dialog.setValue(int(100 * report.bytes_done / report.bytes_total) if report.bytes_total else 0)
            QtWidgets.QApplication.processEvents()

        try:
            self.logic.downloadModel(modelName, progress=progress)
        except MedFMError as error:
            self.showMessage(str(error))
            return False
        finally:
            dialog.close()
        self.modelPanel.showModel(modelName)
        return True

    def importModel(self, path: str, modelName: str) -> None:
        try:
            self.logic.store.import_file(path, modelName)
        except MedFMError as error:
            self.showMessage(str(error))
            return
        self.modelPanel.showModel(modelName)

    def connectServer(self, url: str, token: str) -> None:
        try:
            self.logic.configureServer(url, token)
        except MedFMError as error:
            self.showMessage(str(error))
            return
        self.settings.setValue("serverUrl", url)
        self.modelPanel.fillModels(self.logic.modelNames(), self.modelPanel.model.currentText())
        self.showMessage(f"Models run on {url}." if url else "Models run on this machine.", dialog=False)

    # ------------------------------------------------------------------ files
    def openVolumeDialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open a volume", "", "Images (*.nrrd *.nii *.nii.gz "
                                                        "*.mha *.mhd *.dcm);;All files (*)")  # fmt: skip
        if path:
            self.openVolume(path)

    def openDicomDialog(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Open a DICOM series folder")
        if folder:
            self.openVolume(folder)

    def openSegmentationDialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open a segmentation of this volume", "",
                                                        "Segmentations (*.seg.nrrd *.nrrd *.nii *.nii.gz)")  # fmt: skip
        if path:
            self.openSegmentation(path)

    def openVolume(self, path: str | os.PathLike) -> bool:
        """Load a volume (a file or a DICOM folder) with a new segmentation; what was open stays on failure."""
        from ..imaging.io import read_volume
        from ..mrml.bridge import add_volume_node

        try:
            volume = read_volume(path)
        except MedFMError as error:
            self.showMessage(str(error))
            return False
        if not self.confirmDiscard():
            return False
        self.controller.close()
        for node in (self.volumeNode, self.segmentationNode):
            if node is not None:
                self.scene.RemoveNode(node)
        self.volume, self.volumeNode = volume, add_volume_node(self.scene, volume)
        self.segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.name} segmentation")
        self.segmentationNode.CreateDefaultDisplayNodes()
        self.segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        self.editorNode.SetAndObserveSourceVolumeNode(self.volumeNode)
        self.editorNode.SetAndObserveSegmentationNode(self.segmentationNode)
        self.segmentsPanel.addSegment()
        for view in self.views.values():
            view.logic.GetSliceCompositeNode().SetBackgroundVolumeID(self.volumeNode.GetID())
            view.fit()
        self.controller.ensureMarkups()
        self.unsaved = False
        self.showMessage(f"Opened {volume.name}: {' × '.join(map(str, volume.dimensions))} voxels.", dialog=False)
        self.refresh()
        return True

    def openSegmentation(self, path: str | os.PathLike) -> bool:
        """Open a segmentation of the open volume to refine it; a mismatching one is refused, nothing lost."""
        from ..mrml.bridge import ensure_segment, write_segment
        from .files import read_segments

        if self.volume is None:
            self.showMessage("Open the volume first, then its segmentation.")
            return False
        try:
            segments = read_segments(path, self.volume)
        except MedFMError as error:
            self.showMessage(str(error))
            return False
        for segment in segments:
            segment_id = ensure_segment(self.segmentationNode, segment.name, color=segment.color)
            write_segment(segment.mask, self.volume, self.segmentationNode, segment_id)
        first = self.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segments[0].name) if segments else ""
        self.editorNode.SetSelectedSegmentID(first)
        self.segmentsPanel.refresh()
        self.showMessage(f"Opened {len(segments)} segment(s) from {Path(path).name}.", dialog=False)
        return True

    def saveDialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save the segmentation", "", "Slicer segmentation "
                                                        "(*.seg.nrrd);;Labelmap (*.nrrd *.nii.gz)")  # fmt: skip
        if path:
            self.save(path)

    def save(self, path: str | os.PathLike) -> bool:
        from .files import save_segmentation

        if self.segmentationNode is None:
            self.showMessage("Nothing to save: open a volume and segment it first.")
            return False
        try:
            written = save_segmentation(path, self.segmentationNode, self.volume)
        except MedFMError as error:
            self.showMessage(str(error))
            return False
        self.unsaved = False
        self.showMessage(f"Saved {written}.", dialog=False)
        self.refresh()
        return True

    def documentChanged(self) -> None:
        self.unsaved = True

    def confirmDiscard(self) -> bool:
        """Unsaved segments are never dropped without asking."""
        if not self.unsaved and not self.controller.hasPrompts:
            return True
        if not self.interactive:
            self.showMessage("There is unsaved work: save it first (--save), or close the window.", dialog=False)
            return False
        buttons = QtWidgets.QMessageBox.Discard | QtWidgets.QMessageBox.Cancel
        answer = QtWidgets.QMessageBox.question(self, "MedFM", "Discard the unsaved segmentation?", buttons)
        return answer == QtWidgets.QMessageBox.Discard

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802
        paths = [url.toLocalFile() for url in event.mimeData().urls()]
        if paths:
            self.openVolume(paths[0]) if self.volume is None else self.openDropped(paths[0])

    def openDropped(self, path: str) -> None:
        """A dropped segmentation refines the open volume; anything else is taken as a new volume."""
        name = path.lower()
        if name.endswith(".seg.nrrd") or "label" in Path(name).name:
            self.openSegmentation(path)
        else:
            self.openVolume(path)

    # ------------------------------------------------------------------ views
    def setWindowPreset(self, name: str) -> None:
        from ..imaging.intensity import CT_PRESETS

        if self.volumeNode is not None and name in CT_PRESETS:
            width, level = CT_PRESETS[name]
            display = self.volumeNode.GetDisplayNode()
            display.AutoWindowLevelOff()
            display.SetWindowLevel(width, level)

    def toggleLayout(self) -> None:
        """Three views side by side, or the axial view alone."""
        one = self.layoutAction.isChecked()
        for name, view in self.views.items():
            view.widget.setVisible(not one or name == "axial")

    def screenshot(self, path: str | os.PathLike) -> Path:
        """The whole window with its views (``QWidget.grab`` alone misses what VTK draws)."""
        # The views first: rendering after QWidget.grab crashed Mesa.
        shots = [(view.widget, view.grabImage()) for view in self.views.values() if view.widget.isVisible()]
        pixmap = self.grab()
        painter = QtGui.QPainter(pixmap)
        for widget, image in shots:
            painter.drawImage(QtCore.QRect(widget.mapTo(self, QtCore.QPoint(0, 0)), widget.size()), image)
        painter.end()
        path = Path(path)
        if not pixmap.save(str(path)):
            raise MedFMError(f"Cannot write the screenshot {path}: check the folder and the suffix (.png).")
        return path

    def closeEvent(self, event) -> None:  # noqa: N802
        if not self.confirmDiscard():
            event.ignore()
            return
        self.shutdown()
        event.accept()

    def shutdown(self) -> None:
        """Stop timers and workers and detach VTK before the window goes (a late render crashes Mesa)."""
        self.timer.stop()
        self.controller.close()
        for view in self.views.values():
            view.close()
        self.appScene.close()

