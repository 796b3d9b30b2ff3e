"""The wire format: arrays round-trip exactly, and malformed or hostile payloads give one clear error."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from MedFMLib.errors import ProtocolError
from MedFMLib.remote.protocol import (
    available_codecs,
    changed_region,
    decode_array,
    decompress,
    encode_array,
    grow_extent,
    pack_frame,
    unpack_frame,
)


@pytest.mark.parametrize("codec", available_codecs())
@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "uint16", "int32", "float32", "float64"])
def test_arrays_round_trip_exactly(codec, dtype):
    rng = np.random.default_rng(3)
    array = (rng.normal(size=(5, 7, 9)) * 1000).astype(dtype) if dtype != "bool" else rng.random((5, 7, 9)) > 0.5
    meta, blob = encode_array(array, codec)
    back = decode_array(meta, blob, max_bytes=array.nbytes)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)
    if dtype == "bool":
        assert meta["size"] == (array.size + 7) // 8  # bit-packed before compression


def test_both_codecs_are_available_in_the_test_environment():
    assert available_codecs() == ["zstd", "zlib"]


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_a_payload_that_expands_beyond_its_declared_size_is_refused(codec):
    meta, blob = encode_array(np.zeros((64, 64, 64), np.uint8), codec)
    small = dict(meta, shape=[1, 64, 64], size=64 * 64)  # claims 4 KiB, holds 256 KiB
    with pytest.raises(ProtocolError, match="more than the 4096 bytes declared"):
        decode_array(small, blob, max_bytes=1 << 20)


def test_corrupt_truncated_and_mismatched_arrays_give_one_line():
    meta, blob = encode_array(np.arange(1000, dtype=np.int16).reshape(10, 10, 10), "zlib")
    limit = 1 << 20
    with pytest.raises(ProtocolError, match="corrupt"):
        decode_array(meta, b"not zlib at all", limit)
    with pytest.raises(ProtocolError, match="less than"):
        decode_array(meta, zlib.compress(b"\0" * 10), limit)
    with pytest.raises(ProtocolError, match="should hold 2000 bytes"):
        decode_array(dict(meta, size=10), blob, limit)
    with pytest.raises(ProtocolError, match="not accepted"):
        decode_array(dict(meta, dtype="object"), blob, limit)
    for shape in ([10, -10, 10], [10, 0, 10], [10, True, 10], "10x10", [2.0, 5, 10]):
        with pytest.raises(ProtocolError, match="list of at most 8 positive integers"):
            decode_array(dict(meta, shape=shape), blob, limit)
    with pytest.raises(ProtocolError, match="larger than"):
        decode_array(meta, blob, max_bytes=100)
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode_array(np.array(["a"], dtype=object), "zlib")


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ([2, 2**63 - 1, 1], "uint8"),
        ([65535, 42009217, 6700417], "uint8"),
        ([2**62, 2, 2], "float64"),
        ([2**40], "bool"),
    ],
)
def test_shapes_that_wrap_around_in_int64_are_refused_before_decompressing(codec, shape, dtype):
    """In int64 these products wrap to -2, -1 or 0, which once meant "no limit" to the decompressor."""
    meta, blob = encode_array(np.zeros((4, 1024, 1024), np.uint8), codec)  # 4 MiB of zeros in a few KiB
    wrapped = int(np.prod(np.array(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    with pytest.raises(ProtocolError, match="larger than the 1.0 MiB allowed"):
        decode_array(dict(meta, shape=shape, dtype=dtype, size=wrapped), blob, max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="positive size"):
        decompress(blob, codec, wrapped if wrapped <= 0 else -1)


def test_frames_round_trip_and_malformed_frames_are_refused():
    frame = pack_frame({"model": "x"}, [b"abc", b"", b"defg"])
    header, parts = unpack_frame(frame)
    assert header["model"] == "x" and parts == [b"abc", b"", b"defg"]
    with pytest.raises(ProtocolError, match="not a MedFM frame"):
        unpack_frame(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="truncated"):
        unpack_frame(frame[:-1])
    with pytest.raises(ProtocolError, match="header length"):
        unpack_frame(b"MFM1\xff\xff\xff\xff{}")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        unpack_frame(b"MFM1\x00\x00\x00\x02{x")


def test_changed_region_covers_every_changed_voxel():
    """Rewriting planes changes voxels only inside the region sent to the client, whatever was there."""
    rng = np.random.default_rng(5)
    mask = np.zeros((12, 20, 16), dtype=bool)
    client = mask.copy()
    extent = None
    for step in range(40):
        axis = int(rng.integers(0, 3))
        indices = sorted({int(i) for i in rng.integers(0, mask.shape[2 - axis], size=int(rng.integers(1, 4)))})
        planes = [(axis, index) for index in indices]
        for _, index in planes:
            plane = np.zeros(np.delete(mask.shape, 2 - axis), dtype=bool)
            if step % 4:
                r0, c0 = rng.integers(0, plane.shape[0]), rng.integers(0, plane.shape[1])
                plane[r0 : r0 + int(rng.integers(1, 6)), c0 : c0 + int(rng.integers(1, 6))] = True
            index_tuple = [slice(None)] * 3
            index_tuple[2 - axis] = index
            mask[tuple(index_tuple)] = plane
        extent = grow_extent(extent, mask, planes)
        region = changed_region(mask, planes, extent)
        if region is not None:
            client[region] = mask[region]
        assert np.array_equal(client, mask), f"step {step}"
    assert extent is not None


def test_the_servers_propagation_options_are_the_librarys_own():
    """A field added to PropagationOptions or StopCriteria must be accepted over the wire, with the same default."""
    from dataclasses import fields

    from MedFMLib.interaction.propagation import PropagationOptions, StopCriteria
    from MedFMLib.remote.server.schemas import CriteriaArgs, OptionsArgs

    assert set(OptionsArgs.model_fields) == {f.name for f in fields(PropagationOptions)}
    assert set(CriteriaArgs.model_fields) == {f.name for f in fields(StopCriteria)}
    assert OptionsArgs().to_options() == PropagationOptions()
