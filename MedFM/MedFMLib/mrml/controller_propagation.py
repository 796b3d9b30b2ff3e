"""The controller's propagation commands: up, down, both ways, within a box, and after a correction.

A mixin of :class:`~MedFMLib.mrml.controller.InteractionController`, kept in its own module: the session
plans on a worker thread (locally, or on the server) and ``poll()`` applies the result on the main thread.
"""

from __future__ import annotations

import numpy as np

from ..errors import MedFMError
from .controls import sliceNormal
from .logic import isOutOfMemory


class PropagationCommands:
    def propagate(self, direction: str) -> None:
        """Carry the segmentation up, down or both ways along the axis of the newest prompted slice."""
        if self.propagating or self._sessionOrReport() is None or self._explainNoPropagation():
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
        session, objectId = self.session, self.objectId
        self._startPropagation(
            lambda progress, cancelled: session.plan_propagation(
                objectId, direction, view=axis, progress=progress, cancel=cancelled
            )
        )

    def propagateWithinBox(self) -> None:
        """Segment every slice the box spans, from its middle slice outwards."""
        from .bridge import roi_corners

        if self.propagating or self._sessionOrReport() is None or self._explainNoPropagation():
            return
        try:
            corners = roi_corners(self.roiNode)
        except MedFMError as error:
            self.setStatus(str(error))
            return
        normal = sliceNormal(self._boxView) if self._boxView is not None else "axial"
        session, objectId = self.session, self.objectId
        self._startPropagation(
            lambda progress, cancelled: session.plan_roi(objectId, corners, normal, progress=progress, cancel=cancelled)
        )

    def _explainNoPropagation(self) -> bool:
        if self.volumetric:
            self.setStatus(f"{self.settings.modelName} answers in 3D already: nothing to propagate. "
                           "Click where the result needs correcting.")  # fmt: skip
        return self.volumetric

    def _repropagateCorrections(self, updates) -> None:
        """A click on a propagated slice: propagate again from there, only as far as the change matters."""
        from ..interaction.cleanup import corrected_planes

        if self.propagating or self.volumetric:
            return
        corrected = corrected_planes(self.session.objects[self.objectId].slices, updates)
        if corrected:
            session, objectId, plane = self.session, self.objectId, corrected[-1]
            self._startPropagation(
                lambda progress, cancelled: session.plan_propagation(
                    objectId, "both", view=plane.axis, start=plane.index, until_converged=True,
                    progress=progress, cancel=cancelled,
                )  # fmt: skip
            )

    def _startPropagation(self, work) -> None:
        from ..interaction.background import PropagationJob

        if self.encoder is not None:
            self.encoder.cancel()  # the propagation needs the device more than prefetching does
        # The session plans (locally, or on the server) without changing anything; poll() applies the result.
        self.job = PropagationJob(work)
        self.setStatus("Propagating...")

    def cancelPropagation(self) -> None:
        """Stop the walk: the slices done so far are applied, and undo removes them."""
        if self.job is not None:
            self.job.cancel()

    def _pollPropagation(self) -> None:
        job = self.job
        if not job.finished:
            self._changed()  # progress moved
            return
        self.job = None
        if job.failure is not None:
            if isinstance(job.failure, MedFMError):
                self.setStatus(str(job.failure))
            elif isOutOfMemory(job.failure):
                self.setStatus("The GPU ran out of memory while propagating; choose the CPU and propagate again.")
            else:
                self.setStatus(f"Propagation failed: {job.failure}")
            return
        self.session.apply_propagation(job.result)
        self.sync.rebuild(self.positiveNode, self.negativeNode, self.roiNode)
        self._dragSince = None
        self.refreshPreview()
        lines = job.result.describe()
        self.setStatus(f"{job.result.slices_written} slices. " + " ".join(lines) if lines else "Nothing to propagate.")

