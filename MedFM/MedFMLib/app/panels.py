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
        self.zoom = QtWidgets.QCheckBox("Zoom on small objects", objectName="zoomCheckBox")
        self.zoom.setToolTip("Also decode a small object on a crop around its box, and keep the answer the model "
                             "rates higher (LiteMedSAM): a better outline of a small lesion, for a second encode "
                             "on its first box.")  # fmt: skip
        self.licence = QtWidgets.QLabel(objectName="licenceLabel", wordWrap=True)
        self.download = QtWidgets.QPushButton("Download", objectName="downloadButton")
        self.importButton = QtWidgets.QPushButton("Import file…", objectName="importButton")
        self.server = QtWidgets.QLineEdit(objectName="serverUrl", placeholderText="https://server:8000 (empty: local)")
        self.token = QtWidgets.QLineEdit(objectName="serverToken", echoMode=QtWidgets.QLineEdit.Password)
        self.connectButton = QtWidgets.QPushButton("Connect", objectName="connectButton")
        # Class prompts (VISTA3D): a class name, then the model segments it in the whole volume.
        self.classChooser = QtWidgets.QComboBox(objectName="classChooser", editable=True)
        self.classButton = QtWidgets.QPushButton("Segment class", objectName="classButton")
        self.classRow = QtWidgets.QWidget()
        classLayout = QtWidgets.QHBoxLayout(self.classRow)
        classLayout.setContentsMargins(0, 0, 0, 0)
        classLayout.addWidget(self.classChooser, 1)
        classLayout.addWidget(self.classButton)
        self.classRow.setVisible(False)
        self.classButton.clicked.connect(lambda: window.command("setClass", self.classChooser.currentText()))
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.download)
        buttons.addWidget(self.importButton)
        form.addRow("Model", self.model)
        form.addRow("", self.licence)
        form.addRow("", buttons)
        form.addRow("Class", self.classRow)
        form.addRow("Device", self.device)
        form.addRow("Intensity", self.intensity)
        form.addRow("Runtime", self.runtime)
        form.addRow("", self.fast)
        form.addRow("", self.zoom)
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
        self.zoom.setChecked(str(settings.value("zoom", "true")) != "false")
        self.zoom.toggled.connect(lambda on: self.settings.setValue("zoom", "true" if on else "false"))
        self.server.setText(str(settings.value("serverUrl", "")))

    def fillModels(self, names: list[str], chosen: str) -> None:
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItems(names)
        for index, name in enumerate(names):
            self.model.setItemData(index, self.kindOf(name), QtCore.Qt.ToolTipRole)
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
            self.licence.setText(f"{self.kindOf(name)} · runs on the server")
            self.download.setEnabled(False)
            return
        info = logic.store.info(name)
        ready = logic.isModelReady(name)
        commercial = "" if info.commercial_use else " · NON-COMMERCIAL"
        self.licence.setText(f"{self.kindOf(name)} · {info.license} licence{commercial} · "
                             f"{'ready' if ready else 'not downloaded'}")  # fmt: skip
        self.download.setEnabled(not ready)

    def kindOf(self, name: str) -> str:
        """slice, 3D, or 3D + classes: which tools the model's answers come from."""
        from ..mrml.volume_commands import modelKind

        logic = self.window.logic
        info = logic.serverModels().get(name, {}) if logic.isRemote else logic.store.info(name)
        return modelKind(info)

    def showTools(self, controller) -> None:
        """Offer class prompts where the chosen model takes them, with its classes to choose from."""
        name = self.model.currentText()
        logic = self.window.logic
        engine = getattr(controller.session, "engine", None)
        shownFor = (name, logic.isRemote, id(engine) if logic.isRemote else None)
        if getattr(self, "_toolsShownFor", None) == shownFor:
            return  # refreshed at every poll: read the catalog only when the model changes
        self._toolsShownFor = shownFor
        if logic.isRemote:
            prompts = logic.serverModels().get(name, {}).get("prompts", [])
            classes = sorted(getattr(engine, "classes", {}) or {})
        else:
            from ..engines.volumetric import class_table

            info = logic.store.info(name) if name else None
            prompts = info.prompts if info is not None else ()
            classes = sorted(entry["name"] for entry in class_table(info.engine)["labels"]) if info else []
        takesClasses = "class" in prompts
        if [self.classChooser.itemText(i) for i in range(self.classChooser.count())] != classes:
            self.classChooser.clear()
            self.classChooser.addItems(classes)
        self.classRow.setVisible(takesClasses)

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
