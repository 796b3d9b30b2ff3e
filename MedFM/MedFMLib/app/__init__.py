"""`medfm app`: MedFM's own desktop window on Slicer's MRML scene and slice views (slicer-core, Qt.py).

A skin over ``MedFMLib.mrml.controller.InteractionController``, the same controller as the Segment Editor
effect; it adds no segmentation logic of its own.
"""
