"""Tracker frames: little-endian int32 byte length, then UTF-8 JSON.

Invariants:
- :func:`encode_frame` returns one ``bytes`` object so a frame is written with
  one ``write``.
- :class:`FrameDecoder` turns any byte stream into decoded JSON values or
  raises :class:`CodecError`, never anything else; ``pop`` decodes one frame
  per call, so nothing is decoded before the receiver asks for it.
- A frame longer than the decoder's bound is refused as soon as its length
  prefix is reached, without waiting for its payload.
- A decoder holding no bytes holds no buffer either (a tracker keeps one
  decoder per connection, 10,000 of them at scale, nearly all idle).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .constants import MAX_FRAME_BYTES
from .errors import CodecError

_INT32 = struct.Struct("<i")


def encode_frame(value: Any) -> bytes:
    """Encode one JSON value as a length-prefixed frame."""
    payload = json.dumps(value).encode("utf-8")
    return _INT32.pack(len(payload)) + payload


def encode_int32(value: int) -> bytes:
    """Encode a little-endian int32 (magics and reply codes)."""
    return _INT32.pack(value)


def decode_int32(data: bytes) -> int:
    """Decode a little-endian int32 from exactly four bytes."""
    return _INT32.unpack(data)[0]


#: What :meth:`FrameDecoder.pop` returns when no complete frame is buffered
#: (``None`` is a valid JSON frame, so it cannot be the marker).
NO_FRAME: Any = object()


class FrameDecoder:
    """Incremental decoder for tracker frames.

    ``feed`` returns every complete frame the buffered bytes hold, in order.
    ``append`` + ``pop`` do the same one frame at a time, so a receiver can
    stop between frames (flow control) without decoding what it has not
    reached. After either raises, the decoder is poisoned: the stream cannot
    be trusted.
    """

    __slots__ = ("_buffer", "_max_frame_bytes", "_offset")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer: bytearray | None = None  # None while nothing is buffered
        self._offset = 0  # bytes of _buffer already consumed by pop()
        self._max_frame_bytes = max_frame_bytes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer) - self._offset if self._buffer is not None else 0

    def feed(self, data: bytes) -> list[Any]:
        """Buffer ``data`` and return the JSON values of all complete frames."""
        self.append(data)
        values = []
        while (value := self.pop()) is not NO_FRAME:
            values.append(value)
        return values

    def append(self, data: bytes) -> None:
        """Buffer ``data`` without decoding anything."""
        buf = self._buffer
        if buf is None:
            if data:
                self._buffer = bytearray(data)
            return
        if self._offset:
            del buf[: self._offset]
            self._offset = 0
        buf += data

    def pop(self) -> Any:
        """Decode and return the next complete frame, or :data:`NO_FRAME`."""
        buf = self._buffer
        offset = self._offset
        if buf is None or len(buf) - offset < 4:
            return NO_FRAME
        (length,) = _INT32.unpack_from(buf, offset)
        if length <= 0 or length > self._max_frame_bytes:
            raise CodecError(f"frame length {length} outside 1..{self._max_frame_bytes} bytes")
        start = offset + 4
        end = start + length
        if end > len(buf):
            return NO_FRAME
        try:
            # Decoded straight from the buffer: no copy of the payload is made.
            text = str(memoryview(buf)[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"frame is not UTF-8 JSON: {exc}") from None
        if end == len(buf):
            self._buffer = None
            self._offset = 0
        else:
            self._offset = end  # compacted by the next append()
        return _decode_json(text)

    def clear(self) -> None:
        """Drop everything buffered (the connection is gone)."""
        self._buffer = None
        self._offset = 0


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"frame is not UTF-8 JSON: {exc}") from None


class MagicDecoder:
    """Collects the int32 magic that opens a tracker connection (either side).

    ``feed`` returns ``None`` until four bytes arrived, then ``(magic, rest)``
    once, where ``rest`` is whatever followed the magic.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        self._buffer += data
        if len(self._buffer) < 4:
            return None
        magic, rest = decode_int32(self._buffer[:4]), self._buffer[4:]
        self._buffer = b""
        return magic, rest
