"""Remote sessions against a real `medfm serve` process: the same masks as local, for many users, across restarts."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from conftest import (
    LENIENT,
    SERVER_TOKEN,
    ServerProcess,
    add_fiducials,
    add_segmentation_node,
    nudge,
    run_medfm,
    same_returns,
    same_state,
    script,
    server_home,
    sphere_volume,
    voxel_of,
)
from MedFMLib.engines import Prompts2D, create_engine
from MedFMLib.errors import PromptError
from MedFMLib.imaging.geometry import SlicePlane, extract_slice
from MedFMLib.imaging.io import read_volume, write_volume
from MedFMLib.interaction.propagation import dice
from MedFMLib.interaction.session import Session
from MedFMLib.remote.client import RemotePropagationResult, RemoteSession, ServerConnection


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sam_catalog):
    home, env = server_home(tmp_path_factory.mktemp("remote"), tiny_sam_catalog)
    process = ServerProcess(home, ["--models", "classic,sam_tiny,medsam_tiny", "--device", "cpu"], env=env)
    process.start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _tiny_models_locally(tiny_sam):
    """The local sessions compared with the server's use the same tiny catalog."""


def connect(server, **kwargs) -> ServerConnection:
    return ServerConnection(server.url, SERVER_TOKEN, **kwargs)


def local_engine(model: str, tiny_sam_catalog):
    checkpoint = None if model == "classic" else tiny_sam_catalog.parent / "sam_tiny.pth"
    return create_engine(model, checkpoint=checkpoint, device="cpu")


@pytest.mark.parametrize(("model", "geometry"), [("classic", "oblique_lps"), ("sam_tiny", "oblique_anisotropic")])
def test_a_remote_session_gives_the_same_masks_as_a_local_one(server, tiny_sam_catalog, model, geometry):
    volume, _, centre = sphere_volume(geometry)
    local = Session(volume, local_engine(model, tiny_sam_catalog))
    connection = connect(server)
    remote = RemoteSession(connection, volume, model)
    local_returns = script(local, centre, volume)
    sent_before = connection.traffic.sent
    remote_returns = script(remote, centre, volume)
    same_returns(local_returns[::2], remote_returns[::2])
    for step, (local_labels, remote_labels) in enumerate(zip(local_returns[1::2], remote_returns[1::2])):
        assert np.array_equal(local_labels, remote_labels), f"step {step}"
    same_state(local, remote)
    assert np.array_equal(local.labelmap(), remote.labelmap())
    assert np.array_equal(local.prompt_seeds(1), remote.prompt_seeds(1))
    assert local.propagation_axis(1) == remote.propagation_axis(1)
    assert local.mask(1).sum() > 50
    # After the upload, only prompts go up: a dozen actions cost a few KiB, not the volume again.
    assert connection.traffic.sent - sent_before < 40 * 1024 < volume.array.nbytes
    assert remote.engine.model_name == model and remote.engine.device == "cpu"
    remote.close()


def test_a_remote_session_finds_the_phantoms_own_answers(server):
    """Answers that come from the phantom, not from a local Session: its sphere's section, the sphere, a 3D box."""
    volume, sphere, centre = sphere_volume("oblique_lps", noise_sd=2.0)
    other_centre = volume.ijk_to_ras_points(np.array([6.0, 6.0, 12.0]))  # a voxel in the dark body, far from it
    remote = RemoteSession(connect(server), volume, "classic")
    clicked = remote.add_object("sphere")
    plane = remote.add_point(clicked, centre).plane
    expected = np.zeros_like(sphere)
    expected[plane.array_index()] = extract_slice(sphere, plane)
    np.testing.assert_array_equal(remote.mask(clicked), expected)  # the classic model is exact on a phantom
    assert remote.mask(clicked)[voxel_of(volume, centre)] and not remote.mask(clicked)[voxel_of(volume, other_centre)]
    remote.propagate(clicked)
    assert dice(remote.mask(clicked), sphere) >= 0.9
    boxed = remote.add_object("boxed")
    remote.set_roi(boxed, [centre - 14.0, centre + 14.0])  # a box around the 9 mm sphere
    assert dice(remote.mask(boxed), sphere) >= 0.9
    assert set(np.unique(remote.labelmap())) == {0, boxed}  # the later object is on top
    remote.undo()
    assert not remote.mask(boxed).any() and dice(remote.mask(clicked), sphere) >= 0.9
    remote.close()


def test_three_d_boxes_plans_and_repropagation_match_local(server, tiny_sam_catalog):
    volume, _, centre = sphere_volume("lps_anisotropic")
    corners = [centre - 9.0, centre + 9.0]
    local = Session(volume, local_engine("medsam_tiny", tiny_sam_catalog))
    remote = RemoteSession(connect(server), volume, "medsam_tiny")
    done = []
    for session in (local, remote):
        object_id = session.add_object()
        result = session.plan_roi(
            object_id, corners, options=LENIENT, progress=lambda d, t, p, s=session: done.append((s, d, t, p))
        )
        assert result.slices_written > 3  # the options reached the server: a random model passes every check
        session.apply_propagation(result)
        plane = min((p for p, s in session.objects[object_id].slices.items() if s.origin == "propagated"), key=str)
        ijk = volume.ras_to_ijk_points(centre)
        ijk[plane.axis] = plane.index  # a correcting box on that propagated slice (axis K: offsets in I and J)
        on_plane = volume.ijk_to_ras_points(ijk)
        session.set_box(object_id, nudge(volume, on_plane, -4, -4), nudge(volume, on_plane, 4, 4), view=plane.axis)
        session.repropagate(object_id, plane, options=LENIENT)
    same_state(local, remote)
    assert np.array_equal(local.roi(1), remote.roi(1))
    assert any(s is remote and isinstance(p, SlicePlane) for s, _, _, p in done)  # progress came from the server
    assert isinstance(remote.plan_propagation(1), RemotePropagationResult)


def test_a_remote_propagation_can_be_cancelled(server):
    volume, _, centre = sphere_volume("ras_aligned", dims=(40, 40, 60), radius_mm=25.0)
    remote = RemoteSession(connect(server), volume, "classic")
    object_id = remote.add_object()
    remote.add_point(object_id, centre)
    full = remote.plan_propagation(object_id)
    cancelled = remote.plan_propagation(object_id, cancel=lambda: True)
    assert full.slices_written > 20 and cancelled.slices_written < full.slices_written
    assert "cancelled" in [reason for _, _, reason, _ in cancelled.stops]
    before = remote.mask(object_id).copy()
    remote.apply_propagation(cancelled)
    assert np.array_equal(remote.mask(object_id)[before], before[before])  # the clicked slice is kept


def test_prefetching_encodes_on_the_server_before_the_click(server, tiny_sam_catalog):
    volume, _, centre = sphere_volume("ras_aligned")
    connection = connect(server)
    remote = RemoteSession(connection, volume, "sam_tiny")
    plane = SlicePlane(2, int(round(volume.ras_to_ijk_points(centre)[2])))
    assert not remote.is_encoded(plane)
    before = connection.check()["queue"]["tasks"]
    remote.embedding(plane)
    assert remote.is_encoded(plane)
    assert connection.check()["queue"]["tasks"] == before + 1  # one encode
    remote.add_point(remote.add_object(), centre)
    assert connection.check()["queue"]["tasks"] == before + 2  # then only the decode


def test_several_clients_at_once_get_their_own_results(start_server, tmp_path, tiny_sam_catalog):
    """A bounded load test: 6 users, 2 models, different volumes, at the same time; each gets exactly what local gives.

    Encodes are not batched here: a batched encode rounds floats about 1e-6 differently, and a random tiny
    model carried through a volume turns that into different walks. Unbatched, every user's masks, scores
    and history must be bit-identical to a local session, so any leak between users shows.
    (Batching keeps each user's own embedding: see the batch test below.)
    """
    home, env = server_home(tmp_path, tiny_sam_catalog)
    server = start_server(["--models", "classic,sam_tiny", "--device", "cpu", "--max-batch", "1"], home=home, env=env)
    geometries = ["ras_aligned", "lps_anisotropic", "oblique_anisotropic", "oblique_lps"]
    failures, finished = [], []

    def user(index: int) -> None:
        try:
            model = "sam_tiny" if index % 2 else "classic"
            volume, _, centre = sphere_volume(geometries[index % 4], radius_mm=7.0 + index)
            local = Session(volume, local_engine(model, tiny_sam_catalog))
            remote = RemoteSession(connect(server), volume, model)
            for session in (local, remote):
                object_id = session.add_object()
                for step in range(4):
                    session.add_point(object_id, nudge(volume, centre, step, -step), positive=step != 2)
                session.propagate(object_id)
            same_state(local, remote)
            finished.append(remote.session_id)
            remote.close()
        except Exception as exc:  # noqa: BLE001 - reported below with its user
            failures.append((index, repr(exc)))

    open_before = connect(server).check()["sessions"]
    threads = [threading.Thread(target=user, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    assert not failures
    assert len(set(finished)) == 6
    info = connect(server).check()
    assert info["sessions"] == open_before and info["queue"]["pending"] == 0


def test_the_cli_segments_on_a_server_with_the_same_result(server, tmp_path):

    volume, _, centre = sphere_volume("oblique_lps")
    source = tmp_path / "sphere.nrrd"
    write_volume(source, volume)
    point = ",".join(f"{v:.4f}" for v in centre)
    outputs = {}
    for where in ("local", "remote"):
        extra = ["--server", server.url] if where == "remote" else []
        result = run_medfm(
            "segment", source, "--point", point, "--propagate", "--keep-connected",
            "--out", tmp_path / f"{where}.nrrd", *extra, env={"MEDFM_TOKEN": SERVER_TOKEN},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[where] = read_volume(tmp_path / f"{where}.nrrd").array
    assert f"at {server.url}" in result.stdout
    assert outputs["local"].any() and np.array_equal(outputs["local"], outputs["remote"])
    listed = run_medfm("models", "list", "--server", server.url, env={"MEDFM_TOKEN": SERVER_TOKEN})
    assert listed.returncode == 0 and "sam_tiny" in listed.stdout and "medsam_tiny" in listed.stdout
    wrong = run_medfm("segment", source, "--point", point, "--out", tmp_path / "x.nrrd", "--server", server.url,
                env={"MEDFM_TOKEN": "wrong-token-0123456789"})  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "refused the token" in wrong.stderr


def test_a_server_restart_mid_session_is_invisible_to_the_user(tmp_path, tiny_sam_catalog):
    """The client uploads again and replays the session; the user's masks, prompts and undo history survive."""
    home, env = server_home(tmp_path, tiny_sam_catalog)
    server = ServerProcess(home, ["--models", "classic,sam_tiny", "--device", "cpu"], env=env).start()
    try:
        volume, _, centre = sphere_volume("oblique_anisotropic")
        local = Session(volume, local_engine("sam_tiny", tiny_sam_catalog))
        remote = RemoteSession(connect(server), volume, "sam_tiny")
        written = []
        for session in (local, remote):
            object_id = session.add_object()
            session.add_point(object_id, centre)
            session.add_point(object_id, nudge(volume, centre, 2, 0), positive=False)
            written.append(session.propagate(object_id, options=LENIENT).slices_written)
            session.undo()
            session.redo()
            session.add_point(object_id, nudge(volume, centre, -1, 1))
            session.undo()
        # The replay must carry real propagations: both walks wrote slices (to the volume's edges).
        assert written[0] == written[1] == volume.dimensions[2] - 1
        assert local.mask(1).sum() > 0 and local.can_redo
        planned = remote.plan_propagation(1, "forward", options=LENIENT)
        server.restart()
        # The first action after the restart: the client finds its session gone, uploads and replays.
        for session in (local, remote):
            session.redo()
        assert remote.reconnects == 1
        same_state(local, remote)
        # A plan made before the restart is planned again on the new session when applied.
        local_plan = local.plan_propagation(1, "forward", options=LENIENT)
        local.apply_propagation(local_plan)
        remote.apply_propagation(planned)
        same_state(local, remote)

        # The server goes away for a while during an action: the client waits for it and carries on.
        server.stop()
        restarter = threading.Timer(1.5, server.start, kwargs={"wait": False})
        restarter.start()
        started = time.monotonic()
        for session in (local, remote):
            session.add_point(1, nudge(volume, centre, 0, 1))
        restarter.join()
        assert time.monotonic() - started > 1.0 and remote.reconnects == 2
        same_state(local, remote)
    finally:
        server.stop()


def test_an_expired_session_is_uploaded_again_transparently(start_server):
    server = start_server(["--session-ttl", "0.5"])
    volume, _, centre = sphere_volume("lps_anisotropic")
    local = Session(volume, create_engine("classic"))
    remote = RemoteSession(connect(server), volume, "classic")
    for session in (local, remote):
        session.add_point(session.add_object(), centre)
    time.sleep(1.5)
    for session in (local, remote):
        session.add_point(1, nudge(volume, centre, 1, 1), positive=False)
    assert remote.reconnects == 1
    same_state(local, remote)


def test_waiting_encodes_run_as_one_batch_with_the_same_embeddings(tiny_sam):
    """The GPU queue batches same-sized slices that wait together; each user gets its own slice's embedding."""
    from MedFMLib.remote.server.gpu_queue import GpuQueue, QueuedEngine

    engine = create_engine("sam_tiny", checkpoint=tiny_sam, device="cpu")
    queue = GpuQueue(max_batch=4)
    queued = QueuedEngine(engine, queue)
    images = [np.random.default_rng(seed).random((40, 56)).astype(np.float32) for seed in range(5)]
    gate = threading.Event()
    blocker = threading.Thread(target=queue.call, args=(engine, gate.wait))  # the worker is busy meanwhile
    blocker.start()
    while queue.pending:
        time.sleep(0.01)
    results = [None] * len(images)

    def encode(index: int) -> None:
        results[index] = queued.encode(images[index])

    threads = [threading.Thread(target=encode, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    while queue.pending < len(images):
        time.sleep(0.01)
    gate.set()
    for thread in threads + [blocker]:
        thread.join(60)
    assert (queue.stats.batches, queue.stats.batched_encodes, queue.stats.tasks) == (1, 4, 6)  # blocker, 4, then 1
    for image, embedding in zip(images, results):
        alone = engine.encode(image)
        assert embedding.features.shape == alone.features.shape and embedding.image_shape == image.shape
        assert np.allclose(embedding.features.numpy(), alone.features.numpy(), atol=1e-4)
        assert embedding.features.untyped_storage().nbytes() == embedding.nbytes  # owns its memory
    # Decodes and failures come back to the caller that queued them.
    prompts = Prompts2D(np.array([[20.0, 20.0]], np.float32), [1])
    assert queued.decode(results[0], prompts).mask.shape == (40, 56)
    with pytest.raises(PromptError):
        queued.decode(results[0], Prompts2D(np.zeros((0, 2), np.float32), []))
    queue.stop()


def test_the_slicer_logic_switches_to_the_server_by_url_and_token(server, mrml_scene, tmp_path, tiny_sam_catalog):
    """Real MRML: the module's logic writes the same segment through the server as locally, and frees the session."""

    from MedFMLib.errors import RemoteError
    from MedFMLib.models.store import ModelStore
    from MedFMLib.mrml.bridge import add_volume_node, segment_array
    from MedFMLib.mrml.logic import SegmentationLogic

    volume, _, centre = sphere_volume("oblique_lps")
    volume_node = add_volume_node(mrml_scene, volume)
    clicks = add_fiducials(mrml_scene, "clicks", centre, nudge(volume, centre, 1, 1))
    home, _ = server_home(tmp_path / "home", tiny_sam_catalog)  # the same tiny model on this computer
    logic = SegmentationLogic(store=ModelStore(home))
    written = {}
    for where in ("local", "remote"):
        if where == "remote":
            info = logic.configureServer(server.url, SERVER_TOKEN)
            assert logic.isRemote and info["version"] and "sam_tiny" in logic.modelNames()
            assert logic.isModelReady("sam_tiny") and not logic.isModelReady("sam_vit_h")
            open_before = connect(server).check()["sessions"]
        segmentation = add_segmentation_node(mrml_scene, volume_node)
        segment_id = logic.segment(volume_node, segmentation, "sphere", positivePointsNode=clicks, modelName="sam_tiny")
        written[where] = segment_array(segmentation, segment_id, volume)
    assert written["local"].any() and np.array_equal(written["local"], written["remote"])
    assert connect(server).check()["sessions"] == open_before  # the logic closed its session
    with pytest.raises(RemoteError, match="refused the token"):
        logic.configureServer(server.url, "wrong-token-0123456789")
    assert not logic.isRemote  # a failed connection leaves the logic local
    logic.configureServer("")
    assert not logic.isRemote and "sam_vit_b" in logic.modelNames()


def test_the_remote_benchmark_compares_clicks_and_counts_bytes(server):

    result = run_medfm(
        "bench", "--server", server.url, "--model", "classic", "--size", "64", "--first-clicks", "1",
        "--clicks", "5", "--slices", "6", "--json", env={"MEDFM_TOKEN": SERVER_TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["identical_masks"] == "3/3"
    assert figures["remote_click_ms_p50"] > 0 and figures["local_click_ms_p50"] > 0
    assert 100 < figures["bytes_sent_per_click_p50"] < 2000  # a prompt, not an image
    assert figures["upload_mb"] < figures["volume_mb"]  # compressed


def test_the_load_benchmark_runs_clients_at_once_and_counts_errors(server):
    result = run_medfm("bench", "--server", server.url, "--clients", "4", "--clicks", "6", "--size", "48",
                       "--slices", "8", "--json", env={"MEDFM_TOKEN": SERVER_TOKEN})  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["clients"], figures["served"], figures["errors"]) == (4, 4, 0)
    assert 0 < figures["click_ms_p50"] <= figures["click_ms_p95"]
    assert figures["sessions_after"] == figures["sessions_before"]
    alone = run_medfm("bench", "--clients", "2", env={"MEDFM_TOKEN": SERVER_TOKEN})
    assert alone.returncode == 1 and "--clients needs --server" in alone.stderr


def test_a_click_a_box_only_model_cannot_answer_is_said_so_by_the_server_too(server, tiny_sam_catalog):
    volume, _, centre = sphere_volume("oblique_lps")
    local = Session(volume, local_engine("medsam_tiny", tiny_sam_catalog))
    remote = RemoteSession(connect(server), volume, "medsam_tiny")
    notes = []
    for session in (local, remote):
        obj = session.add_object()
        session.set_box(obj, nudge(volume, centre, -6, -6), nudge(volume, centre, 6, 6), view="axial")
        notes.append(session.add_point(obj, nudge(volume, centre, 1, 1), positive=False, view="axial").note)
    assert "medsam_tiny reads boxes only" in notes[0] and notes[1] == notes[0]
    remote.close()
