"""MedFM: promptable foundation-model segmentation in 3D Slicer.

Slicer loads this file at start-up, so it imports only Slicer, Qt, vtk and the
standard library at the top. Everything else lives in MedFMLib and is
imported where it is used; torch and segment_anything are imported lazily
inside MedFMLib's engines.
"""

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class MedFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedFM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The MedFM developers"]
        self.parent.helpText = (
            "Segment with promptable foundation models (SAM, MedSAM) from points and boxes "
            "placed in the slice views. See the "
            '<a href="https://github.com/medfm/SlicerMedFM">documentation</a>.'
        )
        self.parent.acknowledgementText = (
            "MedFM is Apache-2.0. Model weights carry their own licences, listed with each model."
        )
        # Slicer picks up the icon from Resources/Icons/MedFM.png by itself.


class MedFMWidget(ScriptedLoadableModuleWidget):
    """The module panel. The interactive effect and model management build on MedFMLib."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        label = qt.QLabel(
            "MedFM's segmentation library is installed. Use the `medfm` command line or "
            "MedFMLib from the Python console; the interactive panel builds on it."
        )
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)


class MedFMLogic(ScriptedLoadableModuleLogic):
    """Headless entry point; usable from Slicer's Python console."""

    def segmentArrays(self, volumeArray, ijkToRas, pointsRas, modelName="classic", view="axial"):
        """Segment a (K, J, I) array from positive RAS points; returns the (K, J, I) mask."""
        from MedFMLib.engines import create_engine
        from MedFMLib.session import Session
        from MedFMLib.volume import Volume

        session = Session(Volume(volumeArray, ijkToRas), create_engine(modelName))
        objectId = session.add_object()
        for point in pointsRas:
            session.add_point(objectId, point, positive=True, view=view)
        return session.mask(objectId)


class MedFMTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ClassicSegmentsPhantom()

    def test_ClassicSegmentsPhantom(self):
        from MedFMLib.phantoms import demo_phantom

        volume, truth, seeds = demo_phantom()
        mask = MedFMLogic().segmentArrays(volume.array, volume.ijk_to_ras, [seeds["lesion"]])
        self.assertTrue(mask.any())
        self.assertFalse((mask & ~truth["lesion"]).any())
        self.delayDisplay("MedFM classic engine test passed")
