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
    Measured: brain1 0.629 -> 0.735, breast1 0.568 -> 0.702 (mean final 0.719; without the corrections
    0.763 and 0.575, mean 0.669; the issue's target is 0.80, which this model does not reach: its ceiling
    on breast1 with the reference box on every slice is 0.41)."""
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
    assert finals[0] >= 0.70, finals  # brain1: its clicks on slice 15 grow the box to the larger section
    assert finals[1] >= 0.65, finals  # breast1: negative clicks remove the leak on its first slice
    assert np.mean(finals) >= 0.69, finals
