"""The MedFM Segment Editor effect: clicks and boxes in the slice views, a live preview, Apply/Cancel.

GUI glue only. Prompts live in markups nodes (so they can be dragged and
deleted with Slicer's own tools); MedFMLib.mrml.prompt_sync.PromptSync turns their
changes into session updates; MedFMLib.interaction.background encodes slices on a worker
thread while a QTimer on the GUI thread waits for them. MRML and Qt are only
touched here, on the main thread.
"""

import os

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

#: keys in the slice views while the effect is active
KEY_ACTIONS = {
    "p": "positive",
    "n": "negative",
    "b": "box",
    "z": "undo",
    "y": "redo",
    "Return": "apply",
    "KP_Enter": "apply",
}
POLL_MILLISECONDS = 50
NEIGHBOURS_TO_PREFETCH = 3
GRAB_RADIUS_PIXELS = 6  # a press this close to a control point drags it instead of adding a new one


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedFM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.session = None
        self.sessionKey = None
        self.objectId = None
        self.sync = None
        self.encoder = None
        self.mode = "positive"
        self.boxStart = None
        self.boxView = None
        self.positiveNode = self.negativeNode = self.roiNode = self.previewNode = None
        self.observations = []
        self.job = None  # a propagation running on a worker thread

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
            "on what is not the object; mode <b>B</b>: drag a box. Drag points to move them, right-click to "
            "delete. <b>Z</b>/<b>Y</b>: undo/redo a prompt, <b>Enter</b>: apply.</html>"
        )

    # --------------------------------------------------------------- options
    def setupOptionsFrame(self):
        uiPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "UI", "SegmentEditorMedFM.ui")
        uiWidget = slicer.util.loadUI(uiPath)
        self.scriptedEffect.addOptionsWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.modeButtons = {
            "positive": self.ui.positiveButton,
            "negative": self.ui.negativeButton,
            "box": self.ui.boxButton,
        }
        group = qt.QButtonGroup(uiWidget)
        group.setExclusive(True)
        for mode, button in self.modeButtons.items():
            group.addButton(button)
            button.clicked.connect(lambda checked, m=mode: self.setMode(m))
        self.ui.positiveButton.checked = True
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.redoButton.clicked.connect(self.onRedo)
        self.ui.clearButton.clicked.connect(self.onClear)
        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.cancelEncodingButton.clicked.connect(self.onCancelEncoding)
        self.ui.propagateUpButton.clicked.connect(lambda: self.onPropagate("up"))
        self.ui.propagateDownButton.clicked.connect(lambda: self.onPropagate("down"))
        self.ui.propagateBothButton.clicked.connect(lambda: self.onPropagate("both"))
        self.ui.propagateRoiButton.clicked.connect(self.onPropagateWithinBox)
        self.ui.cancelPropagationButton.clicked.connect(self.onCancelPropagation)
        self.propagationTimer = qt.QTimer()
        self.propagationTimer.setInterval(POLL_MILLISECONDS)
        self.propagationTimer.timeout.connect(self.onPropagationPoll)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MILLISECONDS)
        self.pollTimer.timeout.connect(self.onPoll)
        self.dragTimer = qt.QTimer()
        self.dragTimer.setSingleShot(True)
        self.dragTimer.setInterval(120)  # decode at most ~8 times a second while a point is dragged
        self.dragTimer.timeout.connect(self.requestSync)

    def setMode(self, mode):
        self.mode = mode
        self.modeButtons[mode].checked = True

    def setStatus(self, text):
        self.ui.statusLabel.text = text

    # ------------------------------------------------------------- lifecycle
    def activate(self):
        import MedFM

        if self.logic is None:
            self.logic = MedFM.MedFMLogic()
        elif self.logic.serverUrl != MedFM.settingsValue("serverUrl") and self.job is None:
            self.logic.configureServerFromSettings()  # the module's Remote server section changed it
        self.ui.modelLabel.text = MedFM.settingsValue("modelName", "classic")
        self.ensureMarkups()

    def deactivate(self):
        self.onCancel()
        self.removeMarkups()
        if self.encoder is not None:
            self.encoder.stop()
            self.encoder = None
        self.session = self.sessionKey = None

    def ensureMarkups(self):
        if self.positiveNode is not None and self.positiveNode.GetScene() is not None:
            return
        self.removeMarkups()  # a closed scene took them: start clean
        scene = slicer.mrmlScene
        self.positiveNode = self._markupsNode("vtkMRMLMarkupsFiducialNode", "MedFM +", (0.1, 0.9, 0.1))
        self.negativeNode = self._markupsNode("vtkMRMLMarkupsFiducialNode", "MedFM -", (0.95, 0.15, 0.15))
        self.roiNode = self._markupsNode("vtkMRMLMarkupsROINode", "MedFM box", (1.0, 0.85, 0.1))
        self.previewNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedFM preview")
        self.previewNode.SetHideFromEditors(True)
        self.previewNode.CreateDefaultDisplayNodes()
        self.previewNode.GetDisplayNode().SetOpacity2DFill(0.45)
        for node in (self.positiveNode, self.negativeNode, self.roiNode):
            for event in (node.PointEndInteractionEvent, node.PointRemovedEvent):
                self.observations.append((node, node.AddObserver(event, lambda *args: self.requestSync())))
            self.observations.append(
                (node, node.AddObserver(node.PointModifiedEvent, lambda *args: self.dragTimer.start()))
            )

    def _markupsNode(self, className, name, color):
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetPointLabelsVisibility(False)
        node.SetMarkupLabelFormat("")
        return node

    def removeMarkups(self):
        for node, tag in self.observations:
            node.RemoveObserver(tag)
        self.observations = []
        for node in (self.positiveNode, self.negativeNode, self.roiNode, self.previewNode):
            if node is not None and node.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(node)
        self.positiveNode = self.negativeNode = self.roiNode = self.previewNode = None

    # --------------------------------------------------------------- session
    def ensureSession(self):
        """The session for the source volume and the module's model, device and intensity (made on demand)."""
        import MedFM
        from MedFMLib.interaction.background import BackgroundEncoder
        from MedFMLib.mrml.bridge import ensure_segment, volume_from_node
        from MedFMLib.mrml.prompt_sync import PromptSync

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        modelName = MedFM.settingsValue("modelName", "classic")
        device = MedFM.settingsValue("device", "auto")
        intensity = MedFM.settingsValue("intensity", "viewer")
        # The image data's time stamp changes when the voxels do (not when the display does).
        image = volumeNode.GetImageData() if volumeNode else None
        self.logic.applyRuntimeSettings()  # the module's Runtime and Fast choices
        key = (volumeNode.GetID() if volumeNode else None, image.GetMTime() if image else 0, modelName,
               device, intensity, self.logic.serverUrl, self.logic.runtime, self.logic.fast)  # fmt: skip
        if self.session is not None and key == self.sessionKey:
            return self.session
        volume = volume_from_node(volumeNode)
        if not self.logic.isRemote and not self.ensureModel(modelName):
            return None
        if self.encoder is not None:
            self.encoder.stop()
        if self.session is not None and hasattr(self.session, "close"):
            self.session.close()  # the previous remote session: free the server's memory
        with slicer.util.WaitCursor():  # loading a model, or uploading the volume to the server
            self.session = self.logic.createSession(
                volume, modelName, device, self.logic.intensityWindow(volumeNode, intensity)
            )
        engine = self.session.engine
        self.sessionKey = key
        self.objectId = self.session.add_object()
        self.sync = PromptSync(self.session, self.objectId)
        self.encoder = BackgroundEncoder(self.session)
        self.previewSegmentId = ensure_segment(self.previewNode, "preview")
        where = f" at {self.logic.serverUrl}" if self.logic.isRemote else ""
        self.ui.modelLabel.text = f"{modelName} on {engine.device}{where}"
        return self.session

    def ensureModel(self, modelName):
        """Ask before installing packages or downloading weights; False if the user declined."""
        info = self.logic.store.info(modelName)
        if not self.logic.ensureDependencies(info.engine):
            self.setStatus(f"{modelName} needs packages that are not installed.")
            return False
        if self.logic.isModelReady(modelName):
            return True
        if not slicer.util.confirmOkCancelDisplay(
            f"{modelName} is not downloaded yet. Download it now? ({info.license} licence)", windowTitle="MedFM"
        ):
            self.setStatus(f"{modelName} is not downloaded yet: download it in the MedFM module.")
            return False
        return slicer.modules.medfm.widgetRepresentation().self().downloadWithProgress(modelName)

    # ----------------------------------------------------------- interaction
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            action = KEY_ACTIONS.get(callerInteractor.GetKeySym())
            if action in self.modeButtons:
                self.setMode(action)
            elif action is not None:
                {"undo": self.onUndo, "redo": self.onRedo, "apply": self.onApply}[action]()
            return action is not None
        if eventId == vtk.vtkCommand.LeftButtonPressEvent and self.job is not None:
            self.setStatus("Propagating: wait for it, or stop it, before adding prompts.")
            return True
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            ras = self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
            if self.isNearControlPoint(ras, viewWidget):
                return False  # let Slicer's markups drag the point
            sliceNode = viewWidget.sliceLogic().GetSliceNode()
            if self.mode == "box":
                self.boxStart, self.boxView = ras, sliceNode
                return True
            positive = self.mode == "positive" and not callerInteractor.GetShiftKey()
            self.addPointPrompt(ras, positive, sliceNode)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self.boxStart is not None:
            from MedFMLib.mrml.bridge import set_roi_corners

            end = self.scriptedEffect.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
            start, self.boxStart = self.boxStart, None
            set_roi_corners(self.roiNode, start, end, thickness_mm=self._sliceSpacing())
            self.requestSync()
            return True
        return False

    def _sliceSpacing(self):
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        return min(volumeNode.GetSpacing()) if volumeNode else 1.0

    def isNearControlPoint(self, ras, viewWidget):
        sliceNode = viewWidget.sliceLogic().GetSliceNode()
        millimetresPerPixel = sliceNode.GetFieldOfView()[0] / max(sliceNode.GetDimensions()[0], 1)
        for node in (self.positiveNode, self.negativeNode):
            if node is None:
                continue
            for index in range(node.GetNumberOfControlPoints()):
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                if np.linalg.norm(np.subtract(position, ras)) < GRAB_RADIUS_PIXELS * millimetresPerPixel:
                    return True
        return False

    def addPointPrompt(self, ras, positive=True, sliceNode=None):
        """Add a click at a RAS position; the slice view's normal decides the slice axis."""
        self.ensureMarkups()
        node = self.positiveNode if positive else self.negativeNode
        index = node.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in ras]))
        if self.ensureSessionOrReport() is None:
            node.RemoveNthControlPoint(index)
            return
        if sliceNode is not None:
            sliceToRas = sliceNode.GetSliceToRAS()
            normal = [sliceToRas.GetElement(row, 2) for row in range(3)]
            self.sync.set_view(node, node.GetNthControlPointID(index), normal)
        self.requestSync()

    def ensureSessionOrReport(self):
        from MedFMLib.errors import MedFMError

        try:
            return self.ensureSession()
        except MedFMError as error:
            self.setStatus(str(error))
            return None

    # ----------------------------------------------- encoding, then decoding
    def neededPlanes(self):
        """The planes the current prompts lie on (their embeddings must exist before decoding)."""
        return self.sync.prompted_planes(self.positiveNode, self.negativeNode)

    def requestSync(self):
        if self.ensureSessionOrReport() is None:
            return
        planes = self.neededPlanes()
        missing = [p for p in planes if not self.encoder.is_ready(p)]
        wanted = missing + [n for p in planes[-1:] for n in self.encoder.neighbours(p, NEIGHBOURS_TO_PREFETCH)]
        self.encoder.request(wanted)
        self.showEncoding(bool(missing))
        if missing:
            self.pollTimer.start()
        else:
            self.decodeNow()

    def showEncoding(self, busy):
        self.ui.encodingProgressBar.visible = busy
        self.ui.cancelEncodingButton.visible = busy

    def onPoll(self):
        from MedFMLib.mrml.logic import isOutOfMemory

        planes = self.neededPlanes()
        for plane in planes:
            failure = self.encoder.failure(plane)
            if failure is not None:
                self.pollTimer.stop()
                self.showEncoding(False)
                self.reportFailure(failure, isOutOfMemory(failure))
                return
        if all(self.encoder.is_ready(p) for p in planes):
            self.pollTimer.stop()
            self.showEncoding(False)
            self.decodeNow()

    def reportFailure(self, failure, outOfMemory):
        import MedFM

        if outOfMemory and slicer.util.confirmYesNoDisplay(
            "The GPU ran out of memory. Use the CPU instead? (slower, but it works)", windowTitle="MedFM"
        ):
            MedFM.setSettingsValue("device", "cpu")
            self.requestSync()
            return
        self.setStatus(f"Encoding failed: {failure}")

    def onCancelEncoding(self):
        self.pollTimer.stop()
        if self.encoder is not None:
            self.encoder.cancel()
        self.showEncoding(False)
        self.setStatus("Encoding stopped; click again to resume.")

    def waitForEncoding(self, timeoutSeconds=120):
        """Process events until the prompts are decoded (for the self-test)."""
        import time

        deadline = time.monotonic() + timeoutSeconds
        while self.pollTimer.isActive() and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.01)

    def decodeNow(self):
        from MedFMLib.errors import MedFMError

        try:
            updates, rejected = self.sync.sync(self.positiveNode, self.negativeNode)
            view = self.boxView.GetSliceToRAS() if self.boxView is not None else None
            normal = [view.GetElement(row, 2) for row in range(3)] if view is not None else None
            self.sync.sync_box(self.roiNode, normal)
        except MedFMError as error:
            self.setStatus(str(error))
            return
        for item in rejected:
            node = slicer.mrmlScene.GetNodeByID(item.node_id)
            node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(item.point_id))
        self.setStatus(rejected[-1].message if rejected else "")
        self.refreshPreview()
        self.colourPreview()
        self.repropagateCorrections(updates)

    def refreshPreview(self):
        from MedFMLib.mrml.bridge import set_segment_mask

        set_segment_mask(self.previewNode, self.previewSegmentId, self.previewMask(), self.session.volume)

    def colourPreview(self):
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segment = segmentationNode.GetSegmentation().GetSegment(
            self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        )
        if segment is not None:
            self.previewNode.GetSegmentation().GetSegment(self.previewSegmentId).SetColor(segment.GetColor())

    def previewMask(self):
        if self.session is None:
            return np.zeros((1, 1, 1), dtype=bool)
        return self.session.mask(self.objectId)

    # ------------------------------------------------------------- commands
    def onUndo(self):
        if self.session is not None and self.job is None and self.session.can_undo:
            self.session.undo()
            self.afterHistoryChange()

    def onRedo(self):
        if self.session is not None and self.job is None and self.session.can_redo:
            self.session.redo()
            self.afterHistoryChange()

    def afterHistoryChange(self):
        """Redraw the markups and the preview from the session."""
        self.sync.rebuild(self.positiveNode, self.negativeNode, self.roiNode)
        self.refreshPreview()

    def onClear(self):
        if self.session is not None:
            self.session.clear_object(self.objectId)
            self.afterHistoryChange()

    def onApply(self):
        """Write the preview into the selected segment, with masking, overwrite and Slicer's undo."""
        from MedFMLib.errors import MedFMError
        from MedFMLib.mrml.bridge import write_segment

        if self.session is None or not self.session.objects[self.objectId].slices:
            self.setStatus("Nothing to apply: click on the object first.")
            return
        if self.job is not None:
            self.setStatus("Propagating: wait for it, or stop it, before applying.")
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        self.scriptedEffect.saveStateForUndo()
        try:
            write_segment(
                self.postProcessedMask(),
                self.session.volume,
                parameterSetNode.GetSegmentationNode(),
                parameterSetNode.GetSelectedSegmentID(),
                region=self.sync.touched_region(),
                editor_node=parameterSetNode,
                source_volume_node=parameterSetNode.GetSourceVolumeNode(),
            )
        except MedFMError as error:
            self.setStatus(str(error))
            return
        self.resetPrompts()
        self.setStatus("Applied.")

    def postProcessedMask(self):
        """The preview with the chosen clean-ups: keep the parts the prompts touch, fill holes."""
        from MedFMLib.interaction.cleanup import cleaned_mask

        return cleaned_mask(self.session, self.objectId, self.ui.keepConnectedCheckBox.checked,
                            self.ui.fillHolesCheckBox.checked)  # fmt: skip

    # ----------------------------------------------------------- propagation
    def onPropagate(self, direction):
        """Carry the segmentation up, down or both ways along the axis of the newest prompted slice."""
        from MedFMLib.errors import MedFMError

        if self.job is not None or self.ensureSessionOrReport() is None:
            return
        try:
            axis = self.session.propagation_axis(self.objectId)
        except MedFMError as error:
            self.setStatus(str(error))
            return
        if direction in ("up", "down"):
            # "Up" is towards higher R, A or S along the patient axis this IJK axis follows most.
            column = self.session.volume.ijk_to_ras[:3, axis]
            increasing = column[int(np.argmax(np.abs(column)))] > 0
            direction = "forward" if increasing == (direction == "up") else "backward"
        # The session plans (locally, or on the server) without changing anything; the result is applied here.
        session, objectId = self.session, self.objectId
        self.startPropagation(
            lambda progress, cancelled: session.plan_propagation(
                objectId, direction, view=axis, progress=progress, cancel=cancelled
            )
        )

    def onPropagateWithinBox(self):
        """Segment every slice the box spans, from its middle slice outwards."""
        from MedFMLib.errors import MedFMError
        from MedFMLib.mrml.bridge import roi_corners

        if self.job is not None or self.ensureSessionOrReport() is None:
            return
        try:
            corners = roi_corners(self.roiNode)
        except MedFMError as error:
            self.setStatus(str(error))
            return
        view = self.boxView.GetSliceToRAS() if self.boxView is not None else None
        normal = [view.GetElement(row, 2) for row in range(3)] if view is not None else "axial"
        session, objectId = self.session, self.objectId
        self.startPropagation(
            lambda progress, cancelled: session.plan_roi(objectId, corners, normal, progress=progress, cancel=cancelled)
        )

    def repropagateCorrections(self, updates):
        """A click on a propagated slice: propagate again from there, only as far as the change matters."""
        if self.job is not None:
            return
        from MedFMLib.interaction.cleanup import corrected_planes

        corrected = corrected_planes(self.session.objects[self.objectId].slices, updates)
        if corrected:
            session, objectId, plane = self.session, self.objectId, corrected[-1]
            self.startPropagation(
                lambda progress, cancelled: session.plan_propagation(
                    objectId, "both", view=plane.axis, start=plane.index, until_converged=True,
                    progress=progress, cancel=cancelled,
                )  # fmt: skip
            )

    def startPropagation(self, work):
        from MedFMLib.interaction.background import PropagationJob

        if self.encoder is not None:
            self.encoder.cancel()  # the propagation needs the device more than prefetching does
        self.job = PropagationJob(work)
        self.ui.propagationProgressBar.value = 0
        self.ui.propagationProgressBar.visible = True
        self.ui.cancelPropagationButton.visible = True
        self.setStatus("Propagating...")
        self.propagationTimer.start()

    def onPropagationPoll(self):
        from MedFMLib.errors import MedFMError
        from MedFMLib.mrml.logic import isOutOfMemory

        job = self.job
        if job is None:
            self.propagationTimer.stop()
            return
        self.ui.propagationProgressBar.maximum = max(1, job.total)
        self.ui.propagationProgressBar.value = job.done
        if not job.finished:
            return
        self.propagationTimer.stop()
        self.job = None
        self.ui.propagationProgressBar.visible = False
        self.ui.cancelPropagationButton.visible = False
        if job.failure is not None:
            if isinstance(job.failure, MedFMError):
                self.setStatus(str(job.failure))
            elif isOutOfMemory(job.failure):
                self.setStatus("The GPU ran out of memory while propagating; choose the CPU in the MedFM module.")
            else:
                self.setStatus(f"Propagation failed: {job.failure}")
            return
        self.session.apply_propagation(job.result)
        self.sync.rebuild(self.positiveNode, self.negativeNode, self.roiNode)
        self.refreshPreview()
        self.colourPreview()
        lines = job.result.describe()
        self.setStatus(f"{job.result.slices_written} slices. " + " ".join(lines) if lines else "Nothing to propagate.")

    def waitForPropagation(self, timeoutSeconds=300):
        """Process events until the propagation is applied (for the self-test)."""
        import time

        deadline = time.monotonic() + timeoutSeconds
        while self.job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.01)

    def onCancelPropagation(self):
        if self.job is not None:
            self.job.cancel()  # the slices done so far are applied; undo removes them

    def onCancel(self):
        """Drop prompts and preview; the segment was never touched."""
        if self.job is not None:
            self.job.cancel()
            self.job.wait()
            self.job = None
            self.propagationTimer.stop()
            self.ui.propagationProgressBar.visible = False
            self.ui.cancelPropagationButton.visible = False
        self.resetPrompts()

    def resetPrompts(self):
        from MedFMLib.mrml.prompt_sync import PromptSync

        if hasattr(self, "pollTimer"):
            self.pollTimer.stop()
        if self.session is not None:
            self.session.remove_object(self.objectId)
            self.objectId = self.session.add_object()
            self.sync = PromptSync(self.session, self.objectId)
            self.afterHistoryChange()
