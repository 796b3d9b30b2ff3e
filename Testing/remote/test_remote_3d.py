"""A 3D model (tiny nnInteractive) through a real `medfm serve`: the same masks as local, changed regions only."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SERVER_TOKEN, ServerProcess, run_medfm, sphere_volume
from MedFMLib.engines.nninteractive import NNInteractiveEngine
from MedFMLib.engines.volumetric import changed_region
from MedFMLib.errors import PromptError
from MedFMLib.imaging.io import write_volume
from MedFMLib.interaction.volume_session import VolumeSession
from MedFMLib.remote.client import ServerConnection
from MedFMLib.remote.volume_client import RemoteVolumeSession, open_remote_session


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_volume_catalog):
    from MedFMLib.models.store import ModelStore

    home = tmp_path_factory.mktemp("remote3d")
    env = {"MEDFM_CATALOG": str(tiny_volume_catalog)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDFM_CATALOG", str(tiny_volume_catalog))
        ModelStore(home).import_file(tiny_volume_catalog.parent / "nninteractive_tiny", "nninteractive_tiny")
    process = ServerProcess(home, ["--models", "classic,nninteractive_tiny", "--device", "cpu"], env=env)
    process.start()
    yield process
    process.stop()


def ras_of(volume, k, j, i):
    return volume.ijk_to_ras_points(np.array([i, j, k], dtype=float))


def test_remote_3d_session_matches_the_local_one_and_sends_changed_regions(server, tiny_volume_catalog):
    volume, _, centre = sphere_volume("oblique_lps", dims=(40, 36, 20), radius_mm=8.0, noise_sd=5.0)
    connection = ServerConnection(server.url, SERVER_TOKEN)
    remote = open_remote_session(connection, volume, "nninteractive_tiny")
    assert isinstance(remote, RemoteVolumeSession) and remote.engine.kind == "volume"
    local = VolumeSession(volume, NNInteractiveEngine.from_folder(tiny_volume_catalog.parent / "nninteractive_tiny",
                                                                  autozoom=False))  # fmt: skip
    k, j, i = np.rint(volume.ras_to_ijk_points(centre)[::-1])
    stroke = [ras_of(volume, k, j - 3, i - 3), ras_of(volume, k, j + 3, i + 3)]
    headers = []
    mirror = remote._apply_reply
    remote._apply_reply = lambda header, parts: (headers.append(header), mirror(header, parts))
    changes = {}
    for session in (local, remote):
        object_id = session.add_object("lesion")
        session.add_point(object_id, centre)
        before = session.mask(object_id).copy()
        headers.clear()
        session.add_scribble(object_id, stroke, positive=False, view="axial")
        changes[session is remote] = changed_region(before, session.mask(object_id))
        session.add_point(object_id, ras_of(volume, k, j + 8, i + 8), positive=False)
        session.undo()
    # Only the region that changed travels (compressed), not the whole mask.
    (region,) = headers[0]["regions"]
    assert region["start"] == list(changes[False].offset) and region["mask"]["shape"] == list(
        changes[False].mask.shape)  # fmt: skip
    np.testing.assert_array_equal(remote.mask(1), local.mask(1))
    assert [(p.kind, p.positive) for p in remote.volume_prompts(1)] == [("point", True), ("scribble", False)]
    assert remote.can_redo and remote.prompts(1)[0].ras == pytest.approx(tuple(centre))
    remote.redo()
    local.redo()
    np.testing.assert_array_equal(remote.mask(1), local.mask(1))
    with pytest.raises(PromptError, match="answers in 3D already"):
        remote.propagate(1)
    with pytest.raises(PromptError, match="one slice"):
        remote.set_roi(1, [ras_of(volume, 3, 3, 3), ras_of(volume, 12, 20, 20)])
    remote.close()


def test_a_slice_session_refuses_3d_prompts_and_the_cli_segments_on_the_server(server, tmp_path):
    volume, _, centre = sphere_volume("ras_aligned", dims=(32, 30, 24), radius_mm=6.0)
    connection = ServerConnection(server.url, SERVER_TOKEN)
    classic = open_remote_session(connection, volume, "classic")
    object_id = classic.add_object()
    with pytest.raises(PromptError, match="takes no scribble"):
        classic._call("add_scribble", RemoteVolumeSession._stroke(object_id, [centre], True, "axial"))
    classic.close()
    path, out = tmp_path / "ct.nrrd", tmp_path / "out.seg.nrrd"
    write_volume(path, volume)
    point = ",".join(map(str, centre))
    result = run_medfm("segment", path, "--server", server.url, "--model", "nninteractive_tiny", "--point", point,
                       "--out", out, env={"MEDFM_TOKEN": SERVER_TOKEN})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"at {server.url}" in result.stdout and out.is_file()
