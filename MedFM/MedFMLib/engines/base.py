"""The small interface every engine implements.

An engine encodes a 2D float image into an embedding once, then decodes that
embedding plus prompts (and optionally the previous low-resolution logits) into
a mask, as often as the user clicks. Inputs and outputs are numpy arrays and
small dataclasses, so an engine can sit behind a network boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PromptError
from ..imaging.appearance import Appearance


@dataclass
class Prompts2D:
    """Prompts on one 2D image, in pixel coordinates (x = column, y = row).

    ``labels`` holds 1 for a positive (foreground) point and 0 for a negative one.
    ``box`` is (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, or None.
    ``appearance``: what the object looks like on the slices the user vouched for (propagation gives it),
    for engines that segment by intensity; image models ignore it.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    box: np.ndarray | None = None
    appearance: Appearance | None = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        if len(self.points) != len(self.labels):
            raise PromptError("Every point needs a label (1 positive, 0 negative).")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
            if self.box[0] > self.box[2] or self.box[1] > self.box[3]:
                raise PromptError("A box must be given as x0, y0, x1, y1 with x0 <= x1 and y0 <= y1.")

    @property
    def is_empty(self) -> bool:
        return len(self.points) == 0 and self.box is None

    @property
    def is_single_point(self) -> bool:
        """A lone click is ambiguous (part, object or whole?): SAM's multimask case."""
        return len(self.points) == 1 and self.box is None

    def scaled(self, scale_x: float, scale_y: float) -> Prompts2D:
        """The same prompts on an image resampled by the given factors (pixel centres kept aligned)."""
        points = self.points.copy()
        points[:, 0] = (points[:, 0] + 0.5) * scale_x - 0.5
        points[:, 1] = (points[:, 1] + 0.5) * scale_y - 0.5
        box = None
        if self.box is not None:
            box = (self.box + 0.5) * np.array([scale_x, scale_y, scale_x, scale_y], np.float32) - 0.5
        return Prompts2D(points, self.labels.copy(), box, self.appearance)


@dataclass
class Embedding:
    """An encoded image. ``features`` is engine-specific (a torch tensor for SAM)."""

    features: Any
    image_shape: tuple[int, int]
    nbytes: int
    extra: dict = field(default_factory=dict)


@dataclass
class Prediction:
    """A decoded mask at image resolution, its quality score and the low-res logits for refinement."""

    mask: np.ndarray
    score: float
    low_res_logits: np.ndarray | None = None


class Engine(ABC):
    """Base class of segmentation engines."""

    #: the catalog name of the model, e.g. "sam_vit_b"
    model_name: str = ""
    #: "cpu", "cuda" or "mps"
    device: str = "cpu"
    #: prompt kinds the model was trained on
    prompt_types: tuple[str, ...] = ("point", "box")
    #: learned models saw photos with square pixels: give them slices resampled to square pixels
    prefers_square_pixels: bool = True
    #: the engine has no logits of its own: give it the previous mask (bool, its image grid) in their place
    refines_from_mask: bool = False
    #: the model reads a box as the object's extent and keeps its mask inside it: a mask that fills the box to a
    #: side says the box was drawn too small (propagation widens a carried box then)
    box_is_extent: bool = True
    #: a box around a small object is also decoded on a crop around it (interaction/zoom.py says why)
    zooms_on_small_objects: bool = False

    @property
    def cache_id(self) -> str:
        """Identifies the weights, device and precision: part of every embedding-cache key."""
        return f"{self.model_name}@{self.device}"

    @abstractmethod
    def encode(self, image: np.ndarray) -> Embedding:
        """Encode a 2D float32 image with values in [0, 1] (rows, cols)."""

    def encode_batch(self, images: list[np.ndarray]) -> list[Embedding]:
        """Encode several images; engines whose network takes a batch override this to run it once."""
        return [self.encode(image) for image in images]

    @abstractmethod
    def decode(self, embedding: Embedding, prompts: Prompts2D, previous_logits: np.ndarray | None = None) -> Prediction:
        """Decode prompts on an encoded image into a boolean mask of the image's shape."""

    def check_prompts(self, prompts: Prompts2D) -> None:
        """Raise a PromptError if the prompts are not usable by this model."""
        if prompts.is_empty:
            raise PromptError("Add a point or a box first.")
