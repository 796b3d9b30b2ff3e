"""The app's side panels: the model and where it runs, and the list of segments. Qt widgets only; what they
change lives in the segmentation node and the logic."""

from __future__ import annotations

from Qt import QtCore, QtGui, QtWidgets

from ..imaging.intensity import CT_PRESETS
from .files import SEGMENT_COLOURS

DEVICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("auto", "torch", "openvino")


class ModelPanel(QtWidgets.QGroupBox):
    """Model, device, intensity, runtime and server: the choices a session is made from, kept in settings."""

    def __init__(self, window, settings: QtCore.QSettings) -> None:
        super().__init__("Model", window)
        self.window, self.settings = window, settings
        form = QtWidgets.QFormLayout(self)
        self.model = QtWidgets.QComboBox(objectName="modelChooser")
        self.device = QtWidgets.QComboBox(objectName="deviceChooser")
        self.device.addItems(DEVICES)
        self.intensity = QtWidgets.QComboBox(objectName="intensityChooser")
        self.intensity.addItems(["viewer", "auto", *CT_PRESETS])
        self.runtime = QtWidgets.QComboBox(objectName="runtimeChooser")
        self.runtime.addItems(RUNTIMES)
        self.fast = QtWidgets.QCheckBox("Fast (bf16)", objectName="fastCheckBox")
        self.licence = QtWidgets.QLabel(objectName="licenceLabel", wordWrap=True)
        self.download = QtWidgets.QPushButton("Download", objectName="downloadButton")
        self.importButton = QtWidgets.QPushButton("Import file…", objectName="importButton")
        self.server = QtWidgets.QLineEdit(objectName="serverUrl", placeholderText="https://server:8000 (empty: local)")
        self.token = QtWidgets.QLineEdit(objectName="serverToken", echoMode=QtWidgets.QLineEdit.Password)
        self.connectButton = QtWidgets.QPushButton("Connect", objectName="connectButton")
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.download)
        buttons.addWidget(self.importButton)
        form.addRow("Model", self.model)
        form.addRow("", self.licence)
        form.addRow("", buttons)
        form.addRow("Device", self.device)
        form.addRow("Intensity", self.intensity)
        form.addRow("Runtime", self.runtime)
        form.addRow("", self.fast)
        form.addRow("Server", self.server)
        form.addRow("Token", self.token)
        form.addRow("", self.connectButton)
        self.download.clicked.connect(lambda: window.downloadModel(self.model.currentText()))
        self.importButton.clicked.connect(self.importModel)
        self.connectButton.clicked.connect(lambda: window.connectServer(self.server.text(), self.token.text()))
        self.model.currentTextChanged.connect(self.showModel)
        for combo, key in ((self.device, "device"), (self.intensity, "intensity"), (self.runtime, "runtime")):
            combo.setCurrentText(str(settings.value(key, combo.itemText(0))))
            combo.currentTextChanged.connect(lambda text, key=key: self.settings.setValue(key, text))
        self.fast.setChecked(str(settings.value("fast", "false")) == "true")
        self.fast.toggled.connect(lambda on: self.settings.setValue("fast", "true" if on else "false"))
        self.server.setText(str(settings.value("serverUrl", "")))

    def fillModels(self, names: list[str], chosen: str) -> None:
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItems(names)
        self.model.setCurrentText(chosen if chosen in names else (names[0] if names else ""))
        self.model.blockSignals(False)
        self.showModel(self.model.currentText())

    def showModel(self, name: str) -> None:
        """The model's licence and whether its weights are here (many weights are for non-commercial use)."""
        if not name:
            return
        self.settings.setValue("modelName", name)
        logic = self.window.logic
        if logic.isRemote:
            self.licence.setText("runs on the server")
            self.download.setEnabled(False)
            return
        info = logic.store.info(name)
        ready = logic.isModelReady(name)
        self.licence.setText(f"{info.license} licence · {'ready' if ready else 'not downloaded'}")
        self.download.setEnabled(not ready)

    def importModel(self) -> None:
        name = self.model.currentText()
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, f"Checkpoint for {name}")
        if path:
            self.window.importModel(path, name)


class SegmentsPanel(QtWidgets.QGroupBox):
    """The segments of the segmentation: add, rename (double-click), recolour, hide (checkbox) and delete."""

    def __init__(self, window) -> None:
        super().__init__("Segments", window)
        self.window = window
        layout = QtWidgets.QVBoxLayout(self)
        self.list = QtWidgets.QListWidget(objectName="segmentList")
        layout.addWidget(self.list)
        row = QtWidgets.QHBoxLayout()
        for label, name, slot in (("Add", "addSegment", self.addSegment), ("Colour…", "colourSegment", self.recolour),
                                  ("Delete", "deleteSegment", self.deleteSegment)):  # fmt: skip
            button = QtWidgets.QPushButton(label, objectName=name)
            button.clicked.connect(slot)
            row.addWidget(button)
        layout.addLayout(row)
        self.list.currentItemChanged.connect(self._selected)
        self.list.itemChanged.connect(self._edited)

    @property
    def node(self):
        return self.window.segmentationNode

    def refresh(self) -> None:
        """Show the node's segments, keeping the selection."""
        self.list.blockSignals(True)
        self.list.clear()
        segmentation = self.node.GetSegmentation()
        display = self.node.GetDisplayNode()
        selected = self.window.editorNode.GetSelectedSegmentID()
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segment_id)
            item = QtWidgets.QListWidgetItem(segment.GetName())
            item.setData(QtCore.Qt.UserRole, segment_id)
            item.setFlags(item.flags() | QtCore.Qt.ItemIsEditable | QtCore.Qt.ItemIsUserCheckable)
            visible = display.GetSegmentVisibility(segment_id) if display is not None else True
            item.setCheckState(QtCore.Qt.Checked if visible else QtCore.Qt.Unchecked)
            item.setData(QtCore.Qt.DecorationRole, QtGui.QColor.fromRgbF(*segment.GetColor()))
            self.list.addItem(item)
            if segment_id == selected:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)

    def addSegment(self) -> str:
        segmentation = self.node.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        colour = SEGMENT_COLOURS[count % len(SEGMENT_COLOURS)]
        segment_id = segmentation.AddEmptySegment("", f"Segment_{count + 1}", colour)
        self.window.editorNode.SetSelectedSegmentID(segment_id)
        self.refresh()
        return segment_id

    def recolour(self) -> None:
        segment = self._currentSegment()
        if segment is None:
            return
        colour = QtWidgets.QColorDialog.getColor(QtGui.QColor.fromRgbF(*segment.GetColor()), self)
        if colour.isValid():
            segment.SetColor(colour.redF(), colour.greenF(), colour.blueF())
            self.refresh()

    def deleteSegment(self) -> None:
        item = self.list.currentItem()
        if item is not None:
            self.node.GetSegmentation().RemoveSegment(item.data(QtCore.Qt.UserRole))
            self.window.editorNode.SetSelectedSegmentID(self.node.GetSegmentation().GetNthSegmentID(0) or "")
            self.window.documentChanged()
            self.refresh()

    def _currentSegment(self):
        item = self.list.currentItem()
        return None if item is None else self.node.GetSegmentation().GetSegment(item.data(QtCore.Qt.UserRole))

    def _selected(self, item, previous=None) -> None:
        if item is not None:
            self.window.editorNode.SetSelectedSegmentID(item.data(QtCore.Qt.UserRole))
            self.window.controller.refreshPreview()

    def _edited(self, item) -> None:
        """A rename (the item's text) or a visibility change (its checkbox)."""
        segment_id = item.data(QtCore.Qt.UserRole)
        segment = self.node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            return
        if item.text() and item.text() != segment.GetName():
            segment.SetName(item.text())
        display = self.node.GetDisplayNode()
        if display is not None:
            display.SetSegmentVisibility(segment_id, item.checkState() == QtCore.Qt.Checked)
