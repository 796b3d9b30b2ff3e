"""Fine-tuning on a MedFM server: upload labelled cases, follow the job, stop it.

The cases travel as a volume upload does (one frame: a JSON header, then each case's image and label map,
compressed), without their names: the server calls them by number, and the model card it writes holds counts
and figures only. Standard library and numpy only, like the rest of the client.

    job = submit_finetune(connection, cases, "medsam", "medsam_liver", config)
    state = run_remote_finetune(connection, cases, "medsam", "medsam_liver", config, progress=print)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import RemoteError
from .client import ServerConnection
from .protocol import ARRAY_DTYPES, FRAME_CONTENT_TYPE, encode_array, pack_frame

FINETUNE_PATH = "/v1/finetune"
#: the settings a job takes, and the server's defaults for those left out
SETTINGS = ("epochs", "lr", "batch_size", "prompts", "seed")
FINISHED = ("done", "failed", "stopped")

Progress = Callable[[str, int, int, dict], None]


def _case_arrays(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, ijk_to_ras) of a MemoryCase (or anything with ``volume`` and ``labels``) or a pair."""
    volume, labels = (case.volume, case.labels) if hasattr(case, "volume") else case
    image = np.asarray(volume.array)
    if image.dtype.name not in ARRAY_DTYPES or image.dtype == bool:
        image = image.astype(np.float32)
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif labels.dtype.kind not in "iu" or labels.dtype.itemsize > 4:
        labels = labels.astype(np.int32)
    return image, labels, np.asarray(volume.ijk_to_ras, dtype=np.float64)


def _settings(config, val_fraction: float) -> dict:
    """A FinetuneConfig, a dict, or None (the server's defaults), as the job's ``config`` field."""
    if config is None:
        values = {}
    elif isinstance(config, dict):
        values = {key: value for key, value in config.items() if key in (*SETTINGS, "val_fraction")}
    else:
        values = {key: getattr(config, key) for key in SETTINGS if hasattr(config, key)}
    if "prompts" in values:
        values["prompts"] = list(values["prompts"])
    values.setdefault("val_fraction", float(val_fraction))
    return values


def finetune_frame(cases: Sequence, base: str, name: str, config=None, val_fraction: float = 0.2,
                   codec: str = "zlib") -> bytes:  # fmt: skip
    """The upload of a fine-tuning job: the header, then each case's image and label map."""
    described, parts = [], []
    for case in cases:
        image, labels, matrix = _case_arrays(case)
        image_meta, image_blob = encode_array(image, codec)
        labels_meta, labels_blob = encode_array(labels, codec)
        described.append({"ijk_to_ras": matrix.tolist(), "image": image_meta, "labels": labels_meta})
        parts += [image_blob, labels_blob]
    header = {"base": base, "name": name, "config": _settings(config, val_fraction), "cases": described}
    return pack_frame(header, parts)


def submit_finetune(connection: ServerConnection, cases: Sequence, base: str, name: str, config=None,
                    val_fraction: float = 0.2) -> str:  # fmt: skip
    """Send a fine-tuning job to the server; its id. A job the server refuses raises its one-line reason."""
    connection.check()  # the server's codecs, and that it speaks this protocol
    body = finetune_frame(cases, base, name, config, val_fraction, connection.codec)
    _, _, data = connection.request("POST", FINETUNE_PATH, body, FRAME_CONTENT_TYPE)
    return json.loads(data)["job"]


def finetune_status(connection: ServerConnection, job: str) -> dict:
    """The job's status: status, phase, done/total, loss, val_dice, history; at the end card, published, message."""
    return connection.json("GET", f"{FINETUNE_PATH}/{job}")


def stop_finetune(connection: ServerConnection, job: str) -> dict:
    """Ask the server to stop the job (the best weights so far are kept); its status."""
    return connection.json("DELETE", f"{FINETUNE_PATH}/{job}")


def run_remote_finetune(
    connection: ServerConnection,
    cases: Sequence,
    base: str,
    name: str,
    config=None,
    val_fraction: float = 0.2,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    poll_seconds: float = 0.5,
) -> dict:
    """Submit a job and follow it to its end; the final status (done or stopped). A failed job raises.

    ``progress(status, done, total, state)`` is called whenever the status, phase or count changes (``state``
    is the whole status); ``stop()`` true asks the server to stop the job, which then ends as "stopped".
    """
    job = submit_finetune(connection, cases, base, name, config, val_fraction)
    seen, stopping = None, False
    while True:
        state = finetune_status(connection, job)
        key = (state["status"], state["phase"], state["done"], state["total"])
        if progress is not None and key != seen:
            progress(state["status"], state["done"], state["total"], state)
        seen = key
        if state["finished"]:
            break
        if stop is not None and not stopping and stop():
            stop_finetune(connection, job)
            stopping = True
        time.sleep(poll_seconds)
    if state["status"] == "failed":
        error = state.get("error") or {}
        raise RemoteError(f"Fine-tuning on the server failed: {error.get('message') or state.get('message')}")
    return state
