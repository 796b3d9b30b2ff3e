"""The clean-ups a user asks for when a segmentation is written: keep what the prompts touch, fill holes.

Shared by the command line and the Segment Editor effect, so both mean the same by each option.
"""

from __future__ import annotations

import numpy as np

from ..errors import PromptError
from ..imaging.geometry import ViewLike
from ..imaging.postprocess import fill_holes, keep_touching_components


def cleaned_mask(session, object_id: int, keep_connected: bool = False, fill: bool = False,
                 view: ViewLike | None = None) -> np.ndarray:  # fmt: skip
    """The object's 3D mask with the chosen clean-ups (a local or a remote session).

    Holes are filled slice by slice across the propagation axis (``view``'s, else the object's);
    an object with no prompted slice yet has no such axis, and is filled in 3D.
    """
    mask = session.mask(object_id)
    if keep_connected:
        mask = keep_touching_components(mask, session.prompt_seeds(object_id))
    if fill:
        try:
            axis = session.propagation_axis(object_id, view)
        except PromptError:
            axis = None
        mask = fill_holes(mask, axis)
    return mask


def corrected_planes(slices: dict, updates) -> list:
    """The planes among ``updates`` where the user corrected a propagated slice (they propagate again)."""
    return [
        update.plane
        for update in updates
        if (state := slices.get(update.plane)) is not None
        and state.origin == "propagated"
        and state.is_anchor
        and state.mask is not None
    ]
