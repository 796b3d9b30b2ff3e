"""The MedFM Segment Editor effect: clicks and boxes in the slice views, a live preview, Apply/Cancel.

A thin skin: events in, state out. Everything it does is MedFMLib.mrml.controller.InteractionController's,
which the desktop app shares and the tests run headless on real MRML. A QTimer polls the controller for
what worker threads finished; the panel shows the controller's state.
"""

import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

POLL_MILLISECONDS = 50


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedFM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.controller = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        return qt.QIcon(os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "MedFM.png"))

    def helpText(self):
        return (
            "<html>Segment with a foundation model (choose it in the MedFM module).<br>"
            "<b>Left-click</b>: a point on the object (<b>P</b>); <b>Shift+click</b> or mode <b>N</b>: a point "
            "on what is not the object; mode <b>B</b>: drag a box; <b>S</b>: scribble, <b>L</b>: lasso (Shift: "
            "background). Drag points to move them, right-click to delete. <b>Z</b>/<b>Y</b>: undo/redo a "
            "prompt, <b>Enter</b>: apply. 3D models (nnInteractive, VISTA3D) answer in 3D: no propagation.</html>"
        )

    # --------------------------------------------------------------- options
    def setupOptionsFrame(self):
        uiPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "UI", "SegmentEditorMedFM.ui")
        uiWidget = slicer.util.loadUI(uiPath)
        self.scriptedEffect.addOptionsWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.modeButtons = {"positive": self.ui.positiveButton, "negative": self.ui.negativeButton,
                            "box": self.ui.boxButton, "scribble": self.ui.scribbleButton,
                            "lasso": self.ui.lassoButton}  # fmt: skip
        group = qt.QButtonGroup(uiWidget)
        group.setExclusive(True)
        for mode, button in self.modeButtons.items():
            group.addButton(button)
            button.clicked.connect(lambda checked, m=mode: self.command("setMode", m))
        self.ui.positiveButton.checked = True
        commands = {
            self.ui.undoButton: ("undo",),
            self.ui.redoButton: ("redo",),
            self.ui.clearButton: ("clear",),
            self.ui.applyButton: ("apply",),
            self.ui.cancelButton: ("cancel",),
            self.ui.cancelEncodingButton: ("cancelEncoding",),
            self.ui.propagateUpButton: ("propagate", "up"),
            self.ui.propagateDownButton: ("propagate", "down"),
            self.ui.propagateBothButton: ("propagate", "both"),
            self.ui.propagateRoiButton: ("propagateWithinBox",),
            self.ui.cancelPropagationButton: ("cancelPropagation",),
        }
        self.ui.classButton.clicked.connect(lambda: self.command("setClass", self.ui.classComboBox.currentText))
        for button, call in commands.items():
            button.clicked.connect(lambda checked=False, call=call: self.command(*call))
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MILLISECONDS)
        self.pollTimer.timeout.connect(lambda: self.command("poll"))

    def command(self, name, *args):
        """Run a controller command from a button, a key or the timer, then show the new state."""
        if self.controller is not None:
            getattr(self.controller, name)(*args)
            self.refreshUi()

    def refreshUi(self):
        controller = self.controller
        self.ui.statusLabel.text = controller.status
        self.ui.modelLabel.text = controller.modelDescription or controller.settings.modelName
        self.modeButtons[controller.mode].checked = True
        self.ui.encodingProgressBar.visible = self.ui.cancelEncodingButton.visible = controller.encoding
        self.ui.propagationProgressBar.visible = self.ui.cancelPropagationButton.visible = controller.propagating
        done, total = controller.progress
        self.ui.propagationProgressBar.maximum = max(1, total)
        self.ui.propagationProgressBar.value = done
        self.ui.undoButton.enabled = controller.canUndo
        self.ui.redoButton.enabled = controller.canRedo
        self.ui.applyButton.enabled = controller.canApply
        for button in (self.ui.propagateUpButton, self.ui.propagateDownButton, self.ui.propagateBothButton,
                       self.ui.propagateRoiButton):  # fmt: skip
            button.enabled = controller.canPropagate
            button.toolTip = "The model answers in 3D already: nothing to propagate" if controller.volumetric else ""
        self.refreshClassChooser()

    def refreshClassChooser(self):
        """Class prompts where the chosen model takes them (VISTA3D), with its classes to choose from."""
        from MedFMLib.engines.volumetric import class_table

        name = self.controller.settings.modelName
        if getattr(self, "_classesShownFor", None) == (name, self.logic.serverUrl):
            return  # the timer refreshes the panel 20 times a second: read the catalog when the model changes
        self._classesShownFor = (name, self.logic.serverUrl)
        info = None if self.logic.isRemote else self.logic.store.info(name)
        takesClasses = "class" in (info.prompts if info is not None else self.logic.serverModels().get(name, {}).get(
            "prompts", []))  # fmt: skip
        self.ui.classLabel.visible = self.ui.classComboBox.visible = self.ui.classButton.visible = takesClasses
        self.ui.classComboBox.clear()
        if takesClasses and info is not None:
            self.ui.classComboBox.addItems(sorted(entry["name"] for entry in class_table(info.engine)["labels"]))

    # ------------------------------------------------------------- lifecycle
    def activate(self):
        import MedFM
        from MedFMLib.mrml.controller import InteractionController

        if self.logic is None:
            self.logic = MedFM.MedFMLogic()
        elif self.logic.serverUrl != MedFM.settingsValue("serverUrl") and not self.controllerBusy():
            self.logic.configureServerFromSettings()  # the module's Remote server section changed it
        if self.controller is None:
            self.controller = InteractionController(
                self.logic,
                self.scriptedEffect.parameterSetNode(),
                settings=self.currentSettings,
                ask=lambda question: slicer.util.confirmYesNoDisplay(question, windowTitle="MedFM"),
                prepareModel=self.prepareModel,
                saveUndoState=self.scriptedEffect.saveStateForUndo,
                onDeviceFallback=lambda device: MedFM.setSettingsValue("device", device),
            )
        self.controller.editorNode = self.scriptedEffect.parameterSetNode()  # a new scene brings a new one
        self.controller.ensureMarkups()
        self.pollTimer.start()
        self.refreshUi()

    def deactivate(self):
        self.pollTimer.stop()
        if self.controller is not None:
            self.controller.close()

    def controllerBusy(self):
        return self.controller is not None and self.controller.propagating

    def currentSettings(self):
        """The module's choices (Slicer's settings) and this panel's clean-up options."""
        import MedFM
        from MedFMLib.mrml.controller import ControllerSettings

        self.logic.applyRuntimeSettings()  # the module's Runtime and Fast choices
        return ControllerSettings(
            modelName=MedFM.settingsValue("modelName", "classic"),
            device=MedFM.settingsValue("device", "auto"),
            intensity=MedFM.settingsValue("intensity", "viewer"),
            keepConnected=self.ui.keepConnectedCheckBox.checked,
            fillHoles=self.ui.fillHolesCheckBox.checked,
        )

    def prepareModel(self, modelName):
        """Ask before installing packages or downloading weights; False if the user declined."""
        info = self.logic.store.info(modelName)
        if not self.logic.ensureDependencies(info.engine):
            self.controller.setStatus(f"{modelName} needs packages that are not installed.")
            return False
        if self.logic.isModelReady(modelName):
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"{modelName} is not downloaded yet. Download it now? ({info.license} licence)", windowTitle="MedFM"
        ):
            self.controller.setStatus(f"{modelName} is not downloaded yet: download it in the MedFM module.")
            return False
        return slicer.modules.medfm.widgetRepresentation().self().downloadWithProgress(modelName)

    # ----------------------------------------------------------- interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.controller is None:
            return False
        handled = False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            handled = self.controller.handleKey(callerInteractor.GetKeySym())
        elif eventId == vtk.vtkCommand.LeftButtonPressEvent:
            ras = self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
            sliceNode = viewWidget.sliceLogic().GetSliceNode()
            with slicer.util.WaitCursor():  # the first click may load a model or upload the volume
                handled = self.controller.pressAt(ras, sliceNode, shift=bool(callerInteractor.GetShiftKey()))
        elif eventId == vtk.vtkCommand.MouseMoveEvent:
            handled = self.controller.moveAt(self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(),
                                                                         viewWidget))  # fmt: skip
        elif eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            handled = self.controller.releaseAt(self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(),
                                                                            viewWidget))  # fmt: skip
        if handled:
            self.refreshUi()
        return handled

    # ----------------------------------------------------------- self-test
    def waitUntilIdle(self, timeoutSeconds=300):
        """Process events until encoding and propagation are done (the module's self-test)."""
        return self.controller.waitUntilIdle(timeoutSeconds, pump=slicer.app.processEvents)
