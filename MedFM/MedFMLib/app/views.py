"""Slicer's own slice views in a Qt widget: a slice logic, Slicer's displayable managers and interactor style.

Each view draws the background volume through the slice logic's image (slicer-core has no CTK image
renderer, so a ``vtkImageMapper`` shows it), and the segmentations, markups and crosshair through Slicer's
displayable managers. Mouse presses in MedFM's modes go to the interaction controller; everything else
(window/level, the wheel through slices, dragging control points) is Slicer's interactor style.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .scene import SLICE_DISPLAYABLE_MANAGERS, AppScene

#: view name -> (slice node layout name, orientation)
VIEWS = {"axial": ("Red", "Axial"), "sagittal": ("Yellow", "Sagittal"), "coronal": ("Green", "Coronal")}


class SliceView:
    """One slice view: ``widget`` is the Qt widget to put in a layout."""

    def __init__(self, appScene: AppScene, view: str, parent=None) -> None:
        import slicer
        import vtk
        self.appScene, self.view = appScene, view
        layoutName, orientation = VIEWS[view]
        self.widget = _render_widget(parent)
        self.widget.setObjectName(f"{view}View")
        self.renderWindow = self.widget.GetRenderWindow()
        self.renderWindow.SetNumberOfLayers(2)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        overlay = vtk.vtkRenderer()
        overlay.SetLayer(1)
        overlay.InteractiveOff()
        overlay.SetActiveCamera(self.renderer.GetActiveCamera())
        self.renderWindow.AddRenderer(self.renderer)
        self.renderWindow.AddRenderer(overlay)
        self.interactor = self.renderWindow.GetInteractor()
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())

        # The background image first, so that Slicer's layers draw over it.
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(appScene.appLogic)
        appScene.appLogic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(appScene.scene)
        self.sliceNode = self.logic.AddSliceNode(layoutName)
        self.sliceNode.SetOrientation(orientation)
        self.imageMapper = vtk.vtkImageMapper()
        self.imageMapper.SetColorWindow(255.0)
        self.imageMapper.SetColorLevel(127.5)
        self.imageMapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.imageActor = vtk.vtkActor2D()
        self.imageActor.SetMapper(self.imageMapper)
        self.renderer.AddViewProp(self.imageActor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for name in SLICE_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.sliceNode)
        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetSliceLogic(self.logic)
        self.style.SetDisplayableManagers(self.managers)
        self.style.SetInteractor(self.interactor)

        self._closed = False
        self._renderPending = False
        self._observations = [
            (self.logic, self.logic.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onLogicModified)),
            (self.managers, self.managers.AddObserver(vtk.vtkCommand.UpdateEvent, self._requestRender)),
            (self.interactor, self.interactor.AddObserver(vtk.vtkCommand.ConfigureEvent, self._onResize)),
        ]
        #: MedFM's hooks: ``onPress(ras, sliceNode, shift)`` on a left press, ``onMove(ras)`` while it is held
        #: (strokes), ``onRelease(ras)`` on its release, ``onKey(keySym)`` on a key; each returns True when
        #: MedFM took the event
        self.onPress: Callable | None = None
        self.onMove: Callable | None = None
        self.onRelease: Callable | None = None
        self.onKey: Callable[[str], bool] | None = None
        self._eventFilter = _event_filter(self)
        self.widget.installEventFilter(self._eventFilter)

    # ------------------------------------------------------------- drawing
    def _onLogicModified(self, *args) -> None:
        # The logic rebuilds its pipeline when the layers change: follow its current output.
        connection = self.logic.GetImageDataConnection()
        mapper = self.imageMapper
        if connection is not None and (mapper.GetNumberOfInputConnections(0) == 0
                                       or mapper.GetInputConnection(0, 0) is not connection):  # fmt: skip
            mapper.SetInputConnection(connection)
        self._requestRender()

    def _requestRender(self, *args) -> None:
        # Many MRML events arrive per user action; draw once, when Qt's event loop is next idle (as Slicer does).
        if not self._closed and not self._renderPending:
            from Qt import QtCore

            self._renderPending = True
            QtCore.QTimer.singleShot(0, self.widget, self._renderNow)

    def _renderNow(self) -> None:
        self._renderPending = False
        if not self._closed:
            self.renderWindow.Render()

    def _onResize(self, *args) -> None:
        # Only the view's size changes: the slice and what is in view stay (re-fitting here moved the slice
        # back to the volume's middle whenever a panel changed size, under the user's next click).
        width, height = self.renderWindow.GetSize()
        if width > 0 and height > 0 and not self._closed:
            self.logic.ResizeSliceNode(width, height)
            self._requestRender()

    def fit(self) -> None:
        self.logic.FitSliceToBackground()
        self._requestRender()

    def render(self) -> None:
        """Draw now (scripts and screenshots); user actions schedule their drawing instead."""
        self._renderNow()

    def grabImage(self):
        """What the view shows, as a QImage (VTK draws with OpenGL, which ``QWidget.grab`` does not see)."""
        import vtk
        from Qt import QtGui
        from vtkmodules.util.numpy_support import vtk_to_numpy

        self.renderWindow.Render()
        width, height = self.renderWindow.GetSize()
        data = vtk.vtkUnsignedCharArray()
        self.renderWindow.GetPixelData(0, 0, width - 1, height - 1, 1, data, 0)
        pixels = np.ascontiguousarray(vtk_to_numpy(data).reshape(height, width, -1)[::-1, :, :3])
        return QtGui.QImage(pixels.data, width, height, 3 * width, QtGui.QImage.Format_RGB888).copy()

    # --------------------------------------------------------- coordinates
    def xyToRas(self, x: float, y: float) -> np.ndarray:
        """RAS of a VTK display position (origin bottom left, device pixels) on this slice."""
        matrix = self.sliceNode.GetXYToRAS()
        return np.array(matrix.MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])

    def rasToXy(self, ras) -> tuple[float, float]:
        import vtk

        inverse = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self.sliceNode.GetXYToRAS(), inverse)
        x, y, _, _ = inverse.MultiplyPoint((*[float(v) for v in ras], 1.0))
        return x, y

    def rasToWidget(self, ras) -> tuple[int, int]:
        """The widget pixel (Qt's, origin top left, logical pixels) where a RAS point is shown."""
        x, y = self.rasToXy(ras)
        ratio = self.widget.devicePixelRatioF() if hasattr(self.widget, "devicePixelRatioF") else 1.0
        height = self.renderWindow.GetSize()[1]
        return int(round(x / ratio)), int(round((height - 1 - y) / ratio))

    def showSliceThrough(self, ras) -> None:
        """Move this view's slice to the plane through a RAS point (in-plane, the view stays where it is)."""
        ras = [float(v) for v in ras]
        self.sliceNode.JumpSliceByOffsetting(*ras)
        # Slicer may snap the offset to the volume's slices; a script's click must land where it was asked.
        matrix = self.sliceNode.GetSliceToRAS()
        normal = np.array([matrix.GetElement(row, 2) for row in range(3)])
        origin = np.array([matrix.GetElement(row, 3) for row in range(3)])
        distance = float(normal @ (np.asarray(ras) - origin))
        if abs(distance) > 1e-4:
            self.sliceNode.SetSliceOffset(self.sliceNode.GetSliceOffset() + distance)

    # --------------------------------------------------------------- events
    def widgetToRas(self, x: float, y: float) -> np.ndarray:
        """RAS under a widget pixel (Qt's coordinates), as VTK's interactor converts them."""
        ratio = self.widget.devicePixelRatioF() if hasattr(self.widget, "devicePixelRatioF") else 1.0
        height = self.renderWindow.GetSize()[1]
        return self.xyToRas(x * ratio, height - 1 - y * ratio)

    def placing(self) -> bool:
        """Whether Slicer's markups place mode is on (then a click places a markup, not a MedFM prompt)."""
        node = self.appScene.interactionNode
        return node.GetCurrentInteractionMode() == node.Place

    # ---------------------------------------------------------------- close
    def close(self) -> None:
        """Detach everything VTK holds before the window goes (a render after that crashes Mesa)."""
        if self._closed:
            return
        self._closed = True
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self.interactor.RemoveAllObservers()
        self.style.SetInteractor(None)
        self.managers.SetMRMLDisplayableNode(None)
        self.appScene.appLogic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.renderWindow.Finalize()


def _event_filter(view: SliceView):
    """A Qt event filter that gives left presses and keys to MedFM first; what MedFM leaves goes to VTK."""
    from Qt import QtCore

    class SliceViewEvents(QtCore.QObject):
        pressTaken = False

        def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
            kind = event.type()
            if kind == QtCore.QEvent.MouseButtonPress and event.button() == QtCore.Qt.LeftButton:
                self.pressTaken = False
                if view.onPress is not None and not view.placing():
                    position = event.position() if hasattr(event, "position") else event.pos()
                    shift = bool(event.modifiers() & QtCore.Qt.ShiftModifier)
                    ras = view.widgetToRas(position.x(), position.y())
                    self.pressTaken = bool(view.onPress(ras, view.sliceNode, shift))
                return self.pressTaken
            if kind == QtCore.QEvent.MouseButtonRelease and event.button() == QtCore.Qt.LeftButton:
                if self.pressTaken and view.onRelease is not None:
                    position = event.position() if hasattr(event, "position") else event.pos()
                    view.onRelease(view.widgetToRas(position.x(), position.y()))
                taken, self.pressTaken = self.pressTaken, False
                return taken
            if kind == QtCore.QEvent.MouseMove and self.pressTaken and view.onMove is not None:
                position = event.position() if hasattr(event, "position") else event.pos()
                return bool(view.onMove(view.widgetToRas(position.x(), position.y())))
            if kind == QtCore.QEvent.KeyPress and view.onKey is not None:
                return bool(view.onKey(_key_sym(event)))
            return False

    return SliceViewEvents(view.widget)


def _key_sym(event) -> str:
    """VTK's name for a key (what the effect's shortcuts are written in)."""
    from Qt import QtCore

    special = {QtCore.Qt.Key_Return: "Return", QtCore.Qt.Key_Enter: "KP_Enter"}
    return special.get(event.key(), event.text())


def _render_widget(parent):
    """VTK's Qt widget, resizing its render window through the window's own ``SetSize``.

    VTK's widget calls the base class's ``SetSize``, which leaves an off-screen (OSMesa) window's pixel buffer
    at its first size: reading the pixels back then ran past the buffer and crashed later, inside Mesa.
    """
    from vtkmodules.qt.QVTKRenderWindowInteractor import QVTKRenderWindowInteractor

    class SliceViewWidget(QVTKRenderWindowInteractor):
        def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
            ratio = self.devicePixelRatioF()
            width, height = int(round(ratio * self.width())), int(round(ratio * self.height()))
            self._RenderWindow.SetSize(width, height)
            super().resizeEvent(event)

    return SliceViewWidget(parent)
