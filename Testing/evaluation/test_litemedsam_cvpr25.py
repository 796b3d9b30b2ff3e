"""The real LiteMedSAM through issue 15's instrument, the CVPR 2025 protocol, on brain1 and breast1.

In a file of its own so that the test runner can give it to the worker the LiteMedSAM engine tests leave free.
"""

from __future__ import annotations

import numpy as np

from conftest import real_case
from MedFMLib.engines import create_engine


def test_litemedsam_through_the_cvpr25_protocol_gains_from_every_click_series(litemedsam_store):
    """Issue 15's instrument on a real model: the challenge's box, then 5 clicks, on brain1 and breast1.

    A box-only model reads a click only through the box it moves: it is given the box alone (a negative
    point misled it), decoded afresh (its own logits fed back drifted), and a negative click moves a side
    only past a fringe of the mask (a side through the object made it collapse). A click its answer still
    contradicts then corrects the mask around it, by a random walker on the image (``click_corrections``).
    On its first slice a small lesion is also decoded on a crop around the box (``zoom``), and a propagated
    slice also tries its carried box grown by a quarter on each side (``grown_box_fraction``).
    Measured: brain1 0.736 -> 0.801 (box step -> final), breast1 0.665 -> 0.713 (mean final 0.757; before the
    zoom and the grown box 0.735 and 0.702; the issue's target is 0.80)."""
    from MedFMLib.evaluation.protocols import run_cvpr25
    from MedFMLib.interaction.session import Session

    engine = create_engine("litemedsam", device="cpu", store=litemedsam_store)
    finals = []
    for name in ("brain1", "breast1"):
        volume, labels = real_case(name)
        results, final = run_cvpr25(Session(volume, engine), volume, labels > 0)
        steps = [step["dsc"] for step in results[0].steps]
        assert len(steps) == 6
        assert steps[-1] >= steps[0], (name, steps)  # clicks never leave a lesion worse than its box
        assert final.shape == labels.shape and (final > 0).any()
        finals.append(steps[-1])
    assert finals[0] >= 0.77, finals  # brain1: the grown box reaches slice 15's larger section
    assert finals[1] >= 0.68, finals  # breast1: the zoom, then negative clicks remove the leak on slice 8
    assert np.mean(finals) >= 0.73, finals
