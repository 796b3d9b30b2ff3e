"""Propagation on real anatomy (issue 15), with the weight-free engine: one box and a click on the largest
labelled slice, then ``--propagate both``, as a new user does it.

Before the appearance rule, these walks went on for ten slices beyond brain1's tumour (3D Dice 0.085)
because region growing always finds *something*; the control test below keeps that failure visible.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import REAL_DATA, real_case, run_medfm
from MedFMLib.engines import create_engine
from MedFMLib.interaction.propagation import PropagationOptions
from MedFMLib.interaction.session import Session


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def slices_beyond(mask: np.ndarray, label: np.ndarray) -> int:
    """How many slices past the object's first or last slice the mask reaches (0: none)."""
    written, labelled = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(label.any(axis=(1, 2)))
    if len(written) == 0:
        return 0
    return int(max(0, labelled[0] - written[0], written[-1] - labelled[-1]))


def largest_slice_prompts(volume, label: np.ndarray):
    """RAS corners of the reference's box on its largest slice, and a click at that section's deepest pixel."""
    from scipy import ndimage

    k = int(np.argmax(label.sum(axis=(1, 2))))
    rows, cols = np.nonzero(label[k])
    low = volume.ijk_to_ras_points(np.array([cols.min(), rows.min(), k], float))
    high = volume.ijk_to_ras_points(np.array([cols.max(), rows.max(), k], float))
    depth = ndimage.distance_transform_edt(np.pad(label[k], 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return low, high, volume.ijk_to_ras_points(np.array([col, row, k], float))


def segment_and_propagate(case: str, options: PropagationOptions | None = None):
    volume, label = real_case(case)
    label = label > 0
    session = Session(volume, create_engine("classic"))
    low, high, click = largest_slice_prompts(volume, label)
    tumour = session.add_object()
    session.set_box(tumour, low, high)
    session.add_point(tumour, click)
    result = session.propagate(tumour, "both", options=options)
    return session.mask(tumour), label, result


@pytest.mark.parametrize("case, target", [("brain1", 0.65), ("breast1", 0.60)])
def test_classic_propagation_holds_on_real_lesions(case, target):
    mask, label, result = segment_and_propagate(case)
    assert dice(mask, label) >= target, dice(mask, label)
    assert slices_beyond(mask, label) <= 1
    # Each walk ended because the object did, not at the volume's edge.
    assert {reason for _, _, reason, _ in result.stops} <= {"appearance", "end", "collapse", "overlap"}


def test_without_the_appearance_rule_brain1_leaks_as_before():
    """The control: the same prompts with the anchors' appearance switched off walk far past the tumour."""
    mask, label, _ = segment_and_propagate("brain1", PropagationOptions(use_appearance=False))
    assert slices_beyond(mask, label) > 1 or dice(mask, label) < 0.5


def test_medfm_segment_propagates_brain1_within_the_tumour(tmp_path):
    from MedFMLib.imaging.io import read_volume

    volume, label = real_case("brain1")
    low, high, click = largest_slice_prompts(volume, label > 0)
    out = tmp_path / "tumour.nii.gz"
    result = run_medfm("segment", REAL_DATA / "brain1_image.nrrd", "--model", "classic",
                       "--box", ",".join(f"{v:.4f}" for v in (*low, *high)),
                       "--point", ",".join(f"{v:.4f}" for v in click), "--propagate", "both", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("stopped after slice") == 2 and "edge of the volume" not in result.stderr
    written = read_volume(out).array > 0
    assert dice(written, label > 0) >= 0.65 and slices_beyond(written, label > 0) <= 1
    point = ",".join(f"{v:.4f}" for v in click)
    bad = run_medfm("segment", REAL_DATA / "brain1_image.nrrd", "--point", point, "--propagate",
                    "--min-object-fraction", "2", "--out", out)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "0 to 1" in bad.stderr


def test_cvpr25_on_the_real_lesions_with_classic(tmp_path):
    """The challenge's protocol (a box with the object's slice range, then 5 clicks): mean final DSC >= 0.70."""
    dataset = tmp_path / "real"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case in ("brain1", "breast1"):
        shutil.copy(REAL_DATA / f"{case}_image.nrrd", dataset / "imagesTr" / f"{case}_0000.nrrd")
        shutil.copy(REAL_DATA / f"{case}_label.nrrd", dataset / "labelsTr" / f"{case}.nrrd")
    result = run_medfm("evaluate", dataset, "--model", "classic", "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["objects"] == 2 and figures["failed"] == 0
    assert figures["dsc_final"] >= 0.70, figures
    cases = json.loads((tmp_path / "out" / "results.json").read_text())["cases"]
    steps = [case["objects"]["1"]["steps"] for case in cases.values()]
    # The clicks help on the whole (on breast1 0.70 -> 0.88; on brain1 they barely move it, see the README).
    assert np.mean([s[-1]["dsc"] for s in steps]) > np.mean([s[0]["dsc"] for s in steps]) + 0.03
