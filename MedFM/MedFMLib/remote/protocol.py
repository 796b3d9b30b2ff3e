"""The wire format shared by the MedFM server and its client.

Everything is JSON or raw array bytes: no pickle, nothing executable. Arrays
travel as their raw little-endian bytes, compressed (zstd where both sides
have it, zlib otherwise), next to a small JSON header that says their dtype and
shape. Boolean masks are bit-packed first, so a mask crop costs 1 bit a voxel
before compression.

A *frame* is ``MAGIC``, the JSON header's length (4 bytes, big-endian), the
header, then the parts it lists, back to back. Only the standard library and
numpy are used, so the client runs inside Slicer without extra packages.
"""

from __future__ import annotations

import ipaddress
import json
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from ..errors import ProtocolError

#: bumped on any incompatible change; client and server must agree on it
PROTOCOL_VERSION = 1
FRAME_MAGIC = b"MFM1"
FRAME_CONTENT_TYPE = "application/x-medfm-frame"
#: a frame's JSON header, and any JSON request body, stays below this
MAX_HEADER_BYTES = 256 * 1024
ARRAY_DTYPES = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})
_HEADER_LENGTH = struct.Struct(">I")


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this computer (traffic to it never crosses a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def available_codecs() -> list[str]:
    """Codecs this side can read and write, preferred first."""
    try:
        import zstandard  # noqa: F401

        return ["zstd", "zlib"]
    except ImportError:
        return ["zlib"]


def choose_codec(theirs: Sequence[str]) -> str:
    """The first of our codecs the other side has too (zlib is always there)."""
    return next((codec for codec in available_codecs() if codec in theirs), "zlib")


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    if codec == "zlib":
        return zlib.compress(data, 1)  # level 1: several times faster than 6, a few % larger on images
    raise ProtocolError(f"Unknown codec '{codec}'; this side knows {', '.join(available_codecs())}.")


_PIECE_BYTES = 16 * 2**20


def decompress_into(data, codec: str, out: memoryview) -> None:
    """Decompress into ``out``, which the payload must fill exactly: more (a bomb) or less is refused.

    The output is bounded by ``out``'s size and written piece by piece, so memory never holds more than
    the target and one piece; ``data`` may be any bytes-like object (a memoryview of an upload).
    """
    out = out.cast("B")
    size = len(out)
    if size <= 0:
        raise ProtocolError("A compressed payload must declare a positive size.")
    try:
        if codec == "zstd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                filled = 0
                while filled < size:
                    count = reader.readinto(out[filled : filled + _PIECE_BYTES])
                    if count == 0:
                        break
                    filled += count
                beyond = reader.read(1)
        elif codec == "zlib":
            filled = _inflate_into(data, out)
            beyond = filled > size
        else:
            raise ProtocolError(f"Unknown codec '{codec}'; use one of {', '.join(available_codecs())}.")
    except ProtocolError:
        raise
    except Exception as exc:  # zlib.error, zstandard.ZstdError: corrupt data
        raise ProtocolError(f"Compressed data is corrupt ({codec}: {exc}).") from None
    if filled < size:
        raise ProtocolError(f"Compressed data holds less than the {size} bytes declared.")
    if beyond:
        raise ProtocolError(f"Compressed data holds more than the {size} bytes declared.")


def _inflate_into(data, out: memoryview) -> int:
    """zlib into ``out``; returns the bytes the payload holds, stopping at ``len(out) + 1`` (a bomb)."""
    inflater, filled, size = zlib.decompressobj(), 0, len(out)

    def take(pending) -> bytes:
        nonlocal filled
        # max_length is never 0 (that would mean "no limit"); one byte past the end is enough to tell.
        piece = inflater.decompress(pending, min(_PIECE_BYTES, size - filled + 1))
        if filled + len(piece) <= size:
            out[filled : filled + len(piece)] = piece
        filled += len(piece)
        return piece

    source = memoryview(data).cast("B")
    # Input goes in 1 MiB at a time: zlib keeps what it could not use yet as a copy (unconsumed_tail).
    for start in range(0, len(source), 2**20):
        pending = source[start : start + 2**20]
        while filled <= size:
            take(pending)
            pending = inflater.unconsumed_tail
            if not pending:
                break
    while filled <= size and take(b""):  # output zlib still holds
        pass
    return filled


def decompress(data, codec: str, size: int) -> bytes:
    """Decompress exactly ``size`` bytes (a positive Python integer: it bounds what the decompressor may make)."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ProtocolError(f"A compressed payload must declare a positive size, not {size!r}.")
    out = bytearray(size)
    decompress_into(data, codec, memoryview(out))
    return bytes(out)


def declared_bytes(dtype: str, shape: object) -> int:
    """The bytes an array of this type and shape holds on the wire, in Python integers (no wrap-around).

    Refuses a type not on the list, a shape that is not a list of positive integers, and an empty array.
    """
    if dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"Array type '{dtype}' is not accepted; use one of {sorted(ARRAY_DTYPES)}.")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ProtocolError("An array shape must be a list of at most 8 positive integers.")
    count = math.prod(shape)
    return (count + 7) // 8 if dtype == "bool" else count * np.dtype(dtype).itemsize


def encode_array(array: np.ndarray, codec: str) -> tuple[dict, bytes]:
    """An array as (JSON-able description, compressed bytes)."""
    array = np.asarray(array)
    dtype = "bool" if array.dtype == bool else array.dtype.newbyteorder("<").name
    if dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"Arrays of type {array.dtype} cannot be sent; use one of {sorted(ARRAY_DTYPES)}.")
    if dtype == "bool":
        raw = np.packbits(array.reshape(-1)).tobytes()
    else:
        raw = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    meta = {"dtype": dtype, "shape": [int(n) for n in array.shape], "codec": codec, "size": len(raw)}
    return meta, compress(raw, codec)


def decode_array(meta: dict, blob: bytes, max_bytes: int) -> np.ndarray:
    """The array a description and its bytes stand for, after checking that they agree.

    ``max_bytes`` bounds what the array may hold once decompressed; it is checked, with the declared
    shape's size, before anything is decompressed. Server and client both decode through here.
    """
    try:
        dtype, shape, codec, size = meta["dtype"], meta["shape"], meta["codec"], meta["size"]
    except (KeyError, TypeError):
        raise ProtocolError("An array description needs dtype, shape, codec and size.") from None
    expected = declared_bytes(dtype, shape)
    if expected > max_bytes:
        raise ProtocolError(
            f"The array ({expected / 2**20:.1f} MiB) is larger than the {max_bytes / 2**20:.1f} MiB allowed."
        )
    if not isinstance(size, int) or isinstance(size, bool) or size != expected:
        raise ProtocolError(f"Array of shape {shape} and type {dtype} should hold {expected} bytes, not {size}.")
    if dtype == "bool":
        packed = np.empty(expected, np.uint8)
        decompress_into(blob, codec, memoryview(packed))
        return np.unpackbits(packed, count=math.prod(shape)).astype(bool).reshape(shape)
    array = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("<"))
    decompress_into(blob, codec, memoryview(array).cast("B"))
    return array.astype(dtype, copy=False)  # no copy on little-endian machines


def pack_frame(header: dict, parts: Sequence[bytes] = ()) -> bytes:
    header = dict(header, parts=[len(part) for part in parts])
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([FRAME_MAGIC, _HEADER_LENGTH.pack(len(encoded)), encoded, *parts])


def unpack_frame(data: bytes) -> tuple[dict, list[bytes]]:
    """A frame's header and parts; a malformed frame gives one ProtocolError line."""
    if len(data) < 8 or data[:4] != FRAME_MAGIC:
        raise ProtocolError("The body is not a MedFM frame (wrong magic bytes); is the client a MedFM client?")
    (length,) = _HEADER_LENGTH.unpack(data[4:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise ProtocolError("The frame's header length is wrong or too large.")
    header = parse_json(data[8 : 8 + length])
    sizes = header.get("parts")
    if not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise ProtocolError("The frame's header must list its parts' sizes.")
    if 8 + length + sum(sizes) != len(data):
        raise ProtocolError("The frame's parts do not add up to its length (truncated upload?).")
    parts, offset = [], 8 + length
    for size in sizes:
        parts.append(data[offset : offset + size])
        offset += size
    return header, parts


def parse_json(data: bytes) -> dict:
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"The JSON message is larger than {MAX_HEADER_BYTES // 1024} KiB.")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("The message is not valid JSON.") from None
    if not isinstance(value, dict):
        raise ProtocolError("The JSON message must be an object.")
    return value


# ------------------------------------------------------------- changed regions
def changed_region(mask: np.ndarray, planes: Sequence[tuple[int, int]], extent: tuple) -> tuple[slice, ...] | None:
    """The part of a (K, J, I) mask that changes when ``planes`` (axis, index) are rewritten.

    ``extent`` is the box of every voxel that was ever set, grown to hold the
    new ones: a rewritten plane changes nothing outside it. The region is the
    extent, narrowed along the one rewritten axis to the rewritten indices.
    """
    if not planes or extent is None:
        return None
    region = list(extent)
    axes = {axis for axis, _ in planes}
    if len(axes) == 1:
        axis = axes.pop()
        array_axis = 2 - axis  # IJK axis i is array axis 2 - i
        indices = [index for _, index in planes]
        low, high = max(min(indices), region[array_axis].start), min(max(indices) + 1, region[array_axis].stop)
        if low >= high:
            return None
        region[array_axis] = slice(low, high)
    return tuple(region)


def grow_extent(extent: tuple | None, mask: np.ndarray, planes: Sequence[tuple[int, int]]) -> tuple | None:
    """The extent (array slices) grown by the set voxels of the rewritten planes."""
    boxes = [] if extent is None else [[(s.start, s.stop) for s in extent]]
    for axis, index in planes:
        array_axis = 2 - axis
        plane = np.take(mask, index, axis=array_axis)
        if not plane.any():
            continue
        bounds = []
        for plane_axis in range(2):
            nonzero = np.flatnonzero(plane.any(axis=1 - plane_axis))
            bounds.append((int(nonzero[0]), int(nonzero[-1]) + 1))
        bounds.insert(array_axis, (index, index + 1))
        boxes.append(bounds)
    if not boxes:
        return None
    return tuple(slice(min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(3))
