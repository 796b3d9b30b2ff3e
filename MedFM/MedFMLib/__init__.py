"""MedFMLib: promptable medical segmentation without Slicer's GUI.

Importing this package is cheap: it pulls in only numpy and the standard library.
torch, segment_anything and SimpleITK are imported inside the functions that need
them, so that Slicer can load the module at start-up without them.
"""

__version__ = "0.1.0"

from .errors import DeviceError, MedFMError, ModelError, PromptError, VolumeError  # noqa: E402

__all__ = ["DeviceError", "MedFMError", "ModelError", "PromptError", "VolumeError", "__version__"]
