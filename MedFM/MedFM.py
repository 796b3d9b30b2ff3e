"""MedFM: promptable foundation-model segmentation in 3D Slicer.

Slicer loads this file at start-up, so it imports only Slicer, Qt, ctk, vtk
and the standard library at the top. Everything else lives in MedFMLib and
is imported where it is used; torch and segment_anything are imported lazily
inside MedFMLib's engines. This file is GUI glue: the work is in MedFMLib.
"""

import logging
import os

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ["auto", "cuda", "mps", "cpu"]
RUNTIMES = ["auto", "torch", "openvino"]
INTENSITIES = ["viewer", "auto", "soft_tissue", "lung", "bone", "brain"]
SETTINGS_PREFIX = "MedFM/"


def settingsValue(key, default=""):
    """A persisted MedFM setting (Slicer's QSettings)."""
    value = qt.QSettings().value(SETTINGS_PREFIX + key)
    return default if value in (None, "") else str(value)


def setSettingsValue(key, value):
    qt.QSettings().setValue(SETTINGS_PREFIX + key, value)


def configureStoreFromSettings():
    """Models under Slicer's settings folder unless the user chose another, and the organisation catalog."""
    from MedFMLib.models.store import configure

    defaultHome = os.path.join(os.path.dirname(slicer.app.slicerUserSettingsFilePath), "MedFM")
    home = settingsValue("modelsFolder") or os.environ.get("MEDFM_HOME") or defaultHome
    configure(home=home, catalog=settingsValue("catalog"))


#
# Module
#


class MedFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedFM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["The MedFM developers"]
        self.parent.helpText = (
            "Segment with promptable foundation models (SAM, MedSAM) from points and boxes placed in the "
            "slice views: use the <b>MedFM</b> effect of the Segment Editor. This panel manages models, "
            "device and intensity. See the "
            '<a href="https://github.com/medfm/SlicerMedFM">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "MedFM is Apache-2.0. Model weights carry their own licences, listed with each model."
        )
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Add the MedFM effect to the Segment Editor (after start-up, when the editor exists)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as editorEffects

    effect = editorEffects.qSlicerSegmentEditorScriptedEffect(None)
    source = os.path.join(os.path.dirname(__file__), "SegmentEditorMedFMLib", "SegmentEditorEffect.py")
    effect.setPythonSource(source.replace("\\", "/"))
    effect.self().register()


#
# Parameter node
#


@parameterNodeWrapper
class MedFMParameterNode:
    """The module's choices; kept in the scene and persisted in Slicer's settings."""

    modelName: str = "classic"
    device: str = "auto"
    intensity: str = "viewer"
    runtime: str = "auto"


#
# Widget
#


class MedFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedFMLogic()  # configures the store from the settings

        self.ui.deviceSelector.addItems(DEVICES)
        self.ui.runtimeSelector.addItems(RUNTIMES)
        self.ui.fastCheckBox.checked = settingsValue("fast") == "true"
        self.ui.zoomCheckBox.checked = settingsValue("zoom", "true") != "false"
        self.ui.intensitySelector.addItems(INTENSITIES)
        self.ui.modelsFolderLineEdit.currentPath = str(self.logic.store.home)
        self.ui.catalogLineEdit.text = settingsValue("catalog")
        self.ui.serverUrlLineEdit.text = settingsValue("serverUrl")
        self.ui.serverTokenLineEdit.text = settingsValue("serverToken")
        self.showServerStatus()
        self.populateModels()
        from MedFMWidgetLib.FinetuneSection import FinetuneSection

        self.finetuneSection = FinetuneSection(lambda: self.logic.store, lambda: self.ui.deviceSelector.currentText,
                                               self.populateModels)  # fmt: skip
        uiWidget.layout().insertWidget(uiWidget.layout().count() - 1, self.finetuneSection.collapsibleButton)

        self.ui.modelSelector.currentTextChanged.connect(self.onModelChanged)
        self.ui.deviceSelector.currentTextChanged.connect(lambda value: self.onChoiceChanged("device", value))
        self.ui.intensitySelector.currentTextChanged.connect(lambda value: self.onChoiceChanged("intensity", value))
        self.ui.runtimeSelector.currentTextChanged.connect(self.onRuntimeChanged)
        self.ui.fastCheckBox.toggled.connect(self.onFastToggled)
        self.ui.zoomCheckBox.toggled.connect(self.onZoomToggled)
        self.ui.downloadModelButton.clicked.connect(self.onDownloadModel)
        self.ui.importModelButton.clicked.connect(self.onImportModel)
        self.ui.removeModelButton.clicked.connect(self.onRemoveModel)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.modelsFolderLineEdit.currentPathChanged.connect(self.onModelsFolderChanged)
        self.ui.catalogLineEdit.editingFinished.connect(self.onCatalogChanged)
        self.ui.openSegmentEditorButton.clicked.connect(self.onOpenSegmentEditor)
        self.ui.connectServerButton.clicked.connect(self.onConnectServer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self.finetuneSection.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self._parameterNode = self.logic.getParameterNode()
        for key in ("modelName", "device", "intensity", "runtime"):
            setattr(self._parameterNode, key, settingsValue(key, getattr(self._parameterNode, key)))
        self.ui.modelSelector.currentText = self._parameterNode.modelName
        self.ui.deviceSelector.currentText = self._parameterNode.device
        self.ui.runtimeSelector.currentText = self._parameterNode.runtime
        self.ui.intensitySelector.currentText = self._parameterNode.intensity
        self.updateModelStatus()

    # ----------------------------------------------------------------- server
    def onConnectServer(self):
        """Use the server in the URL field (checked now), or local models when the field is empty."""
        from MedFMLib.errors import MedFMError

        url, token = self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip()
        setSettingsValue("serverUrl", url)
        setSettingsValue("serverToken", token)
        try:
            with slicer.util.WaitCursor():
                self.logic.configureServer(url, token)
        except MedFMError as error:
            self.logic.configureServer("")
            self.ui.serverStatusLabel.text = f"{error} Models run on this computer until then."
            return
        self.showServerStatus()
        self.populateModels()
        self.updateModelStatus()

    def showServerStatus(self):
        info = self.logic.serverInfo
        if not self.logic.isRemote:
            self.ui.serverStatusLabel.text = "Models run on this computer."
            return
        models = ", ".join(m["name"] for m in info["models"]) if info else "not asked yet"
        version = info["version"] if info else "?"
        self.ui.serverStatusLabel.text = f"Models run on {self.logic.serverUrl} (MedFM {version}): {models}."

    # ----------------------------------------------------------------- models
    def populateModels(self):
        current = self.ui.modelSelector.currentText
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        self.ui.modelSelector.addItems(self.logic.modelNames())
        self.ui.modelSelector.currentText = current or settingsValue("modelName", "classic")
        self.ui.modelSelector.blockSignals(False)

    def onModelChanged(self, name):
        self.onChoiceChanged("modelName", name)
        self.updateModelStatus()

    def onRuntimeChanged(self, runtime):
        """OpenVINO is installed only after asking; declined, the runtime goes back to auto."""
        if runtime == "openvino" and not self.logic.ensureDependencies("openvino"):
            self.ui.runtimeSelector.currentText = "auto"
            return
        self.onChoiceChanged("runtime", runtime)
        self.logic.applyRuntimeSettings()

    def onFastToggled(self, checked):
        setSettingsValue("fast", "true" if checked else "false")
        self.logic.applyRuntimeSettings()

    def onZoomToggled(self, checked):
        setSettingsValue("zoom", "true" if checked else "false")
        self.logic.applyRuntimeSettings()

    def onChoiceChanged(self, key, value):
        if not value:
            return
        setSettingsValue(key, value)
        if self._parameterNode is not None:
            setattr(self._parameterNode, key, value)

    def updateModelStatus(self):
        from MedFMLib.models.dependencies import describe, missing_requirements

        name = self.ui.modelSelector.currentText
        if not name:
            return
        if self.logic.isRemote:
            self.showRemoteModelStatus(name)
            return
        for button in (self.ui.importModelButton, self.ui.deviceSelector):
            button.enabled = True
        try:
            info = self.logic.store.info(name)
            state = self.logic.store.state(name)
            ready = state.ready
        except Exception as error:  # a broken catalog: say so, keep the panel usable
            self.ui.modelStatusLabel.text = str(error)
            return
        if not info.needs_weights:
            status = "built in (no weights)"
        elif ready:
            status = f"downloaded ({self.logic.store.path(name)})"
        elif state.label != "not downloaded":  # a file is there, but not verified as this model's
            status = state.message
        else:
            note = info.download_note if not info.can_download and info.download_note else ""
            status = "not downloaded yet" + (f": {note}" if note else "")
        if info.prompts == ("box",):  # MedSAM-style models: say so before the user clicks in vain
            status += " — box prompts only: draw a box around the object"
        self.ui.modelStatusLabel.text = f"{info.kind_label} model · {status}"
        commercial = "commercial use allowed" if info.commercial_use else "NON-COMMERCIAL use only"
        note = f" {info.license_note}" if info.license_note else ""
        self.ui.modelLicenseLabel.text = f'{info.license}, {commercial}.{note} <a href="{info.homepage}">Homepage</a>'
        self.ui.downloadModelButton.enabled = info.needs_weights and not ready and info.can_download
        self.ui.removeModelButton.enabled = info.needs_weights and (ready or state.label != "not downloaded")
        missing = missing_requirements(info.engine)
        self.ui.installDependenciesButton.enabled = bool(missing)
        self.ui.dependenciesLabel.text = (
            f"{name} needs: {describe(missing)}." if missing else "All packages this model needs are installed."
        )

    def showRemoteModelStatus(self, name):
        """A server's model: its state there and its licence; weights and devices are the server's business."""
        model = self.logic.serverModels().get(name, {})
        kind = "3D" if model.get("kind") == "volume" else "slice"
        self.ui.modelStatusLabel.text = f"{kind} model · on the server: {model.get('state', 'not offered')}"
        commercial = "commercial use allowed" if model.get("commercial_use") else "NON-COMMERCIAL use only"
        self.ui.modelLicenseLabel.text = f"{model.get('license', '?')}, {commercial}."
        for button in (self.ui.downloadModelButton, self.ui.importModelButton, self.ui.removeModelButton,
                       self.ui.installDependenciesButton, self.ui.deviceSelector):  # fmt: skip
            button.enabled = False
        self.ui.dependenciesLabel.text = "The server has what its models need."

    def onDownloadModel(self):
        self.downloadWithProgress(self.ui.modelSelector.currentText)
        self.updateModelStatus()

    def downloadWithProgress(self, name):
        """Download through the model store with a progress dialog; True if the model is ready after."""
        dialog = slicer.util.createProgressDialog(
            parent=slicer.util.mainWindow(), windowTitle="MedFM", labelText=f"Downloading {name}...", maximum=1000
        )
        dialog.setCancelButton(None)  # the download resumes if Slicer is closed; no half file is ever used

        def onProgress(progress):
            if progress.bytes_total:
                dialog.value = int(1000 * progress.bytes_done / progress.bytes_total)
            dialog.labelText = (
                f"Downloading {name}: {progress.bytes_done / 2**20:.0f} MiB"
                + (f" of {progress.bytes_total / 2**20:.0f} MiB" if progress.bytes_total else "")
                + f" ({progress.bytes_per_second / 2**20:.1f} MiB/s)"
            )
            slicer.app.processEvents()

        try:
            self.logic.downloadModel(name, progress=onProgress)
            return True
        except Exception as error:
            slicer.util.errorDisplay(str(error), windowTitle="MedFM")
            return False
        finally:
            dialog.close()

    def onImportModel(self):
        name = self.ui.modelSelector.currentText
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), f"Import the checkpoint of {name}", "", "Checkpoints (*.pth *.pt);;All (*)"
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Import failed.", waitCursor=True):
            self.logic.store.import_file(path, name)
        self.updateModelStatus()

    def onRemoveModel(self):
        name = self.ui.modelSelector.currentText
        if slicer.util.confirmOkCancelDisplay(f"Delete the downloaded weights of {name}?", windowTitle="MedFM"):
            self.logic.removeModel(name)
        self.updateModelStatus()

    def onInstallDependencies(self):
        from MedFMLib.models.store import ModelStore

        self.logic.ensureDependencies(ModelStore().info(self.ui.modelSelector.currentText).engine)
        self.updateModelStatus()

    # --------------------------------------------------------------- settings
    def onModelsFolderChanged(self, path):
        setSettingsValue("modelsFolder", path)
        configureStoreFromSettings()
        self.logic.resetStore()
        self.updateModelStatus()

    def onCatalogChanged(self):
        setSettingsValue("catalog", self.ui.catalogLineEdit.text.strip())
        configureStoreFromSettings()
        self.logic.resetStore()
        with slicer.util.tryWithErrorDisplay("Cannot use this catalog.", waitCursor=True):
            self.populateModels()
        self.updateModelStatus()

    def onOpenSegmentEditor(self):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setActiveEffectByName("MedFM")


#
# Logic
#


class MedFMLogic(ScriptedLoadableModuleLogic):
    """The module's logic: MedFMLib's SegmentationLogic plus Slicer-only steps (installing packages).

    Usable without the GUI, from Slicer's Python console::

        logic = slicer.util.getModuleLogic("MedFM")
        segmentId = logic.segment(volumeNode, segmentationNode, "tumour",
                                  positivePointsNode=getNode("F"), view="axial", modelName="classic")

    See MedFMLib.mrml.logic.SegmentationLogic.segment for every argument.
    """

    def __init__(self):
        from MedFMLib.mrml.logic import SegmentationLogic

        ScriptedLoadableModuleLogic.__init__(self)
        configureStoreFromSettings()
        self._core = SegmentationLogic()
        self.configureServerFromSettings()
        self.applyRuntimeSettings()

    def applyRuntimeSettings(self):
        """The runtime and precision chosen in the module, for engines made from now on."""
        self._core.runtime = settingsValue("runtime", "auto") or "auto"
        self._core.fast = settingsValue("fast") == "true"
        self._core.zoom = settingsValue("zoom", "true") != "false"

    def __getattr__(self, name):
        # Everything MedFMLib's logic offers (segment, engine, downloadModel, ...) is the module's too.
        if name.startswith("__") or name == "_core":
            raise AttributeError(name)
        return getattr(self._core, name)

    def getParameterNode(self):
        return MedFMParameterNode(super().getParameterNode())

    def resetStore(self):
        from MedFMLib.mrml.logic import SegmentationLogic

        self._core = SegmentationLogic()
        self.configureServerFromSettings()
        self.applyRuntimeSettings()

    def configureServerFromSettings(self):
        """The server chosen in the module, if any (asked on first use, so that Slicer starts without waiting)."""
        from MedFMLib.errors import MedFMError

        try:
            self._core.configureServer(settingsValue("serverUrl"), settingsValue("serverToken"), check=False)
        except MedFMError as error:  # a malformed URL saved earlier: run locally, say why in the log
            logging.warning(f"MedFM: {error}")

    def ensureDependencies(self, engineName, askConfirmation=True):
        """Install what an engine needs, after asking: torch through the PyTorch extension, the rest by pip."""
        from MedFMWidgetLib.Packages import ensureDependencies

        return ensureDependencies(engineName, askConfirmation)


#
# Test
#


class MedFMTest(ScriptedLoadableModuleTest):
    """The whole flow in Slicer: a generated oblique volume, the MedFM effect's logic, a model, a segment."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LogicSegmentsPhantomIntoSegment()
        self.setUp()
        self.test_EffectIsRegistered()
        self.setUp()
        self.test_EffectFlowWithTinyModel()
        self.setUp()
        self.test_RemoteServerSection()
        self.setUp()
        self.test_FinetuneSection()

    def test_FinetuneSection(self):
        """The Fine-tune section is in the panel, lists SAM-family models, and refuses to train on nothing."""
        slicer.util.selectModule("MedFM")
        section = slicer.modules.medfm.widgetRepresentation().self().finetuneSection
        self.assertEqual(section.collapsibleButton.text, "Fine-tune")
        self.assertTrue(slicer.modules.medfm.widgetRepresentation().isAncestorOf(section.collapsibleButton))
        self.assertGreater(section.baseModelSelector.count, 0)
        self.assertEqual(section.baseModelSelector.findText("classic"), -1)  # SAM-family models only
        self.assertFalse(section.stopButton.enabled)
        section.nameLineEdit.text = "selftest_finetune"
        section.trainButton.click()
        self.assertIn("No segmentation selected", section.statusLabel.text)
        self.delayDisplay("MedFM fine-tune section is there and checks its input")

    def test_RemoteServerSection(self):
        """A server that cannot be reached is reported in the panel, and models stay local."""
        slicer.util.selectModule("MedFM")
        widget = slicer.modules.medfm.widgetRepresentation().self()
        saved = {key: settingsValue(key) for key in ("serverUrl", "serverToken")}
        try:
            widget.ui.serverUrlLineEdit.text = "http://127.0.0.1:9"  # the discard port: nothing listens
            widget.ui.serverTokenLineEdit.text = "a-token-of-sixteen-chars"
            widget.ui.connectServerButton.click()
            self.assertIn("Cannot reach the MedFM server", widget.ui.serverStatusLabel.text)
            self.assertFalse(widget.logic.isRemote)
            widget.ui.serverUrlLineEdit.text = ""
            widget.ui.connectServerButton.click()
            self.assertEqual(widget.ui.serverStatusLabel.text, "Models run on this computer.")
        finally:
            for key, value in saved.items():
                setSettingsValue(key, value)
        self.delayDisplay("MedFM remote server section reports errors and falls back to local models")

    def _phantom(self):
        import numpy as np

        from MedFMLib.imaging.phantoms import demo_phantom
        from MedFMLib.mrml.bridge import add_volume_node

        volume, truth, seeds = demo_phantom()
        volumeNode = add_volume_node(slicer.mrmlScene, volume, "MedFM phantom")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPoint(vtk.vtkVector3d(*np.asarray(seeds["lesion"], dtype=float)))
        return volume, truth, volumeNode, segmentationNode, points

    def test_LogicSegmentsPhantomIntoSegment(self):
        from MedFMLib.mrml.bridge import segment_array

        volume, truth, volumeNode, segmentationNode, points = self._phantom()
        logic = MedFMLogic()
        segmentId = logic.segment(volumeNode, segmentationNode, "lesion", positivePointsNode=points, view="axial")
        mask = segment_array(segmentationNode, segmentId, volume)
        self.assertTrue(mask.any())
        self.assertFalse((mask & ~truth["lesion"]).any())
        self.delayDisplay("MedFM logic wrote the lesion into its segment")

    def test_EffectIsRegistered(self):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        self.assertIsNotNone(editor.effectByName("MedFM"))
        self.delayDisplay("MedFM effect is registered")

    def _useTinyModel(self):
        """A tiny random-weight SAM when torch is installed (else the weight-free classic model)."""
        import tempfile

        from MedFMLib.models.dependencies import missing_requirements

        if missing_requirements("sam"):
            self.delayDisplay("torch or segment-anything is missing: the effect test uses the classic model")
            return "classic"
        from MedFMLib.models.store import ModelStore, configure
        from MedFMLib.testing import write_tiny_sam_catalog

        folder = tempfile.mkdtemp(prefix="MedFMTest")
        catalog = write_tiny_sam_catalog(folder)
        configure(home=os.path.join(folder, "home"), catalog=str(catalog))
        ModelStore().import_file(os.path.join(folder, "sam_tiny.pth"), "sam_tiny")
        return "sam_tiny"

    def test_EffectFlowWithTinyModel(self):
        """Click in the red view through the effect, preview, Apply, and Slicer's undo."""
        from MedFMLib.mrml.bridge import segment_array

        savedSettings = {key: settingsValue(key) for key in ("modelName", "device", "modelsFolder", "catalog")}
        savedEnvironment = {key: os.environ.get(key) for key in ("MEDFM_HOME", "MEDFM_CATALOG")}
        try:
            modelName = self._useTinyModel()
            setSettingsValue("modelName", modelName)
            setSettingsValue("device", "cpu")
            self._runEffectFlow(segment_array)
        finally:
            for key, value in savedSettings.items():
                setSettingsValue(key, value)
            for key, value in savedEnvironment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _runEffectFlow(self, segment_array):
        import numpy as np

        volume, truth, volumeNode, segmentationNode, points = self._phantom()
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("lesion")
        editorWidget.setSegmentationNode(segmentationNode)
        editorWidget.setSourceVolumeNode(volumeNode)
        editorWidget.setCurrentSegmentID(segmentId)
        editorWidget.setActiveEffectByName("MedFM")
        effect = editorWidget.activeEffect().self()
        controller = effect.controller
        position = [0.0, 0.0, 0.0]
        points.GetNthControlPointPositionWorld(0, position)
        redSliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        redSliceNode.JumpSliceByCentering(*position)
        controller.addPoint(position, positive=True, sliceNode=redSliceNode)
        self.assertTrue(effect.waitUntilIdle())
        preview = controller.previewMask().copy()
        region = controller.sync.touched_region()
        self.assertTrue(region.any())
        effect.command("apply")
        written = segment_array(segmentationNode, segmentId, volume)
        # Apply writes exactly the preview, and only on the prompted slice.
        self.assertTrue(np.array_equal(written, preview & region))
        editorWidget.undo()
        self.assertFalse(segment_array(segmentationNode, segmentId, volume).any())
        self.delayDisplay("MedFM effect: click, preview, apply and undo work")
        # Propagate both ways on the worker thread; the preview grows beyond the clicked slice.
        controller.addPoint(position, positive=True, sliceNode=redSliceNode)
        self.assertTrue(effect.waitUntilIdle())
        single = controller.previewMask().copy()
        effect.command("propagate", "both")
        self.assertTrue(effect.waitUntilIdle())
        self.assertFalse(controller.propagating)
        self.assertTrue(controller.previewMask().sum() >= single.sum())
        if len(controller.session.objects[controller.objectId].slices) > 1:  # a random tiny model may stop at once
            effect.command("undo")  # the whole propagation is one undo step
            self.assertTrue(np.array_equal(controller.previewMask(), single))
        effect.command("cancel")
        self.delayDisplay("MedFM effect: propagation and its undo work")
