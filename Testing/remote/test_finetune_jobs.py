"""Fine-tuning jobs on a real `medfm serve` process (tiny SAM on the CPU), through the real client.

A job trains, reports its progress, registers its model with a card that names no case, and the model is
served only by a server started with --publish-finetunes. A stopped job keeps its best weights; a bad job gets
one clear line and trains nothing; a job without the token is refused.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import SERVER_TOKEN, ServerProcess, server_home, upload_frame
from conftest import server_request as raw
from MedFMLib.errors import ModelError, RemoteError, VolumeError
from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.remote.client import RemoteSession, ServerConnection
from MedFMLib.remote.finetune_client import (
    finetune_frame,
    finetune_status,
    run_remote_finetune,
    stop_finetune,
    submit_finetune,
)
from MedFMLib.testing import write_tiny_sam_catalog
from MedFMLib.training.embeddings import MemoryCase

MODELS = "classic,sam_tiny,medsam_tiny"
#: what the cases are called on the client: none of it may reach the server's card, store or log
CASE_NAMES = ("DOE^JANE_0042", "ROE^RICHARD_0043", "POE^EDGAR_0044")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    # Decoder weights at their initial scale: what a network trains from.
    return write_tiny_sam_catalog(tmp_path_factory.mktemp("finetune_models"), decoder_scale=1.0)


def start_server(tmp_path_factory, catalog, *flags) -> ServerProcess:
    home, env = server_home(tmp_path_factory.mktemp("finetune_server"), catalog)
    return ServerProcess(home, ["--models", MODELS, "--device", "cpu", *flags], env=env).start()


@pytest.fixture(scope="module")
def publishing_server(tmp_path_factory, catalog):
    server = start_server(tmp_path_factory, catalog, "--publish-finetunes")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_server(tmp_path_factory, catalog):
    server = start_server(tmp_path_factory, catalog)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cases() -> list[MemoryCase]:
    """Three small phantoms (a bright ellipsoid in noise, 2 mm slices), each with its label map."""
    matrix = make_ijk_to_ras((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (0, 0, 0), (1, 1, 1))
    made = []
    for number, name in enumerate(CASE_NAMES):
        shape = Ellipsoid((17.0 + 2 * number, 19.0, 4.0), (7.0 + number, 6.0, 3.0), 200.0)
        volume, masks = render((36, 36, 5), matrix, [shape], noise_sd=5.0, seed=number, name=name)
        made.append(MemoryCase(name, volume, masks[0].astype(np.int32) * (1 + number % 2)))
    return made


def connect(server, token=SERVER_TOKEN) -> ServerConnection:
    return ServerConnection(server.url, token, reconnect_seconds=5.0)


@contextmanager
def server_store(server, catalog):
    """The server's own model store, read from this process."""
    from MedFMLib.models.store import ModelStore

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDFM_CATALOG", str(catalog))
        yield ModelStore(server.home)


def work_files(server) -> list:
    """Files the server's fine-tuning jobs left under its home (uploaded cases, embeddings, checkpoints)."""
    root = server.home / "finetune-jobs"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def wait_for(connection, job: str, condition, seconds: float = 240.0) -> dict:
    """Poll the job until ``condition(state)``; the limit only keeps a broken server from hanging the suite."""
    deadline = time.monotonic() + seconds
    while True:
        state = finetune_status(connection, job)
        if condition(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_a_job_trains_reports_progress_and_its_model_is_published(publishing_server, cases, catalog):
    connection = connect(publishing_server)
    seen = []
    settings = {"epochs": 2, "lr": 1e-3, "batch_size": 4, "prompts": ["box", "points"], "seed": 3}
    state = run_remote_finetune(connection, cases, "sam_tiny", "sam_tiny_liver", settings, val_fraction=0.34,
                                progress=lambda *report: seen.append(report[3]), poll_seconds=0.2)  # fmt: skip

    assert state["status"] == "done" and state["finished"] and state["error"] is None
    statuses = [report["status"] for report in seen]
    assert statuses[-1] == "done"
    # Polling sees what the job is doing when it asks: some running state, whichever the timing.
    assert set(statuses) & {"queued", "embedding", "training", "evaluating"}, statuses
    assert all(report["total"] >= report["done"] >= 0 for report in seen)
    assert [record["epoch"] for record in state["history"]] == [1, 2]
    assert all(np.isfinite(record["loss"]) and 0.0 <= record["val_dice"] <= 1.0 for record in state["history"])
    assert (state["loss"], state["val_dice"]) == (state["history"][-1]["loss"], state["history"][-1]["val_dice"])
    assert state["cases"] == {"training": 2, "validation": 1}

    card = state["card"]
    assert card["kind"] == "medfm fine-tune" and card["base_model"] == "sam_tiny"
    assert card["data"]["training_cases"] == 2 and card["data"]["validation_cases"] == 1
    assert card["training"]["epochs_run"] == 2 and card["training"]["ended_by"] == "epochs"
    assert card["training"]["prompts"] == ["box", "points"] and card["training"]["seed"] == 3
    text = json.dumps(card)
    assert not any(part in text for name in CASE_NAMES for part in name.split("^")), "a case name in the card"
    assert "case0" not in text  # nor the server's own numbering

    # Registered in the server's store, with the same card; the base's encoder, a trained decoder.
    import torch

    with server_store(publishing_server, catalog) as store:
        assert store.info("sam_tiny_liver").engine == "sam"
        assert store.card("sam_tiny_liver") == card
        weights = torch.load(store.path("sam_tiny_liver"), map_location="cpu", weights_only=True)
    base = torch.load(catalog.parent / "sam_tiny.pth", map_location="cpu", weights_only=True)
    assert set(weights) == set(base)
    assert all(torch.equal(weights[key], base[key]) for key in base if key.startswith("image_encoder."))
    decoder_changed = any(not torch.equal(weights[key], base[key]) for key in base if key.startswith("mask_decoder."))
    assert decoder_changed == (card["training"]["best_epoch"] >= 1)

    # Published: listed for every client, and a session opens with it.
    assert state["published"] is True and "published" in state["message"]
    assert connection.check()["finetune"]["publish"] is True
    listed = {model["name"]: model for model in connect(publishing_server).models()}
    assert listed["sam_tiny_liver"]["kind"] == "slice" and listed["sam_tiny_liver"]["state"] in ("ready", "loaded")
    volume = cases[0].volume
    centre = volume.ijk_to_ras_points(np.array([[17.0, 19.0, 2.0]]))[0]
    session = RemoteSession(connection, volume, "sam_tiny_liver")
    update = session.add_point(session.add_object("liver"), centre, view="axial")
    assert update.mask is not None and update.mask.shape == (36, 36)
    session.close()

    # Nothing of the cases is left on the server, and its log names none of them.
    assert work_files(publishing_server) == []
    log = publishing_server.log_text()
    assert not any(part in log for name in CASE_NAMES for part in name.split("^"))
    assert "Traceback" not in log
    assert state["job"] not in log and f"/v1/finetune/{state['job'][:6]}…" in log  # the whole id grants access


def test_a_stopped_job_keeps_its_best_weights_and_is_not_served_without_publishing(private_server, cases, catalog):
    connection = connect(private_server)
    job = submit_finetune(connection, cases, "sam_tiny", "sam_tiny_private", {"epochs": 500, "batch_size": 2}, 0.34)
    state = wait_for(connection, job, lambda state: state["status"] == "training" or state["finished"])
    assert state["status"] == "training", state
    assert stop_finetune(connection, job)["stop_requested"] is True
    state = wait_for(connection, job, lambda state: state["finished"])

    assert state["status"] == "stopped", state
    card = state["card"]
    assert card["training"]["ended_by"] == "stopped" and card["training"]["epochs_run"] < 500
    assert "best weights were kept" in state["message"]
    # Saved in the server's store, but not served: the status says how the administrator publishes it.
    assert state["published"] is False
    assert "not served" in state["message"] and "--publish-finetunes" in state["message"]
    assert f"--models {MODELS},sam_tiny_private" in state["message"]
    with server_store(private_server, catalog) as store:
        assert store.card("sam_tiny_private") == card
    assert "sam_tiny_private" not in [model["name"] for model in connection.models()]
    with pytest.raises(ModelError, match="does not offer 'sam_tiny_private'"):
        RemoteSession(connection, cases[0].volume, "sam_tiny_private")
    status, reply = raw(private_server, "POST", "/v1/sessions", upload_frame(np.zeros((4, 16, 16), np.int16),
                                                                             model="sam_tiny_private"))  # fmt: skip
    assert status == 409 and "does not offer" in reply["message"]
    assert work_files(private_server) == []
    # A stopped job stays stopped; asking again changes nothing.
    assert stop_finetune(connection, job)["status"] == "stopped"


def test_a_job_that_fails_says_why_and_leaves_nothing(private_server, cases, catalog):
    """Labels of one voxel each pass the upload's checks but hold nothing large enough to train on."""
    connection = connect(private_server)
    dots = []
    for case in cases:
        labels = np.zeros_like(case.labels)
        labels[2, 18, 18] = 1
        dots.append(MemoryCase(case.name, case.volume, labels))
    with pytest.raises(RemoteError, match="no object large enough to train on"):
        run_remote_finetune(connection, dots, "sam_tiny", "sam_tiny_dots", {"epochs": 1}, poll_seconds=0.2)
    with server_store(private_server, catalog) as store:
        assert "sam_tiny_dots" not in store.models()
    assert work_files(private_server) == []
    info = connection.check()["finetune"]
    assert info["publish"] is False and info["running"] is False and info["queued"] == 0


def _wrong_shape(cases):
    broken = list(cases)
    broken[1] = MemoryCase("x", cases[1].volume, cases[1].labels[:, :, :-1])
    return {"cases": broken}


def _empty(cases):
    return {"cases": [cases[0], MemoryCase("x", cases[1].volume, np.zeros_like(cases[1].labels)), cases[2]]}


def _negative(cases):
    return {"cases": [cases[0], MemoryCase("x", cases[1].volume, -cases[1].labels)]}


POINTS_FOR_A_BOX_MODEL = {"base": "medsam_tiny", "config": {"prompts": ["points"]}}
BAD_JOBS = {
    "label of the wrong shape": (_wrong_shape, 400, "Case 2: the label map's shape [5, 36, 35] is not the image's"),
    "empty label": (_empty, 400, "Case 2: the label map is empty"),
    "negative label": (_negative, 400, "Case 2: label values must be 0"),
    "one case": (lambda cases: {"cases": cases[:1]}, 400, "at least 2 cases"),
    "unknown base": (lambda cases: {"base": "sam_huge"}, 409, "does not offer 'sam_huge'"),
    "base not SAM": (lambda cases: {"base": "classic"}, 409, "not a SAM-family model"),
    "name taken": (lambda cases: {"name": "medsam_tiny"}, 409, "already offers a model named 'medsam_tiny'"),
    "unsafe name": (lambda cases: {"name": "../evil"}, 400, "cannot name a model"),
    "points for a box model": (lambda cases: POINTS_FOR_A_BOX_MODEL, 400, "box-prompted"),
    "bad setting": (lambda cases: {"config": {"epochs": 0}}, 422, "Invalid 'config.epochs'"),
}


@pytest.mark.parametrize("problem", sorted(BAD_JOBS))
def test_a_bad_job_gets_one_clear_line_and_nothing_is_trained(publishing_server, cases, catalog, problem):
    change, expected_status, message = BAD_JOBS[problem]
    job = {"cases": cases, "base": "sam_tiny", "name": "never_trained", "config": {"epochs": 1}, **change(cases)}
    status, reply = raw(publishing_server, "POST", "/v1/finetune", finetune_frame(**job))
    assert status == expected_status, reply
    assert message in reply["message"] and "\n" not in reply["message"]
    with server_store(publishing_server, catalog) as store:
        assert "never_trained" not in store.models()
    assert work_files(publishing_server) == []


def test_the_client_raises_the_servers_line_for_a_label_of_the_wrong_shape(publishing_server, cases):
    with pytest.raises(VolumeError, match=r"^Case 2: the label map's shape \[5, 36, 35\] is not the image's"):
        submit_finetune(connect(publishing_server), _wrong_shape(cases)["cases"], "sam_tiny", "never_trained")
    assert "never_trained" not in publishing_server.log_text()


def test_a_job_without_the_token_is_refused(publishing_server, cases):
    body = finetune_frame(cases, "sam_tiny", "never_trained", {"epochs": 1})
    for token, message in ((None, "needs a token"), ("wrong-token-0123456789", "Wrong token")):
        status, reply = raw(publishing_server, "POST", "/v1/finetune", body, token=token)
        assert status == 401 and message in reply["message"]
        for method in ("GET", "DELETE"):
            assert raw(publishing_server, method, "/v1/finetune/anything", token=token)[0] == 401
    with pytest.raises(RemoteError, match="refused the token"):
        submit_finetune(connect(publishing_server, "wrong-token-0123456789"), cases, "sam_tiny", "never_trained")
    assert work_files(publishing_server) == []


def test_an_unknown_job_is_404_on_status_and_stop(publishing_server):
    for method in ("GET", "DELETE"):
        status, reply = raw(publishing_server, method, "/v1/finetune/no-such-job")
        assert status == 404 and reply["error"] == "JobGone" and "not on the server" in reply["message"]
    with pytest.raises(RemoteError, match="not on the server"):
        finetune_status(connect(publishing_server), "no-such-job")
