"""Box-prompted models (MedSAM, LiteMedSAM) during propagation and corrections: what reaches them is a box."""

from __future__ import annotations

import numpy as np
from test_propagation import tapering_phantom

from MedFMLib.engines import create_engine
from MedFMLib.engines.base import Prompts2D
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.imaging.geometry import SlicePlane
from MedFMLib.imaging.phantoms import make_ijk_to_ras
from MedFMLib.imaging.volume import Volume
from MedFMLib.interaction.box_prompts import box_without_negatives
from MedFMLib.interaction.objects import PROPAGATED, SliceState
from MedFMLib.interaction.propagation import PropagationOptions, Propagator
from MedFMLib.interaction.session import Session


class BoxFillingClassic(ClassicEngine):
    """The weight-free engine, read as a box-prompted model: its region grows inside the box and no further."""

    box_is_extent = True


def _flat_volume(truth: np.ndarray, noise_sd: float = 3.0) -> Volume:
    noise = np.random.default_rng(0).normal(0.0, noise_sd, truth.shape)
    return Volume(np.where(truth, 200.0, 40.0) + noise, make_ijk_to_ras((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0, 0, 0)))


def _widened(volume: Volume, box) -> SliceState:
    session = Session(volume, BoxFillingClassic())
    obj = session.add_object()
    propagator = Propagator(session, session.objects[obj].slices, obj, 2, PropagationOptions())
    carried = Prompts2D(np.zeros((0, 2), np.float32), [], np.asarray(box, np.float32))
    state = session.predict(SliceState(SlicePlane(2, 2), carried=carried, origin=PROPAGATED))
    return propagator._widen_to_fit(state, None)


def test_a_carried_box_is_widened_only_when_the_mask_comes_to_fit_a_wider_one():
    """An object larger than its carried box is found whole; a leak that fills any box it is given is not chased."""
    k, j, i = np.ogrid[:5, :80, :80]
    disc = (j - 40) ** 2 + (i - 40) ** 2 <= 14**2
    grown = _widened(_flat_volume(np.broadcast_to(disc, (5, 80, 80))), [30, 30, 50, 50])
    assert grown.carried.box[0] < 26 and grown.carried.box[2] > 54  # wide enough for the disc (26..54)
    assert (grown.mask == disc[0]).mean() > 0.99

    # Tissue like the object past every side (noise-free, so the region grows to fill any box it is given).
    leak = _widened(_flat_volume(np.ones((5, 80, 80), bool), noise_sd=0.0), [30, 30, 50, 50])
    np.testing.assert_array_equal(leak.carried.box, [30, 30, 50, 50])
    assert leak.mask[30:51, 30:51].all() and leak.mask.sum() == 21 * 21


def test_a_negative_click_moves_a_side_past_a_fringe_but_never_through_the_object():
    box = np.array([10, 10, 40, 40], np.float32)
    yy, xx = np.mgrid[:50, :50]
    mask = (yy - 25) ** 2 + (xx - 25) ** 2 <= 12**2  # columns 13..37
    # On the fringe (left of the object): the left side moves past it, cutting nothing of the mask.
    np.testing.assert_array_equal(box_without_negatives(box, [(12, 25)], [0], mask), [13, 10, 40, 40])
    # Deep inside: any side moved past it would cut a third of the object, and the model follows its box.
    np.testing.assert_array_equal(box_without_negatives(box, [(20, 25)], [0], mask), box)
    # Without a mask to judge by (a slice not yet segmented), the nearest side still moves.
    np.testing.assert_array_equal(box_without_negatives(box, [(20, 25)], [0]), [21, 10, 40, 40])


def _boxed_medsam(tiny_sam):
    """A tiny MedSAM session with a box drawn around the phantom's centre on its axial slice."""
    volume, _, centre = tapering_phantom(dims=(40, 36, 14), radii=(10.0, 8.0, 12.0))
    engine = create_engine("medsam_tiny", checkpoint=tiny_sam, device="cpu")
    session = Session(volume, engine)
    obj = session.add_object()
    ijk = np.round(volume.ras_to_ijk_points(np.array([centre]))[0])
    corners = volume.ijk_to_ras_points(np.array([ijk - [8, 6, 0], ijk + [8, 6, 0]]))
    session.set_box(obj, corners[0], corners[1], view="axial")
    return session, engine, obj, ijk


def test_a_box_only_model_is_given_the_box_and_not_the_clicks(tiny_sam):
    """A click reaches a box-only model through its box alone: the points are not passed on."""
    session, engine, obj, ijk = _boxed_medsam(tiny_sam)
    volume = session.volume
    plane, boxed = next(iter(session.objects[obj].slices.items()))
    session.add_point(obj, volume.ijk_to_ras_points(np.array([ijk + [2, 1, 0]]))[0], positive=True, view="axial")
    clicked = session.objects[obj].slices[plane]
    prompts = session.slice_prompts(clicked)
    assert len(clicked.points) == 1 and len(prompts.points) == 0
    np.testing.assert_array_equal(prompts.box, session.slice_prompts(boxed).box)
    np.testing.assert_array_equal(clicked.logits, boxed.logits)  # the same box, the same answer
    embedding = session.embedding(plane)
    with_point = engine.decode(embedding, Prompts2D(np.array([[20.0, 18.0]], np.float32), [1], prompts.box))
    assert not np.array_equal(with_point.low_res_logits, engine.decode(embedding, prompts).low_res_logits)


def test_a_box_only_model_decodes_a_click_from_its_box_afresh(tiny_sam):
    """A box-only model cannot read a click: its own logits fed back on the same box would only drift."""
    session, engine, obj, ijk = _boxed_medsam(tiny_sam)
    for _ in range(2):
        session.add_point(obj, session.volume.ijk_to_ras_points(np.array([ijk + [3, 0, 0]]))[0], positive=False,
                          view="axial")  # fmt: skip
    plane, state = next(iter(session.objects[obj].slices.items()))
    prompts = session.slice_prompts(state)
    fresh = engine.decode(session.embedding(plane), prompts, None)
    fed_back = engine.decode(session.embedding(plane), prompts, fresh.low_res_logits)
    np.testing.assert_array_equal(state.logits, fresh.low_res_logits)
    assert not np.array_equal(fresh.low_res_logits, fed_back.low_res_logits)  # the test can tell them apart


def test_a_click_on_a_slice_without_a_box_borrows_the_nearest_box(tiny_sam):
    """A click on the next slice borrows this slice's box and segments a slice that had nothing: nothing to say."""
    session, _, obj, ijk = _boxed_medsam(tiny_sam)
    plane = next(iter(session.objects[obj].slices))
    below = session.add_point(obj, session.volume.ijk_to_ras_points(np.array([ijk + [0, 0, 1]]))[0], view="axial")
    assert below.plane != plane and below.mask.any() and below.note == ""
