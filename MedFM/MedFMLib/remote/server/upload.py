"""A volume upload read from the request as it streams in: the header is checked before the voxels are read.

The frame's JSON header says the array's type, shape and compressed size, so a volume the server cannot
hold, a wrong model or a malformed header is refused after at most ``MAX_HEADER_BYTES``, and the voxels are
read into one buffer of exactly their declared size, never beyond the upload limit.
"""

from __future__ import annotations

import asyncio

from ...errors import ProtocolError
from ..protocol import FRAME_MAGIC, MAX_HEADER_BYTES, parse_json
from .sessions import TooLarge

#: a client that sends nothing for this long during an upload is cut off
BODY_IDLE_SECONDS = 30.0


class UploadReader:
    """Reads one frame from a Starlette request: ``await header()``, then ``await parts()``."""

    def __init__(self, request, limit_bytes: int, idle_seconds: float = BODY_IDLE_SECONDS) -> None:
        self._chunks = request.stream().__aiter__()
        self._buffer = bytearray()
        self._limit = limit_bytes
        self._idle = idle_seconds
        self._sizes: list[int] = []

    async def _more(self) -> bool:
        try:
            chunk = await asyncio.wait_for(self._chunks.__anext__(), self._idle)
        except StopAsyncIteration:
            return False
        except asyncio.TimeoutError:
            raise ProtocolError(f"The upload stalled for {self._idle:.0f} s; send it again.") from None
        self._buffer += chunk
        return True

    async def _have(self, count: int) -> None:
        while len(self._buffer) < count:
            if not await self._more():
                raise ProtocolError("The upload ended before its frame did (truncated upload?).")

    async def header(self) -> dict:
        await self._have(8)
        if self._buffer[:4] != FRAME_MAGIC:
            raise ProtocolError("The body is not a MedFM frame (wrong magic bytes); is the client a MedFM client?")
        length = int.from_bytes(self._buffer[4:8], "big")
        if length > MAX_HEADER_BYTES:
            raise ProtocolError("The frame's header length is wrong or too large.")
        await self._have(8 + length)
        header = parse_json(bytes(self._buffer[8 : 8 + length]))
        del self._buffer[: 8 + length]
        sizes = header.get("parts")
        if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                   for n in sizes):  # fmt: skip
            raise ProtocolError("The frame's header must list its parts' sizes.")
        if 8 + length + sum(sizes) > self._limit:
            raise TooLarge(f"The upload is larger than the {self._limit / 2**20:.0f} MiB this server accepts.")
        self._sizes = sizes
        return header

    async def parts(self) -> list[memoryview]:
        """The frame's parts, read into one buffer of their declared total size."""
        total = sum(self._sizes)
        data = bytearray(total)
        filled = min(len(self._buffer), total)
        data[:filled] = self._buffer[:filled]
        extra = len(self._buffer) > total
        self._buffer = bytearray()
        while filled < total:
            if not await self._more():
                raise ProtocolError("The frame's parts do not add up to its length (truncated upload?).")
            take = min(len(self._buffer), total - filled)
            data[filled : filled + take] = self._buffer[:take]
            filled += take
            extra = extra or len(self._buffer) > take
            self._buffer = bytearray()
        while not extra and await self._more():  # the stream ends with an empty chunk
            extra = len(self._buffer) > 0
        if extra:
            raise ProtocolError("The upload holds more than its frame declares.")
        view, parts, offset = memoryview(data), [], 0
        for size in self._sizes:
            parts.append(view[offset : offset + size])
            offset += size
        return parts
