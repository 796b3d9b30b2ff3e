"""The interaction controller: what a user does in the slice views, turned into session calls, on MRML.

The Segment Editor effect and ``medfm app`` are skins over this class; it holds no Qt. A front end

- forwards events: ``pressAt``/``releaseAt`` with the RAS position and the slice node, ``handleKey``, and its
  buttons' commands (``undo``, ``propagate("up")``, ``apply``...);
- calls ``poll()`` from a timer (about every 50 ms): that finishes what runs on worker threads (the encodings a
  click waits for, then its decode; a dragged point's decode; propagation jobs);
- reads the state for display: ``status``, ``encoding``, ``propagating``, ``progress``, ``canUndo``... and is
  told of changes through ``onChanged``.

Questions for the user (install or download a model? use the CPU after the GPU ran out of memory?) go
through callbacks, so each front end asks in its own way and tests answer them directly. Prompts live in
markups nodes, so users drag and delete them with Slicer's own tools; ``PromptSync`` replays their changes on
the session. Names are camelCase, as in Slicer-facing classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import vtk

from ..errors import MedFMError
from .bridge import ensure_segment, set_roi_corners, set_segment_mask, volume_from_node
from .controller_propagation import PropagationCommands
from .controls import (  # noqa: F401 - the front ends import these from here
    DRAG_DECODE_SECONDS,
    GRAB_RADIUS_PIXELS,
    KEY_ACTIONS,
    MODES,
    NEIGHBOURS_TO_PREFETCH,
    STROKE_MODES,
    ControllerSettings,
    StrokeTool,
    sliceNormal,
)
from .logic import isOutOfMemory


class InteractionController(PropagationCommands):
    def __init__(
        self,
        logic,
        editorNode,
        settings: Callable[[], ControllerSettings] | ControllerSettings | None = None,
        ask: Callable[[str], bool] | None = None,
        prepareModel: Callable[[str], bool] | None = None,
        saveUndoState: Callable[[], None] | None = None,
        onDeviceFallback: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``editorNode``: a vtkMRMLSegmentEditorNode (source volume, segmentation, selected segment, masking).

        ``ask(question)`` answers yes/no questions (default: no); ``prepareModel(name)`` makes a model usable
        (install, download), returning False when the user declined; ``saveUndoState`` is called before Apply
        changes the segmentation; ``onDeviceFallback(device)`` is told when the user moved to the CPU."""
        self.logic = logic
        self.editorNode = editorNode
        self._settings = settings if settings is not None else ControllerSettings()
        self.ask = ask or (lambda question: False)
        self.prepareModel = prepareModel or self._modelIsReady
        self.saveUndoState = saveUndoState or (lambda: None)
        self.onDeviceFallback = onDeviceFallback or (lambda device: None)
        self.onChanged: Callable[[], None] = lambda: None
        self.clock = clock
        self.mode = "positive"
        self.status = ""
        self.session = self.sessionKey = self.objectId = self.sync = self.encoder = None
        self.job = None  # a propagation running on a worker thread
        self.encoding = False
        self.modelDescription = ""
        self.positiveNode = self.negativeNode = self.roiNode = self.previewNode = None
        self.previewSegmentId = None
        self._observations: list = []
        self._boxStart = None
        self._boxView = None  # the slice node the box was drawn in
        self._dragSince: float | None = None
        self._deviceOverride: tuple[str, str] | None = None  # (the device chosen, the one used instead)
        self.stroke = StrokeTool(self)
        self.pendingNote = ""  # said once the prompts it concerns are decoded (a scribble that became clicks)

    # ------------------------------------------------------------------ state
    scene = property(lambda self: self.editorNode.GetScene())

    @property
    def settings(self) -> ControllerSettings:
        settings = self._settings() if callable(self._settings) else self._settings
        # After running out of memory the user chose the CPU, for as long as the device setting stays as it was.
        if self._deviceOverride is not None and settings.device == self._deviceOverride[0]:
            settings.device = self._deviceOverride[1]
        else:
            self._deviceOverride = None
        return settings

    propagating = property(lambda self: self.job is not None)

    @property
    def busy(self) -> bool:
        return self.encoding or self.propagating or self._dragSince is not None

    @property
    def progress(self) -> tuple[int, int]:
        """(slices done, slices planned) of the running propagation."""
        return (self.job.done, self.job.total) if self.job is not None else (0, 0)

    @property
    def hasPrompts(self) -> bool:
        return self.session is not None and self.session.has_prompts(self.objectId)

    @property
    def volumetric(self) -> bool:
        """The model answers in 3D (nnInteractive, VISTA3D): no propagation; strokes where it takes them."""
        return getattr(self.session, "volumetric", False)

    @property
    def canUndo(self) -> bool:
        return self.session is not None and not self.propagating and self.session.can_undo

    @property
    def canRedo(self) -> bool:
        return self.session is not None and not self.propagating and self.session.can_redo

    @property
    def canApply(self) -> bool:
        return self.hasPrompts and not self.propagating

    @property
    def canPropagate(self) -> bool:
        return self.hasPrompts and not self.propagating and not self.volumetric

    def setMode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        self._changed()

    def setStatus(self, text: str) -> None:
        self.status = text
        self._changed()

    def _changed(self) -> None:
        self.onChanged()

    # --------------------------------------------------------------- markups
    def ensureMarkups(self) -> None:
        """The prompt markups and the preview segmentation, made once per scene."""
        if self.positiveNode is not None and self.positiveNode.GetScene() is not None:
            return
        self.removeMarkups()  # a closed scene took them: start clean
        self.positiveNode = self._markupsNode("vtkMRMLMarkupsFiducialNode", "MedFM +", (0.1, 0.9, 0.1))
        self.negativeNode = self._markupsNode("vtkMRMLMarkupsFiducialNode", "MedFM -", (0.95, 0.15, 0.15))
        self.roiNode = self._markupsNode("vtkMRMLMarkupsROINode", "MedFM box", (1.0, 0.85, 0.1))
        self.previewNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedFM preview")
        self.previewNode.SetHideFromEditors(True)
        self.previewNode.SetSaveWithScene(False)
        self.previewNode.CreateDefaultDisplayNodes()
        self.previewNode.GetDisplayNode().SetOpacity2DFill(0.45)
        self.previewSegmentId = None
        for node in (self.positiveNode, self.negativeNode, self.roiNode):
            for event in (node.PointEndInteractionEvent, node.PointRemovedEvent):
                self._observations.append((node, node.AddObserver(event, lambda *args: self.requestSync())))
            self._observations.append((node, node.AddObserver(node.PointModifiedEvent, self._onPointModified)))

    def _markupsNode(self, className: str, name: str, color):
        node = self.scene.AddNewNodeByClass(className, name)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetPointLabelsVisibility(False)
        node.SetMarkupLabelFormat("")
        return node

    def removeMarkups(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        for node in (self.positiveNode, self.negativeNode, self.roiNode, self.previewNode):
            if node is not None and node.GetScene() is not None:
                node.GetScene().RemoveNode(node)
        self.positiveNode = self.negativeNode = self.roiNode = self.previewNode = None

    def _onPointModified(self, *args) -> None:
        # A dragged point: decode a few times a second (in poll), not at every mouse move.
        if self._dragSince is None:
            self._dragSince = self.clock()

    # --------------------------------------------------------------- session
    def ensureSession(self):
        """The session for the source volume and the chosen model, device and intensity (made on demand).

        A new session replays the markups' prompts, so changing the model or device keeps the user's clicks."""
        from ..interaction.background import BackgroundEncoder
        from .prompt_sync import PromptSync

        volumeNode = self.editorNode.GetSourceVolumeNode()
        if volumeNode is None:
            raise MedFMError("No source volume: choose the volume to segment first.")
        settings = self.settings
        image = volumeNode.GetImageData()  # its time stamp changes when the voxels do, not the display
        logic = self.logic
        key = (volumeNode.GetID(), image.GetMTime() if image else 0, settings.modelName, settings.device,
               settings.intensity, logic.serverUrl, logic.runtime, logic.fast, logic.zoom)  # fmt: skip
        if self.session is not None and key == self.sessionKey:
            return self.session
        volume = volume_from_node(volumeNode)
        said = self.status
        if not logic.isRemote and not self.prepareModel(settings.modelName):
            if self.status == said:  # the front end said nothing of why
                self.setStatus(f"{settings.modelName} is not ready: download it in the MedFM module.")
            return None
        self._closeSession()
        window = logic.intensityWindow(volumeNode, settings.intensity)
        self.session = logic.createSession(volume, settings.modelName, settings.device, window)
        self.sessionKey = key
        self.objectId = self.session.add_object()
        self.sync = PromptSync(self.session, self.objectId)
        self.encoder = BackgroundEncoder(self.session)
        self.ensureMarkups()
        self.previewSegmentId = ensure_segment(self.previewNode, "preview")
        where = f" at {logic.serverUrl}" if logic.isRemote else ""
        self.modelDescription = f"{settings.modelName} on {self.session.engine.device}{where}"
        self._changed()
        return self.session

    def _modelIsReady(self, modelName: str) -> bool:
        if self.logic.isModelReady(modelName):
            return True
        self.setStatus(f"{modelName} is not downloaded yet: download it first (medfm models download {modelName}).")
        return False

    def _closeSession(self) -> None:
        if self.encoder is not None:
            self.encoder.stop()
            self.encoder = None
        if self.session is not None and hasattr(self.session, "close"):
            try:
                self.session.close()  # a remote session: free the server's memory now
            except MedFMError:
                pass  # the server is gone: it frees the session when it expires
        self.session = self.sessionKey = None

    def _sessionOrReport(self):
        try:
            return self.ensureSession()
        except MedFMError as error:
            self.setStatus(str(error))
            return None

    # ----------------------------------------------------------- interaction
    def handleKey(self, keySym: str) -> bool:
        """A key pressed in a slice view; True when it was MedFM's."""
        action = KEY_ACTIONS.get(keySym)
        if action in MODES:
            self.setMode(action)
        elif action is not None:
            {"undo": self.undo, "redo": self.redo, "apply": self.apply}[action]()
        return action is not None

    def pressAt(self, ras, sliceNode=None, shift: bool = False) -> bool:
        """A left-button press at a RAS position in a slice view; True when MedFM took it.

        A press near a control point is left to Slicer's markups, which drag the point."""
        if self.propagating:
            self.setStatus("Propagating: wait for it, or stop it, before adding prompts.")
            return True
        if sliceNode is not None and self.isNearControlPoint(ras, sliceNode):
            return False
        if self.mode == "box":
            self._boxStart, self._boxView = np.asarray(ras, float), sliceNode
            return True
        if self.mode in STROKE_MODES:
            self.stroke.start(self.mode, ras, sliceNode, positive=not shift)
            return True
        self.addPoint(ras, positive=self.mode == "positive" and not shift, sliceNode=sliceNode)
        return True

    def moveAt(self, ras) -> bool:
        """A mouse move with the button held: extends a stroke being drawn; True when MedFM took it."""
        if not self.stroke.active:
            return False
        self.stroke.extend(ras)
        return True

    def releaseAt(self, ras) -> bool:
        """A left-button release: ends a box drawn in box mode, or a scribble or lasso."""
        if self.stroke.active:
            self.addStroke(*self.stroke.finish(ras))
            return True
        if self._boxStart is None:
            return False
        start, self._boxStart = self._boxStart, None
        self.setBox(start, ras, self._boxView)
        return True

    def isNearControlPoint(self, ras, sliceNode) -> bool:
        millimetresPerPixel = sliceNode.GetFieldOfView()[0] / max(sliceNode.GetDimensions()[0], 1)
        for node in (self.positiveNode, self.negativeNode):
            for index in range(node.GetNumberOfControlPoints() if node is not None else 0):
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                if np.linalg.norm(np.subtract(position, ras)) < GRAB_RADIUS_PIXELS * millimetresPerPixel:
                    return True
        return False

    def addPoint(self, ras, positive: bool = True, sliceNode=None) -> None:
        """A click at a RAS position; the slice view's normal decides the slice axis it prompts."""
        self.ensureMarkups()
        if self._sessionOrReport() is None:
            return
        node = self.positiveNode if positive else self.negativeNode
        index = node.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in ras]))
        if sliceNode is not None:
            self.sync.set_view(node, node.GetNthControlPointID(index), sliceNormal(sliceNode))
        self.requestSync()

    def setBox(self, start, end, sliceNode=None) -> None:
        """A box dragged from ``start`` to ``end`` (RAS) in a slice view."""
        self.ensureMarkups()
        self._boxView = sliceNode if sliceNode is not None else self._boxView
        volumeNode = self.editorNode.GetSourceVolumeNode()
        thickness = min(volumeNode.GetSpacing()) if volumeNode is not None else 1.0
        set_roi_corners(self.roiNode, start, end, thickness_mm=thickness)
        self.requestSync()

    def addStroke(self, kind: str, points, sliceNode=None, positive: bool = True) -> None:
        """A scribble or lasso (RAS points) drawn in a slice view, for the 3D models that take it."""
        from .volume_commands import addStroke

        addStroke(self, kind, points, sliceNode, positive)

    def setClass(self, className: str) -> None:
        """A class prompt ("liver"): the model segments that class in the whole volume; clicks refine it."""
        from .volume_commands import setClass

        setClass(self, className)

    # ----------------------------------------------- encoding, then decoding
    def requestSync(self) -> None:
        """Decode the markups' prompts now, or once the slices they lie on are encoded (on the worker)."""
        self._dragSince = None
        if self._sessionOrReport() is None:
            return
        planes = self._promptedItems()
        missing = [p for p in planes if not self.encoder.is_ready(p)]
        wanted = missing + [n for p in planes[-1:] if not isinstance(p, tuple)
                            for n in self.encoder.neighbours(p, NEIGHBOURS_TO_PREFETCH)]  # fmt: skip
        self.encoder.request(wanted)
        self.encoding = bool(missing)
        self._changed()
        if not missing:
            self.decodeNow()

    def poll(self) -> None:
        """Finish what worker threads have done: call from the front end's timer."""
        if self._dragSince is not None and self.clock() - self._dragSince >= DRAG_DECODE_SECONDS:
            self.requestSync()
        if self.encoding:
            self._pollEncoding()
        if self.job is not None:
            self._pollPropagation()

    def _promptedItems(self) -> list:
        """The planes the prompts lie on, and the box's plane and the crop the zoom wants around it (zoom.py)."""
        planes = self.sync.prompted_planes(self.positiveNode, self.negativeNode)
        roi = self.roiNode
        if roi is None or roi.GetNumberOfDefinedControlPoints() == 0 or getattr(self.session, "volumetric", False):
            return planes
        from ..interaction.zoom import box_encodings

        view = sliceNormal(self._boxView) if self._boxView is not None else None
        try:
            return planes + box_encodings(self.session, *self.sync.box_of_roi(roi, view))
        except MedFMError:
            return planes  # decodeNow says what is wrong with the box

    def _pollEncoding(self) -> None:
        planes = self._promptedItems()
        for plane in planes:
            failure = self.encoder.failure(plane)
            if failure is not None:
                self.encoding = False
                self._reportFailure(failure)
                return
        if all(self.encoder.is_ready(p) for p in planes):
            self.encoding = False
            self.decodeNow()

    def _reportFailure(self, failure: BaseException) -> None:
        device = self.settings.device
        if isOutOfMemory(failure) and device != "cpu" and self.ask(
            "The GPU ran out of memory. Use the CPU instead? (slower, but it works)"
        ):
            self._deviceOverride = (device, "cpu")
            self.onDeviceFallback("cpu")
            self.requestSync()  # a new session on the CPU replays the same prompts
            return
        self.setStatus(f"Encoding failed: {failure}")

    def cancelEncoding(self) -> None:
        if self.encoder is not None:
            self.encoder.cancel()
        self.encoding = False
        self.setStatus("Encoding stopped; click again to resume.")

    def decodeNow(self) -> None:
        try:
            updates, rejected = self.sync.sync(self.positiveNode, self.negativeNode)
            self.sync.sync_box(self.roiNode, sliceNormal(self._boxView) if self._boxView is not None else None)
        except MedFMError as error:
            self.setStatus(str(error))
            return
        for item in rejected:
            node = self.scene.GetNodeByID(item.node_id)
            node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(item.point_id))
        notes = [update.note for update in updates if update.note]  # a click the model could not answer
        self.status = rejected[-1].message if rejected else notes[-1] if notes else self.pendingNote
        self.pendingNote = ""
        self.refreshPreview()
        self._repropagateCorrections(updates)
        self._changed()

    def previewMask(self) -> np.ndarray:
        if self.session is None:
            return np.zeros((1, 1, 1), dtype=bool)
        return self.session.mask(self.objectId)

    def refreshPreview(self) -> None:
        """The preview segmentation shows the session's mask, in the selected segment's colour."""
        if self.session is None or self.previewNode is None:
            return
        set_segment_mask(self.previewNode, self.previewSegmentId, self.previewMask(), self.session.volume)
        segmentation = self.editorNode.GetSegmentationNode()
        segment = segmentation.GetSegmentation().GetSegment(self.editorNode.GetSelectedSegmentID() or "")
        if segment is not None:
            self.previewNode.GetSegmentation().GetSegment(self.previewSegmentId).SetColor(segment.GetColor())

    # ------------------------------------------------------------- commands
    def undo(self) -> None:
        if self.canUndo:
            self.session.undo()
            self._afterHistoryChange()

    def redo(self) -> None:
        if self.canRedo:
            self.session.redo()
            self._afterHistoryChange()

    def clear(self) -> None:
        if self.session is not None and not self.propagating:
            self.session.clear_object(self.objectId)
            self._afterHistoryChange()

    def _afterHistoryChange(self) -> None:
        """Redraw the markups and the preview from the session."""
        self.sync.rebuild(self.positiveNode, self.negativeNode, self.roiNode)
        self._dragSince = None  # rebuilding the markups is not a drag
        self.refreshPreview()
        self._changed()

    def apply(self) -> bool:
        """Write the preview into the selected segment, with the editor's masking and overwrite; True if written."""
        from ..interaction.cleanup import cleaned_mask
        from .bridge import write_segment

        if not self.hasPrompts:
            self.setStatus("Nothing to apply: click on the object first.")
            return False
        if self.propagating:
            self.setStatus("Propagating: wait for it, or stop it, before applying.")
            return False
        settings = self.settings
        self.saveUndoState()
        try:
            write_segment(
                cleaned_mask(self.session, self.objectId, settings.keepConnected, settings.fillHoles),
                self.session.volume,
                self.editorNode.GetSegmentationNode(),
                self.editorNode.GetSelectedSegmentID(),
                region=self.sync.touched_region(),
                editor_node=self.editorNode,
                source_volume_node=self.editorNode.GetSourceVolumeNode(),
            )
        except MedFMError as error:
            self.setStatus(str(error))
            return False
        self.resetPrompts()
        self.setStatus("Applied.")
        return True

    def cancel(self) -> None:
        """Drop prompts and preview; the segment was never touched."""
        if self.job is not None:
            self.job.cancel()
            self.job.wait()
            self.job = None
        self.resetPrompts()
        self._changed()

    def resetPrompts(self) -> None:
        from .prompt_sync import PromptSync

        self.encoding = False
        if self.session is not None:
            try:
                self.session.remove_object(self.objectId)
                self.objectId = self.session.add_object()
            except MedFMError as error:  # a server that went away: start afresh on the next click
                self.setStatus(str(error))
                self._closeSession()
                self.removeMarkups()
                self.ensureMarkups()
                return
            self.sync = PromptSync(self.session, self.objectId)
            self.stroke.clear()
            self._afterHistoryChange()

    def close(self) -> None:
        """The front end goes away (effect deactivated, window closed): stop workers, drop markups."""
        self.cancel()
        self.removeMarkups()
        self.stroke.remove()
        self._closeSession()

    # ---------------------------------------------------------------- waiting
    def waitUntilIdle(self, timeoutSeconds: float = 120.0, pump: Callable[[], None] | None = None) -> bool:
        """Poll until no encoding, drag or propagation is pending (scripts, self-tests, replays); True if idle.

        ``pump`` runs the front end's event loop between polls (Qt's processEvents)."""
        deadline = time.monotonic() + timeoutSeconds
        while self.busy and time.monotonic() < deadline:
            if pump is not None:
                pump()
            self.poll()
            time.sleep(0.01)
        return not self.busy
