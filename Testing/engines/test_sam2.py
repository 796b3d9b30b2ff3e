"""SAM 2 through the `sam2` package: a tiny random-weight SAM 2.1 saved as the official checkpoints are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedFMLib.engines import create_engine
from MedFMLib.engines.base import Prompts2D
from MedFMLib.engines.sam2 import Sam2Engine
from MedFMLib.errors import ModelError
from MedFMLib.imaging.geometry import SlicePlane, extract_slice, resolve_axis
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.interaction.propagation import PropagationOptions, StopCriteria
from MedFMLib.interaction.session import Session
from MedFMLib.models.store import ModelStore

NEVER_STOP = PropagationOptions(criteria=StopCriteria(0, 0.0, -np.inf, 0.0, np.inf, 0, min_object_fraction=0.0))


def phantom(dims=(40, 36, 12)):
    matrix = make_ijk_to_ras((0.9, 1.0, 2.0), (5.0, -3.0, 12.0), (12, -6, 20), (-1, -1, 1))
    centre = matrix[:3, :3] @ (np.array(dims) / 2.0) + matrix[:3, 3]
    volume, masks = render(dims, matrix, [Ellipsoid(tuple(centre), (10.0, 8.0, 9.0), 200.0)], noise_sd=3.0)
    return volume, masks[0], centre


class CountingSam2(Sam2Engine):
    """The real SAM 2 engine, counting how often the image encoder runs."""

    def __init__(self, engine: Sam2Engine):
        super().__init__(engine.model, engine.model_name, engine.device, engine.weights_id, engine.prompt_types)
        self.encodes = 0

    def encode(self, image):
        self.encodes += 1
        return super().encode(image)


def test_the_checkpoint_loads_through_the_store_and_a_click_decodes(tiny_sam2, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    store = ModelStore()
    store.import_file(tiny_sam2, "sam2_tiny")
    engine = create_engine("sam2_tiny", device="cpu", store=store)
    assert isinstance(engine, Sam2Engine) and engine.image_size == 128
    image = np.random.default_rng(0).random((60, 80), dtype=np.float32)
    embedding = engine.encode(image)
    first = engine.decode(embedding, Prompts2D([[40, 30]], [1]))
    assert first.mask.shape == (60, 80) and first.low_res_logits.shape[-2:] == (32, 32)
    boxed = engine.decode(embedding, Prompts2D([[40, 30]], [1], box=[10, 10, 60, 50]), first.low_res_logits)
    assert boxed.mask.shape == (60, 80)
    assert not np.array_equal(first.mask, boxed.mask)  # the prompts reach the decoder
    # The file on disk is what the authors ship: {"model": state_dict}.
    saved = torch.load(tiny_sam2, map_location="cpu", weights_only=True)
    assert set(saved) == {"model"} and any(k.startswith("image_encoder.trunk.") for k in saved["model"])


def test_a_wrong_checkpoint_is_refused_with_one_line(tiny_sam2, tiny_sam_catalog, tmp_path):
    sam1 = tiny_sam_catalog.parent / "sam_tiny.pth"
    with pytest.raises(ModelError, match="looks like a SAM \\(1\\) checkpoint"):
        create_engine("sam2_tiny", checkpoint=sam1, device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        create_engine("sam2_tiny", checkpoint=junk, device="cpu")
    # The tiny weights do not fit the full-size architecture of a catalog model.
    with pytest.raises(ModelError, match="SAM 2 checkpoint of another size"):
        create_engine("sam2.1_hiera_tiny", checkpoint=tiny_sam2, device="cpu", store=ModelStore(tmp_path / "h"))


def test_tracking_runs_from_arrays_and_encodes_each_slice_once(tiny_sam2):
    volume, _, centre = phantom()
    engine = CountingSam2(create_engine("sam2_tiny", checkpoint=tiny_sam2, device="cpu"))
    session = Session(volume, engine)
    obj = session.add_object()
    start = session.add_point(obj, centre).plane
    assert engine.encodes == 1
    result = session.propagate(obj, options=NEVER_STOP)
    count = volume.dimensions[start.axis]
    assert {d: r for _, d, r, _ in result.stops} == {"forward": "edge", "backward": "edge"}
    assert result.slices_written == count - 1
    assert engine.encodes == count  # the clicked slice's embedding was reused by the tracker
    for plane, state in result.states.items():
        assert state.mask.shape == plane.shape(volume) and 0.0 <= state.score <= 1.0
    masks = [s.mask for s in result.states.values()]
    assert any(m.any() for m in masks) and not all(np.array_equal(masks[0], m) for m in masks)
    # Tracking again encodes nothing: the frames come from the session's cache.
    session.propagate(obj, options=NEVER_STOP)
    assert engine.encodes == count


def test_tracking_never_overwrites_anchors_and_stays_in_the_3d_box(tiny_sam2):
    volume, _, centre = phantom(dims=(40, 36, 16))
    session = Session(volume, create_engine("sam2_tiny", checkpoint=tiny_sam2, device="cpu"))
    obj = session.add_object()
    start = session.add_point(obj, centre).plane
    ijk = volume.ras_to_ijk_points(centre)
    ijk[start.axis] += 4
    other = session.add_point(obj, volume.ijk_to_ras_points(ijk)).plane
    anchors = {p: session.objects[obj].slices[p].mask.copy() for p in (start, other)}
    result = session.propagate(obj, options=NEVER_STOP)
    assert start not in result.states and other not in result.states
    for plane, mask in anchors.items():
        assert np.array_equal(session.objects[obj].slices[plane].mask, mask)
    # A 3D box: nothing outside its slices, nothing outside its footprint.
    boxed = session.add_object()
    session.set_roi(boxed, [centre - [6, 6, 5], centre + [6, 6, 5]], options=NEVER_STOP)
    axis = resolve_axis(volume.ijk_to_ras, "axial")
    filled = [
        i for i in range(volume.dimensions[axis]) if extract_slice(session.mask(boxed), SlicePlane(axis, i)).any()
    ]
    corners = volume.ras_to_ijk_points(np.array([centre - [6, 6, 5], centre + [6, 6, 5]]))
    assert filled and min(filled) >= int(np.floor(corners[:, axis].min())) - 1
    assert max(filled) <= int(np.ceil(corners[:, axis].max())) + 1


def test_tracking_through_the_servers_gpu_queue_gives_the_same_masks(tiny_sam2):
    """On a server, SAM 2 tracking runs one queued step per slice; frames it encodes re-enter the queue's worker."""
    import threading

    from MedFMLib.remote.server.gpu_queue import GpuQueue, QueuedEngine

    volume, _, centre = phantom()
    engine = CountingSam2(create_engine("sam2_tiny", checkpoint=tiny_sam2, device="cpu"))
    queue = GpuQueue()
    sessions = [Session(volume, engine), Session(volume, QueuedEngine(engine, queue))]
    for session in sessions:
        obj = session.add_object()
        session.add_point(obj, centre)
    queued_steps = []
    original_call = queue.call

    def counting_call(owner, function):
        queued_steps.append(threading.current_thread())
        return original_call(owner, function)

    queue.call = counting_call
    results = [session.propagate(1, options=NEVER_STOP) for session in sessions]
    assert results[0].stops == results[1].stops and results[1].slices_written == volume.dimensions[2] - 1
    assert np.array_equal(sessions[0].mask(1), sessions[1].mask(1))
    assert len(queued_steps) >= results[1].slices_written  # one queued call per tracked slice at least
    assert queue.stats.tasks >= results[1].slices_written
    queue.stop()


def test_tracking_in_a_3d_box_fills_each_of_its_slices_and_nothing_outside_it(tiny_sam2):
    """A box with faces along the grid, given by its eight corners: its slices and footprint worked out by hand."""
    volume, _, centre = phantom(dims=(40, 36, 16))
    session = Session(volume, create_engine("sam2_tiny", checkpoint=tiny_sam2, device="cpu"))
    axis = resolve_axis(volume.ijk_to_ras, "axial")
    low, high = np.array([12.0, 10.0, 12.0]), np.array([28.0, 26.0, 28.0])
    low[axis], high[axis] = 3.6, 11.3  # slices 4 (3.6 <= 4 + 0.5) to 11 (11 - 0.5 <= 11.3)
    corners = np.array([[(low, high)[a][0], (low, high)[b][1], (low, high)[c][2]]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])  # fmt: skip
    obj = session.add_object()
    session.set_roi(obj, volume.ijk_to_ras_points(corners), options=NEVER_STOP)
    mask = session.mask(obj)
    kji = np.argwhere(mask)[:, ::-1]  # (i, j, k) of every voxel
    assert sorted(set(kji[:, axis])) == list(range(4, 12))  # every slice of the box, and no other
    in_plane = [a for a in range(3) if a != axis]
    for a in in_plane:  # within the footprint, to half a voxel; the model's masks reach past it otherwise
        assert kji[:, a].min() >= low[a] - 0.5 and kji[:, a].max() <= high[a] + 0.5, a
    touching = [k for k in range(4, 12) if any(
        np.isin(kji[kji[:, axis] == k][:, a], [int(np.ceil(low[a] - 0.5)), int(np.floor(high[a] + 0.5))]).any()
        for a in in_plane)]  # fmt: skip
    assert len(touching) >= 4  # the footprint is what bounds them
