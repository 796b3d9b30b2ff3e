"""On the user's own slice, a small object is also decoded on a crop around its box; the answer the model
rates higher is kept.

A SAM-family model sees the whole slice resized to its input (256 pixels for LiteMedSAM). A lesion a tenth of
the slice wide then spans a couple of dozen input pixels, and the model's outline of it is coarse or spills
over (LiteMedSAM, the reference's box on every slice of a 143-voxel breast lesion: Dice 0.41). The same model
given a square crop in which the box spans three eighths of the side outlines it far better (0.67), but where
the crop enlarges the object little it loses context and does worse (a brain tumour: 0.886 -> 0.822). So a crop
is made only where it enlarges the object at least twofold, both answers are decoded, and the model's own
predicted IoU picks one: test-time scale augmentation, chosen by the model's quality head.

Only slices the user prompted are zoomed. Their box is the user's; a propagated slice's box is carried from
the previous slice, and a crop around a guessed box magnifies the guess: zooming propagated slices too lost
0.13-0.30 of 3D Dice on three of five real cases. It also keeps propagation at one encode a slice.

A crop is encoded once and reused for later prompts on the slice while their box still fits it, so a click
stays decoder-only. The crop's logits are in the crop's frame, which no other decode reads: the state keeps the
whole slice's, the model's own answer in the frame that a refining click and the next propagated slice read (as
with the click correction, the mask shown may differ from them). Without them the next slice decodes with no
mask input, and breast1's one-box propagation scored 0.56 instead of 0.62.
Figures: the README's evaluation section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..engines.base import Embedding, Engine, Prediction, Prompts2D
from ..imaging.geometry import box_on_plane

#: the box's longer side as a fraction of the crop's side
ZOOM_FILL = 0.375
#: a crop is made only where it enlarges the object at least this much (the crop's side at most half the image's)
MIN_MAGNIFICATION = 2.0
#: a crop already made for the slice is reused while the box's side is within this factor of ZOOM_FILL's
REUSE_RANGE = 4 / 3
#: crops remembered per slice (one per object being worked on, in practice)
CROPS_PER_SLICE = 4
#: a box narrower than this (pixels) is zoomed as if it were this wide: a crop needs some context
MIN_BOX_SIDE = 4.0


@dataclass(frozen=True)
class Crop:
    """A window of the model's image of a slice: top-left corner and size, in pixels."""

    row: int
    col: int
    rows: int
    cols: int

    def holds(self, box: np.ndarray) -> bool:
        x0, y0, x1, y1 = box
        return self.col <= x0 and x1 <= self.col + self.cols - 1 and self.row <= y0 and y1 <= self.row + self.rows - 1

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.rows), slice(self.col, self.col + self.cols)


def crop_for_box(box: np.ndarray, image_shape: tuple[int, int], fill: float = ZOOM_FILL) -> Crop | None:
    """The square window around ``box`` (x0, y0, x1, y1) in which it spans ``fill`` of the side, moved inside the
    image; None when the object is not small (the window would enlarge it less than ``MIN_MAGNIFICATION``)."""
    rows, cols = image_shape
    side = max(float(box[2] - box[0]), float(box[3] - box[1]), MIN_BOX_SIDE) / fill
    if side * MIN_MAGNIFICATION > max(rows, cols):
        return None
    crop_rows, crop_cols = min(rows, int(np.ceil(side))), min(cols, int(np.ceil(side)))
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = int(np.clip(round(centre_y - crop_rows / 2), 0, rows - crop_rows))
    col = int(np.clip(round(centre_x - crop_cols / 2), 0, cols - crop_cols))
    return Crop(row, col, crop_rows, crop_cols)


def fits(crop: Crop, box: np.ndarray, fill: float = ZOOM_FILL) -> bool:
    """Whether a crop made earlier still serves ``box``: it holds the box, at about the zoom it was made for."""
    side = max(float(box[2] - box[0]), float(box[3] - box[1]), MIN_BOX_SIDE)
    ratio = side / max(crop.rows, crop.cols)
    return crop.holds(box) and fill / REUSE_RANGE <= ratio <= fill * REUSE_RANGE


class SmallObjectZoom:
    """The crops made on each slice, which answer won on each, and the choice between the two answers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Per slice, most recent first: [crop, whether its answer won (None until both were decoded)].
        self._crops: dict[object, list[list]] = {}

    def crop(self, plane: object, box: np.ndarray, image_shape: tuple[int, int]) -> list | None:
        """[crop, choice] for ``box`` on ``plane``: one already encoded if it still fits, else a new one."""
        made = self._crops.setdefault(plane, [])
        for entry in made:
            if fits(entry[0], box):
                made.remove(entry)
                made.insert(0, entry)
                return entry
        crop = crop_for_box(box, image_shape)
        if crop is None:
            return None
        made.insert(0, [crop, None])
        del made[CROPS_PER_SLICE:]
        return made[0]

    def predict(self, session, plane, prompts: Prompts2D, decode_whole: Callable[[], Prediction]) -> Prediction:
        """The whole slice's answer (``decode_whole()``) or the answer on a crop around the box, whichever the model
        rates higher. Both are decoded the first time a crop serves; later prompts that the crop still serves
        decode only the one that won, so a click costs one decode.

        ``session`` gives the model image's shape on ``plane`` and the crop's embedding, through its cache.
        """
        if prompts.box is None:
            return decode_whole()
        shape = session.model_image_shape(plane)  # the image itself only if the crop must be encoded
        box = np.asarray(prompts.box, dtype=np.float64)
        entry = self.crop(plane, box, shape)
        if entry is None:
            return decode_whole()
        crop, zoom_won = entry
        offset = np.array([crop.col, crop.row], dtype=np.float64)
        # A box-only model reads no click (the session corrects its mask by them after).
        reads_points = self.engine.prompt_types != ("box",)
        points = prompts.points - offset if reads_points else np.zeros((0, 2), np.float32)
        labels = prompts.labels if reads_points else np.zeros((0,), np.int32)
        if len(points) and not ((points >= 0).all() and (points < [crop.cols, crop.rows]).all()):
            return decode_whole()  # a click the crop does not show: only the whole slice can answer it
        whole = None if zoom_won else decode_whole()
        if zoom_won is False:
            return whole
        embedding: Embedding = session.embedding(plane, crop)
        local_box = np.clip(box - np.tile(offset, 2), 0, [crop.cols - 1, crop.rows - 1] * 2)  # a box past the border
        zoomed = self.engine.decode(embedding, Prompts2D(points=points, labels=labels, box=local_box))
        if zoom_won is None:
            entry[1] = zoom_won = zoomed.score > whole.score
            if not zoom_won:
                return whole
        mask = np.zeros(shape, dtype=bool)
        mask[crop.slices] = zoomed.mask
        return replace(zoomed, mask=mask, low_res_logits=None if whole is None else whole.low_res_logits)


def box_encodings(session, corner_a, corner_b, axis: int) -> list:
    """What a box with these RAS corners needs encoded, for a front end to encode off its GUI thread: the box's
    plane, then (plane, crop) for the crop the zoom will want around it, if any."""
    plane, box = box_on_plane(session.volume, corner_a, corner_b, axis)
    items: list = [plane]
    zoom = getattr(session, "zoom", None)  # a server's session zooms on the server
    if zoom is not None:
        rows, cols = plane.shape(session.volume)
        shape = session.model_image_shape(plane)
        if shape != (rows, cols):
            box = Prompts2D(box=box).scaled(shape[1] / cols, shape[0] / rows).box
        entry = zoom.crop(plane, np.asarray(box, dtype=np.float64), shape)
        if entry is not None:
            items.append((plane, entry[0]))
    return items
