"""The client of a MedFM server: a ``RemoteSession`` that works like a local ``Session``.

The volume is uploaded once, compressed. After that each action sends only
its prompt (JSON) and receives the changed slices and, per object, only the
changed region of its mask. The session's objects and masks are mirrored
here, so reading them costs no round trip.

If the server restarts or the session expires, the next action uploads the
volume again and replays what was done (the actions are journaled), then
carries on: the user sees the same masks. Standard library and numpy only,
so Slicer needs nothing more to use a server.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .. import __version__
from ..errors import MedFMError, ModelError, PromptError, ProtocolError, RemoteError, VolumeError
from ..imaging.geometry import SlicePlane, ViewLike, extract_slice
from ..imaging.intensity import Window
from ..imaging.volume import Volume
from ..interaction.objects import BoxPrompt, PointPrompt, SegmentObject, SessionObjects, SliceState, SliceUpdate
from ..interaction.propagation import PropagationOptions, PropagationResult
from .protocol import (
    FRAME_CONTENT_TYPE,
    PROTOCOL_VERSION,
    choose_codec,
    decode_array,
    encode_array,
    is_loopback,
    pack_frame,
    unpack_frame,
)

_ERRORS = {
    "PromptError": PromptError,
    "VolumeError": VolumeError,
    "ModelError": ModelError,
    "InvalidArgument": PromptError,
}
_RETRIED = (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError)


class SessionGoneError(RemoteError):
    """The server no longer has the session (restart, expiry); the client uploads again."""


@dataclass
class TrafficCounter:
    """Bytes on the wire (HTTP request and status lines, headers and bodies) and requests made."""

    sent: int = 0
    received: int = 0
    requests: int = 0


#: a reply larger than this is refused before it is read whole (a whole-volume mask of 1024³ is 128 MiB)
MAX_REPLY_BYTES = 1 << 30
#: hosts already warned about (once per process): the token crosses the network in clear
_WARNED_HOSTS: set[str] = set()
log = logging.getLogger("medfm.client")


class ServerConnection:
    """HTTP(S) to one MedFM server, with its token; one keep-alive connection per thread."""

    def __init__(
        self,
        url: str,
        token: str,
        ca_cert: str | None = None,
        timeout: float = 300.0,
        reconnect_seconds: float = 30.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RemoteError(f"'{url}' is not a server address; give one like https://gpu-server:8000.")
        if not token:
            raise RemoteError("A MedFM server needs its token; the server's administrator has it.")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._token = token.strip()
        self._timeout = timeout
        self.reconnect_seconds = reconnect_seconds
        self._ssl = ssl.create_default_context(cafile=ca_cert) if parsed.scheme == "https" else None
        self._local = threading.local()
        self.traffic = TrafficCounter()
        self.info: dict | None = None
        self.max_reply_bytes = max_reply_bytes
        if parsed.scheme == "http" and not is_loopback(parsed.hostname) and parsed.hostname not in _WARNED_HOSTS:
            _WARNED_HOSTS.add(parsed.hostname)
            log.warning(
                "medfm: warning: the token and the images go to %s unencrypted (http); ask for an https address.",
                parsed.hostname,
            )

    # ------------------------------------------------------------ transport
    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            if self._scheme == "https":
                connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ssl
                )
            else:
                connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.connection = connection
        return connection

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, str, bytes]:
        """(status, content type, body); waits out a server restart for ``reconnect_seconds``."""
        headers = {
            "Authorization": f"Bearer {self._token}",
            "X-MedFM-Protocol": str(PROTOCOL_VERSION),
            "X-MedFM-Version": __version__,
            "X-MedFM-Codec": self.codec,
        }
        if body is not None:
            headers["Content-Type"] = content_type
        deadline = time.monotonic() + self.reconnect_seconds
        delay = 0.1
        fresh = False
        while True:
            try:
                connection = self._connection(fresh)
                connection.request(method, self._prefix + path, body=body, headers=headers)
                response = connection.getresponse()
                data = self._read_bounded(response)
                break
            except ssl.SSLError as exc:
                raise RemoteError(
                    f"TLS with {self.url} failed ({exc.reason or exc}); if the server has its own certificate, "
                    "give its CA file (--ca-cert or MEDFM_CA_CERT)."
                ) from None
            except (*_RETRIED, TimeoutError, OSError) as exc:
                # A dropped keep-alive connection, or a server that is restarting: retry on a new one.
                self._connection(fresh=True)
                fresh = True
                if isinstance(exc, TimeoutError) or time.monotonic() + delay > deadline:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                    raise RemoteError(
                        f"Cannot reach the MedFM server at {self.url} ({reason}); check the address, "
                        "and that `medfm serve` runs there."
                    ) from None
                time.sleep(delay)
                delay = min(2.0, delay * 2)
        self.traffic.requests += 1
        self.traffic.sent += (
            len(body or b"") + len(method) + len(path) + 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        )
        self.traffic.received += len(data) + 17 + sum(len(k) + len(v) + 4 for k, v in response.getheaders())
        if response.status >= 400:
            self._raise(response.status, data)
        return response.status, response.getheader("Content-Type", ""), data

    def _read_bounded(self, response: http.client.HTTPResponse) -> bytes:
        """The reply's body, refused past ``max_reply_bytes``: a hostile server cannot fill this computer's memory."""
        length = response.getheader("Content-Length")
        declared_too_large = length is not None and length.isdigit() and int(length) > self.max_reply_bytes
        data = b"" if declared_too_large else response.read(self.max_reply_bytes + 1)
        if declared_too_large or len(data) > self.max_reply_bytes:
            self._connection(fresh=True)  # the rest of that reply is never read
            raise ProtocolError(
                f"The server at {self.url} sent a reply larger than {self.max_reply_bytes / 2**20:.0f} MiB; "
                "is it a MedFM server?"
            )
        return data

    def _raise(self, status: int, data: bytes) -> None:
        try:
            reply = json.loads(data)
            kind, message = reply.get("error", ""), reply.get("message") or str(reply.get("detail", ""))
        except (ValueError, AttributeError):
            kind, message = "", data[:200].decode("utf-8", "replace")
        if status == 401:
            raise RemoteError(f"The MedFM server at {self.url} refused the token: {message}")
        if status in (404, 410) and kind in ("SessionGone", "SessionLost"):
            raise SessionGoneError(message)
        if kind in _ERRORS:
            raise _ERRORS[kind](message)
        if kind == "ProtocolError":
            raise ProtocolError(message)
        raise RemoteError(f"The MedFM server said: {message or f'HTTP {status}'}")

    @property
    def codec(self) -> str:
        return choose_codec(self.info.get("codecs", []) if self.info else [])

    # ------------------------------------------------------------ calls
    def json(self, method: str, path: str, message: dict | None = None) -> dict:
        body = None if message is None else json.dumps(message).encode()
        _, _, data = self.request(method, path, body)
        return json.loads(data)

    def check(self) -> dict:
        """The server's description (models, version, limits), after checking that we speak its protocol."""
        info = self.json("GET", "/v1")
        if info.get("server") != "medfm":
            raise RemoteError(f"{self.url} does not answer as a MedFM server.")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise RemoteError(
                f"The server at {self.url} runs MedFM {info.get('version')} (protocol {info.get('protocol')}) and "
                f"this is MedFM {__version__} (protocol {PROTOCOL_VERSION}); install the same version on both."
            )
        self.info = info
        return info

    def models(self) -> list[dict]:
        return self.check()["models"]


@dataclass
class RemoteEngine:
    """What a remote session tells about its engine (its model runs on the server)."""

    model_name: str
    device: str
    prompt_types: tuple[str, ...]
    server: str
    tracks_with_memory: bool = False

    @property
    def cache_id(self) -> str:
        return f"{self.model_name}@{self.server}"


@dataclass
class RemotePropagationResult(PropagationResult):
    """A propagation computed on the server; ``apply_propagation`` applies it there."""

    result_id: int | None = None
    written: int = 0
    #: the call that planned it, to plan it again after a server restart
    plan: tuple[str, dict] | None = None
    #: the server session it was planned on: on another one (after a restart) it is planned again
    session_id: str | None = None

    @property
    def slices_written(self) -> int:
        return self.written


def _ras_list(point) -> list[float]:
    return [float(v) for v in np.asarray(point, dtype=np.float64).reshape(-1)]


def _view_value(view):
    if view is None or isinstance(view, (str, int)):
        return view
    if isinstance(view, np.integer):
        return int(view)
    return _ras_list(view)


def _options_value(options: PropagationOptions | None):
    return None if options is None else asdict(options)


class RemoteSession(SessionObjects):
    """A :class:`~MedFMLib.session.Session` whose model runs on a MedFM server.

    Same methods, same return types; masks and prompts are mirrored here.
    The 3D masks are exactly the server's. A slice's ``mask`` (in its
    ``SliceState`` and ``SliceUpdate``) is that slice of the 3D mask, so where
    slices of other views cross it, it holds their lines too.
    """

    def __init__(
        self,
        connection: ServerConnection,
        volume: Volume,
        model: str,
        window: Window | None = None,
        isotropic: bool | None = None,
    ) -> None:
        self.connection = connection
        self.volume = volume
        self.model = model
        self.window = window
        self.isotropic = isotropic
        self.objects: dict[int, SegmentObject] = {}
        self.reconnects = 0
        self._journal: list[tuple[str, dict]] = []
        self._can_undo = self._can_redo = False
        self._sequence = 0
        self._lock = threading.RLock()
        self._encoded: set[SlicePlane] = set()
        self._open()

    # ------------------------------------------------------------ the session
    def _open(self) -> None:
        info = self.connection.check()
        offered = {m.get("name"): m for m in info.get("models", []) if isinstance(m, dict)}
        if self.model not in offered:
            raise ModelError(f"The server does not offer '{self.model}'; it offers {', '.join(offered) or 'nothing'}.")
        meta, blob = encode_array(self.volume.array, self.connection.codec)
        header = {
            "model": self.model,
            "ijk_to_ras": np.asarray(self.volume.ijk_to_ras, dtype=np.float64).tolist(),
            "array": meta,
            "window": None if self.window is None else [self.window.width, self.window.level],
            "isotropic": self.isotropic,
        }
        _, _, data = self.connection.request("POST", "/v1/sessions", pack_frame(header, [blob]), FRAME_CONTENT_TYPE)
        reply = self.opened = json.loads(data)
        self.session_id = reply["session"]
        self.engine = RemoteEngine(
            self.model, reply["device"], tuple(reply["prompt_types"]), self.connection.url,
            tracks_with_memory=offered[self.model].get("engine") == "sam2",
        )  # fmt: skip
        self.window = Window(*reply["window"]) if reply.get("window") else self.window
        self.objects.clear()
        self._can_undo = self._can_redo = False
        self._encoded.clear()

    def close(self) -> None:
        """Free the session on the server (it would expire anyway)."""
        try:
            self.connection.json("DELETE", f"/v1/sessions/{self.session_id}")
        except MedFMError:
            pass

    def _recover(self) -> None:
        """Upload the volume again and replay every action: the server restarted or the session expired."""
        self.reconnects += 1
        journal = list(self._journal)
        self._open()
        for method, args in journal:
            if method == "apply_plan":
                planned = self._send(args["method"], args["args"])
                self._send("apply_propagation", {"result": planned["propagation"]["result"]})
            else:
                self._send(method, args)

    def _send(self, method: str, args: dict) -> dict:
        self._sequence += 1
        body = json.dumps({"seq": self._sequence, "method": method, "args": args}).encode()
        _, _, data = self.connection.request("POST", f"/v1/sessions/{self.session_id}/call", body)
        header, parts = unpack_frame(data)
        self._apply_reply(header, parts)
        return header

    def _recovering(self, send) -> dict:
        """``send()``, and once more after uploading and replaying if the server lost the session."""
        try:
            return send()
        except SessionGoneError:
            self._recover()
            return send()

    def _call(self, method: str, args: dict, journal: tuple[str, dict] | None | bool = True) -> dict:
        with self._lock:
            header = self._recovering(lambda: self._send(method, args))
            if journal is True:
                self._journal.append((method, args))
            elif journal:
                self._journal.append(journal)
            return header

    # ------------------------------------------------------------ the mirror
    def _apply_reply(self, header: dict, parts: list[bytes]) -> None:
        listed = {object_id: (name, color) for object_id, name, color in header.get("objects", [])}
        for object_id in [o for o in self.objects if o not in listed]:
            del self.objects[object_id]
        for object_id, (name, color) in listed.items():
            if object_id not in self.objects:
                mask = np.zeros(self.volume.array.shape, dtype=bool)
                self.objects[object_id] = SegmentObject(object_id, name, tuple(color), mask)
        # A reply never holds more than one byte per voxel of this volume (a whole-volume mask is less):
        # that bound holds against a hostile server too, before anything is decompressed.
        if "array" in header:
            header["_array"] = decode_array(header["array"], parts[0], max_bytes=self.volume.array.size)
        blobs = iter(parts[1:] if "array" in header else parts)
        for region in header.get("regions", []):
            crop = decode_array(region["mask"], next(blobs), max_bytes=(self.volume.array.size + 7) // 8)
            start = region["start"]
            if len(start) != 3 or crop.ndim != 3 or any(
                not 0 <= s <= s + n <= limit for s, n, limit in zip(start, crop.shape, self.volume.array.shape)
            ):
                raise ProtocolError("The server sent a mask region outside the volume; is it a MedFM server?")
            target = tuple(slice(s, s + n) for s, n in zip(start, crop.shape))
            self.objects[region["object"]].mask[target] = crop
        for object_id, axis, index, summary in header.get("slices", []):
            obj = self.objects.get(object_id)
            if obj is None:
                continue
            plane = SlicePlane(axis, index)
            if summary is None:
                obj.slices.pop(plane, None)
                continue
            box = summary["box"]
            obj.slices[plane] = SliceState(
                plane,
                points=tuple(PointPrompt(p[0], (p[1], p[2], p[3]), bool(p[4])) for p in summary["points"]),
                box=None if box is None else BoxPrompt(box[0], tuple(box[1]), tuple(box[2])),
                mask=extract_slice(obj.mask, plane).copy() if summary["has_mask"] else None,
                score=summary["score"],
                origin=summary["origin"],
                roi_corners=None if summary["roi"] is None else np.asarray(summary["roi"]),
            )
        self._can_undo = bool(header.get("can_undo"))
        self._can_redo = bool(header.get("can_redo"))

    def _updates(self, header: dict) -> list[SliceUpdate]:
        updates = []
        for object_id, axis, index, score, *note in header.get("updates", []):  # older servers send no note
            plane = SlicePlane(axis, index)
            obj = self.objects.get(object_id)
            state = obj.slices.get(plane) if obj is not None else None
            updates.append(SliceUpdate(object_id, plane, None if state is None else state.mask, score, *note[:1]))
        return updates

    def _single(self, header: dict) -> SliceUpdate:
        return self._updates(header)[-1]

    def _propagation(self, summary: dict, plan=None) -> RemotePropagationResult:
        return RemotePropagationResult(
            summary["object"],
            summary["axis"],
            stops=[tuple(stop) for stop in summary["stops"]],
            result_id=summary["result"],
            written=summary["slices_written"],
            plan=plan,
            session_id=self.session_id,
        )

    # ------------------------------------------------------------ objects
    def add_object(self, name: str | None = None, color: Sequence[float] | None = None) -> int:
        args = {"name": name, "color": None if color is None else [float(c) for c in color]}
        return self._call("add_object", args)["value"]

    def remove_object(self, object_id: int) -> None:
        self._call("remove_object", {"object_id": int(object_id)})

    def prompt_seeds(self, object_id: int) -> np.ndarray:
        """Computed on the server, where the slices' own masks are."""
        return self._call("prompt_seeds", {"object_id": int(object_id)}, journal=False)["_array"]

    # ------------------------------------------------------------ prompts
    def add_point(self, object_id: int, ras: Sequence[float], positive: bool = True, view: ViewLike = "axial"):
        args = {"object_id": int(object_id), "ras": _ras_list(ras), "positive": bool(positive)}
        return self._single(self._call("add_point", dict(args, view=_view_value(view))))

    def set_box(self, object_id: int, corner_a, corner_b, view: ViewLike = "axial", keep_other_slices=False):
        args = {"object_id": int(object_id), "corner_a": _ras_list(corner_a), "corner_b": _ras_list(corner_b)}
        args.update(view=_view_value(view), keep_other_slices=bool(keep_other_slices))
        return self._single(self._call("set_box", args))

    def move_prompt(self, object_id: int, prompt_id: int, ras: Sequence[float]) -> list[SliceUpdate]:
        args = {"object_id": int(object_id), "prompt_id": int(prompt_id), "ras": _ras_list(ras)}
        return self._updates(self._call("move_prompt", args))

    def move_box(self, object_id: int, corner_a, corner_b) -> SliceUpdate:
        args = {"object_id": int(object_id), "corner_a": _ras_list(corner_a), "corner_b": _ras_list(corner_b)}
        return self._single(self._call("move_box", args))

    def remove_prompt(self, object_id: int, prompt_id: int) -> SliceUpdate:
        return self._single(self._call("remove_prompt", {"object_id": int(object_id), "prompt_id": int(prompt_id)}))

    def clear_object(self, object_id: int) -> list[SliceUpdate]:
        return self._updates(self._call("clear_object", {"object_id": int(object_id)}))

    # ------------------------------------------------------------ 3D
    def _roi_args(self, object_id, corners, view, propagate, options) -> dict:
        return {
            "object_id": int(object_id),
            "corners": [_ras_list(c) for c in np.asarray(corners, dtype=np.float64)],
            "view": _view_value(view),
            "propagate": bool(propagate),
            "options": _options_value(options),
        }

    def _propagate_args(self, object_id, direction, view, start, until_converged, options) -> dict:
        return {
            "object_id": int(object_id),
            "direction": direction,
            "view": _view_value(view),
            "start": None if start is None else int(start),
            "until_converged": bool(until_converged),
            "options": _options_value(options),
        }

    def plan_roi(self, object_id, corners, view="axial", propagate=True, options=None, progress=None, cancel=None):
        return self._plan("plan_roi", self._roi_args(object_id, corners, view, propagate, options), progress, cancel)

    def set_roi(self, object_id, corners, view="axial", propagate=True, options=None) -> PropagationResult:
        result = self.plan_roi(object_id, corners, view, propagate, options)
        self.apply_propagation(result)
        return result

    def plan_propagation(
        self, object_id, direction="both", view=None, start=None, until_converged=False, options=None,
        progress=None, cancel=None,
    ) -> RemotePropagationResult:  # fmt: skip
        args = self._propagate_args(object_id, direction, view, start, until_converged, options)
        return self._plan("plan_propagation", args, progress, cancel)

    def propagate(
        self, object_id, direction="both", view=None, start=None, until_converged=False, options=None,
        progress=None, cancel=None,
    ) -> RemotePropagationResult:  # fmt: skip
        result = self.plan_propagation(object_id, direction, view, start, until_converged, options, progress, cancel)
        self.apply_propagation(result)
        return result

    def repropagate(self, object_id: int, plane: SlicePlane, options: PropagationOptions | None = None):
        args = {"object_id": int(object_id), "plane": [plane.axis, plane.index], "options": _options_value(options)}
        return self._propagation(self._call("repropagate", args)["propagation"])

    def _plan(self, method: str, args: dict, progress, cancel) -> RemotePropagationResult:
        """A propagation planned on the server as a job, reporting progress; ``cancel()`` true stops it there."""
        for attempt in range(2):
            try:
                jobs = f"/v1/sessions/{self.session_id}/jobs"
                path = f"{jobs}/{self.connection.json('POST', jobs, {'method': method, 'args': args})['job']}"
                cancelled = False
                while True:
                    state = self.connection.json("GET", path)
                    if progress is not None and state["plane"] is not None:
                        progress(state["done"], state["total"], SlicePlane(*state["plane"]))
                    if state["finished"]:
                        break
                    if cancel is not None and not cancelled and cancel():
                        self.connection.json("DELETE", path)
                        cancelled = True
                    time.sleep(0.05)
                break
            except SessionGoneError:
                if attempt:
                    raise
                with self._lock:
                    self._recover()
        if "error" in state:
            error = state["error"]
            raise _ERRORS.get(error["error"], RemoteError)(error["message"])
        return self._propagation(state["propagation"], plan=(method, args))

    def apply_propagation(self, result: PropagationResult) -> list[SliceUpdate]:
        if not isinstance(result, RemotePropagationResult) or result.result_id is None:
            raise PromptError("Only a propagation planned on this server can be applied to a remote session.")
        with self._lock:
            header = self._recovering(lambda: self._apply_planned(result))
            self._journal.append(("apply_plan", {"method": result.plan[0], "args": result.plan[1]}))
        return self._updates(header)

    def _apply_planned(self, result: RemotePropagationResult) -> dict:
        if result.session_id != self.session_id:
            # Planned on a session the server no longer has (its ids start again): plan it again here.
            result.result_id = self._send(*result.plan)["propagation"]["result"]
            result.session_id = self.session_id
        return self._send("apply_propagation", {"result": result.result_id})

    # ------------------------------------------------------------ undo, redo
    @property
    def can_undo(self) -> bool:
        return self._can_undo

    @property
    def can_redo(self) -> bool:
        return self._can_redo

    def undo(self) -> list[SliceUpdate]:
        return self._updates(self._call("undo", {}))

    def redo(self) -> list[SliceUpdate]:
        return self._updates(self._call("redo", {}))

    # ------------------------------------------------------------ encoding
    def embedding(self, plane: SlicePlane) -> None:
        """Have the server encode a plane ahead of the click (the Slicer effect's prefetching)."""
        body = {"planes": [[plane.axis, plane.index]]}
        try:
            self.connection.json("POST", f"/v1/sessions/{self.session_id}/encode", body)
        except SessionGoneError:
            return  # the next action uploads again
        self._encoded.add(plane)

    def is_encoded(self, plane: SlicePlane) -> bool:
        return plane in self._encoded
