"""The MRML side of the app: a scene with Slicer's application logic and module logics, as Slicer sets it up.

No Qt here. The slice views (``views.py``) draw this scene with Slicer's own displayable managers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the displayable managers of a slice view, registered by name as Slicer does
SLICE_DISPLAYABLE_MANAGERS = (
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
    "vtkMRMLScalarBarDisplayableManager",
    "vtkMRMLTransformsDisplayableManager2D",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
)


@dataclass
class AppScene:
    """A scene and the logics Slicer keeps beside it; they live as long as this object."""

    scene: object
    appLogic: object
    moduleLogics: dict = field(default_factory=dict)

    @property
    def markupsLogic(self):
        return self.moduleLogics["Markups"]

    @property
    def volumesLogic(self):
        return self.moduleLogics["Volumes"]

    @property
    def interactionNode(self):
        return self.appLogic.GetInteractionNode()

    @property
    def selectionNode(self):
        return self.appLogic.GetSelectionNode()

    def close(self) -> None:
        self.scene.Clear(True)


def create_app_scene() -> AppScene:
    """A scene with the application logic, colours, the crosshair, slice orientations and the module logics."""
    import slicer
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetSingletonTag("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)  # makes the selection and interaction nodes
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    logics = {
        "Colors": slicer.vtkMRMLColorLogic(),
        "Markups": slicer.vtkSlicerMarkupsLogic(),
        "Volumes": slicer.vtkSlicerVolumesLogic(),
        "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic(),
        "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic(),
    }
    for name, logic in logics.items():
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return AppScene(scene, app_logic, logics)
