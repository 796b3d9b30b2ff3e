"""Prompts simulated as users give them, for training: jittered boxes, points, and correction clicks.

Coordinates are pixels of the encoded image (x = column, y = row), as ``Prompts2D`` takes them.

- A box is the object's bounding box with each side moved by up to a tenth of the box's size (at least
  two pixels) in or out: users never draw the tight box.
- Points: one to three positive points inside the object, up to two negative ones in the ring around it.
- Correction clicks follow SAM's and MedSAM's training: after each prediction, one click in the larger of
  the two errors (missed object or false alarm), drawn uniformly from it, with the previous low-res logits
  as the mask input.
"""

from __future__ import annotations

import numpy as np

from ..engines.base import Prompts2D

PROMPT_KINDS = ("box", "points", "clicks")


def tight_box(mask: np.ndarray) -> np.ndarray:
    """The object's bounding box (x0, y0, x1, y1) in pixel coordinates."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)


def jittered_box(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    box = tight_box(mask)
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    reach = np.maximum(2.0, 0.1 * np.array([width, height, width, height], np.float32))
    moved = box + rng.uniform(-1.0, 1.0, 4).astype(np.float32) * reach
    rows, cols = mask.shape
    moved = np.clip(moved, 0, [cols - 1, rows - 1, cols - 1, rows - 1]).astype(np.float32)
    # A box that jitter turned inside out is the tight box again.
    return moved if moved[0] <= moved[2] and moved[1] <= moved[3] else box


def _pick(pixels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` (x, y) points drawn from (row, col) pixels without repeats."""
    chosen = pixels[rng.choice(len(pixels), size=min(count, len(pixels)), replace=False)]
    return chosen[:, ::-1].astype(np.float32)


def random_points(mask: np.ndarray, rng: np.random.Generator) -> Prompts2D:
    """One to three positive points inside the object and up to two negative points in a ring around it."""
    from scipy import ndimage

    positives = _pick(np.argwhere(mask), int(rng.integers(1, 4)), rng)
    reach = max(3, int(0.2 * max(np.ptp(np.nonzero(mask)[0]), np.ptp(np.nonzero(mask)[1]))))
    ring = ndimage.binary_dilation(mask, iterations=reach) & ~mask
    negatives = _pick(np.argwhere(ring), int(rng.integers(0, 3)), rng) if ring.any() else np.zeros((0, 2))
    points = np.concatenate([positives, negatives.reshape(-1, 2)]).astype(np.float32)
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.int32)
    return Prompts2D(points, labels)


def first_prompt(kind: str, mask: np.ndarray, rng: np.random.Generator, box_only: bool) -> Prompts2D:
    """A prompt of ``kind``; "clicks" starts from a box (box-prompted models) or one positive point."""
    if kind == "points":
        return random_points(mask, rng)
    if kind == "box" or box_only:
        return Prompts2D(box=jittered_box(mask, rng))
    return Prompts2D(_pick(np.argwhere(mask), 1, rng), [1])


def correction_click(
    prediction: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, int] | None:
    """A click in the larger error, drawn uniformly from it: ((x, y), 1 for missed object / 0 for false alarm)."""
    missed = mask & ~prediction
    false_alarm = prediction & ~mask
    if not missed.any() and not false_alarm.any():
        return None
    positive = missed.sum() >= false_alarm.sum()
    pixels = np.argwhere(missed if positive else false_alarm)
    row, col = pixels[rng.integers(len(pixels))]
    return np.array([col, row], np.float32), int(positive)


def with_click(prompts: Prompts2D, point: np.ndarray, label: int) -> Prompts2D:
    return Prompts2D(np.vstack([prompts.points, point[None]]), np.r_[prompts.labels, label], prompts.box)
