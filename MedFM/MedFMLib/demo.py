"""`make demo`: segment a generated CT-like volume from clicks and write a Slicer segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engines import create_engine
from .imaging.geometry import plane_through
from .imaging.intensity import preset_window
from .imaging.io import SegmentData, write_output, write_volume
from .imaging.phantoms import demo_phantom
from .interaction.session import Session


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def run_demo(out_dir: Path, model: str = "classic", checkpoint: str | None = None, device: str = "auto") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    volume, truth, seeds = demo_phantom()
    volume_path = write_volume(out_dir / "demo_ct.nrrd", volume)
    print(
        f"sample volume: {volume_path}  ({volume.dimensions[0]}×{volume.dimensions[1]}×{volume.dimensions[2]} voxels, "
        f"spacing {np.round(volume.spacing, 2).tolist()} mm, oblique)"
    )

    engine = create_engine(model, checkpoint=checkpoint, device=device)
    session = Session(volume, engine, window=preset_window("soft_tissue"))
    segments = []
    for name, seed in seeds.items():
        object_id = session.add_object(name)
        # One click in each of the three views through the object's centre.
        for view in ("axial", "coronal", "sagittal"):
            session.add_point(object_id, seed, positive=True, view=view)
            plane = plane_through(volume, seed, view)
            index = plane.array_index()
            score = dice(session.objects[object_id].slices[plane].mask, truth[name][index])
            r, a, s = seed
            print(
                f"  {name:<7} click at R={r:.1f} A={a:.1f} S={s:.1f} in {view:<8} view: "
                f"slice Dice {score:.3f} against the truth"
            )
        obj = session.objects[object_id]
        segments.append(SegmentData(obj.name, obj.mask, obj.color))
    result = write_output(out_dir / "demo_segmentation.seg.nrrd", segments, volume)
    print(f"segmentation written to {result.resolve()}")
    print("open both files in 3D Slicer (drag and drop) to look at them.")
    return result
