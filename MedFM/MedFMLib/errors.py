"""Errors that MedFM shows to users.

Every error a user can cause (a wrong file, a prompt outside the volume, a
missing model) is a :class:`MedFMError`. Its message is one line that says what
is wrong and what to do, so the CLI and the Slicer module can show it as it is,
without a traceback.
"""

from __future__ import annotations


class MedFMError(Exception):
    """Base class of all errors meant for the user."""


class VolumeError(MedFMError):
    """The input image cannot be used as a 3D scalar volume."""


class PromptError(MedFMError):
    """A prompt is invalid: outside the volume, on the wrong slice, unknown id."""


class ModelError(MedFMError):
    """A model or checkpoint cannot be loaded or is not available."""


class DeviceError(MedFMError):
    """The requested compute device is not available."""


class RemoteError(MedFMError):
    """A MedFM server cannot be reached, refused the token, or speaks another protocol version."""


class ProtocolError(MedFMError):
    """A message between a MedFM client and server is malformed or too large."""
