"""`medfm bench --compare-runtimes`: the same first clicks through eager torch and through OpenVINO.

Both engines hold the same weights and see the same slices and prompts, one runtime after the other on
each slice, so machine load affects both alike. Reported: the median first click (encode + decode) of
each, their ratio, a further click with OpenVINO, and how far the two runtimes' masks agree (Dice).
"""

from __future__ import annotations

import platform
import time

import numpy as np

from ..engines import create_engine
from ..imaging.intensity import preset_window
from ..imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from ..interaction.session import Session
from .clicks import _percentile


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def run_runtime_comparison(
    model: str,
    checkpoint: str | None = None,
    random_weights: bool = False,
    size: int = 512,
    first_clicks: int = 3,
    further_clicks: int = 10,
    fast: bool = False,
    notify=None,
) -> dict:
    slices = max(1, first_clicks)
    matrix = make_ijk_to_ras(spacing=(0.7, 0.7, 1.5), origin=(-180.0, -180.0, 0.0))
    centre = matrix[:3, :3] @ np.array([size / 2, size / 2, slices / 2]) + matrix[:3, 3]
    organ = Ellipsoid(tuple(centre), (60.0, 45.0, 200.0), 60.0)
    volume, _ = render((size, size, slices), matrix, [organ], background=-100.0, noise_sd=10.0, name="bench")
    window = preset_window("soft_tissue")
    sessions = {}
    for runtime in ("torch", "openvino"):
        engine = create_engine(model, checkpoint=checkpoint, device="cpu", random_weights=random_weights,
                               runtime=runtime, fast=fast, notify=notify)  # fmt: skip
        sessions[engine.runtime] = Session(volume, engine, window=window)
    names = list(sessions)
    use_box = sessions[names[0]].engine.prompt_types == ("box",)
    half = size / 16

    def point(k: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        return volume.ijk_to_ras_points(np.array([size / 2 + dx, size / 2 + dy, k]))

    def click(session: Session, object_id: int, k: int, dx: float, dy: float) -> float:
        started = time.perf_counter()
        if use_box:
            session.set_box(object_id, point(k, dx - half, dy - half), point(k, dx + half, dy + half))
        else:
            session.add_point(object_id, point(k, dx, dy))
        return (time.perf_counter() - started) * 1000

    first = {name: [] for name in names}
    agreement = []
    for k in range(slices):
        masks = []
        for name in names if k % 2 == 0 else names[::-1]:  # alternate who goes first
            session = sessions[name]
            object_id = session.add_object()
            first[name].append(click(session, object_id, k, 0.0, 0.0))
            masks.append(session.mask(object_id))
        agreement.append(_dice(*masks))
    further = []
    rng = np.random.default_rng(0)
    for _ in range(further_clicks):
        dx, dy = rng.uniform(-size / 12, size / 12, size=2)
        masks = []
        for name in names:
            session = sessions[name]
            object_id = session.add_object()
            elapsed = click(session, object_id, 0, float(dx), float(dy))
            if name != "torch":
                further.append(elapsed)
            masks.append(session.mask(object_id))
        agreement.append(_dice(*masks))
    torch_ms, ov_ms = (float(np.median(first[name])) for name in names)
    return {
        "model": model,
        "random_weights": random_weights,
        "image_size": [size, size],
        "runtimes": names,
        "first_click_ms": {name: round(float(np.median(first[name])), 1) for name in names},
        "speedup": round(torch_ms / max(ov_ms, 1e-6), 2),
        "openvino_next_click_ms_p50": round(_percentile(further, 50), 1) if further else None,
        "mask_dice_min": round(min(agreement), 4),
        "mask_dice_median": round(float(np.median(agreement)), 4),
        "prompts_compared": len(agreement),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def format_runtime_comparison(result: dict) -> str:
    torch_name, ov_name = result["runtimes"]
    weights = " (random weights)" if result["random_weights"] else ""
    rows, cols = result["image_size"]
    return "\n".join(
        [
            f"model {result['model']}{weights}, image {rows}×{cols}, CPU",
            f"  first click, {torch_name}:      {result['first_click_ms'][torch_name]:.1f} ms (median)",
            f"  first click, {ov_name}: {result['first_click_ms'][ov_name]:.1f} ms (median)",
            f"  speed-up:                 {result['speedup']:.2f}×",
            f"  further click, OpenVINO:  p50 {result['openvino_next_click_ms_p50']} ms",
            f"  masks agree (Dice):       min {result['mask_dice_min']}, median {result['mask_dice_median']} "
            f"over {result['prompts_compared']} prompts",
        ]
    )
