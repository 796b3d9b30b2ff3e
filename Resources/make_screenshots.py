"""The README's pictures of `medfm app`, made by replaying a user's clicks through the real window (`make screenshots`).

A real scan (brain1: a T1 post-contrast MRI with an enhancing tumour, from PyRadiomics' test data, BSD-3; see
Testing/data/real/README.md): a box around the tumour on its largest slice, propagated both ways with the
weight-free `classic` engine, applied, and photographed with Slicer's own slice views.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "Testing" / "data" / "real"


def main() -> int:
    sys.path.insert(0, str(ROOT / "MedFM"))
    from MedFMLib.imaging.io import read_volume

    volume = read_volume(REAL / "brain1_image.nrrd")
    label = read_volume(REAL / "brain1_label.nrrd").array > 0
    k = int(np.argmax(label.sum(axis=(1, 2))))
    rows, cols = np.nonzero(label[k])

    def ras(i, j):
        return [float(v) for v in volume.ijk_to_ras_points(np.array([i, j, k], float))]

    centre = ras(cols.mean(), rows.mean())
    actions = [
        {"action": "box", "view": "axial", "from": ras(cols.min() - 2, rows.min() - 2),
         "to": ras(cols.max() + 2, rows.max() + 2)},
        {"action": "click", "view": "axial", "ras": centre},
        {"action": "wait"},
        {"action": "screenshot", "path": str(ROOT / "Resources" / "AppClickAndBox.png")},
        {"action": "button", "name": "propagate-both"},
        {"action": "wait"},
        {"action": "key", "key": "Return"},
        {"action": "screenshot", "path": str(ROOT / "Resources" / "AppPropagated.png")},
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "actions.json"
        script.write_text(json.dumps(actions))
        result = subprocess.run(
            [str(Path(sys.executable).with_name("medfm")), "app", str(REAL / "brain1_image.nrrd"), "--model", "classic",
             "--replay", str(script), "--exit"],
            env={**__import__("os").environ, "MEDFM_HOME": folder},
        )  # fmt: skip
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
