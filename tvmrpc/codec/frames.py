"""Tracker frames: little-endian int32 byte length, then UTF-8 JSON.

Invariants: :func:`encode_frame` returns one ``bytes`` object so a frame is
written with one ``write``; :class:`FrameDecoder` turns any byte stream into
decoded JSON values or raises :class:`CodecError`, never anything else.
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


class FrameDecoder:
    """Incremental decoder for tracker frames.

    ``feed`` returns every complete frame the buffered bytes hold, in order.
    After it raises, the decoder is poisoned: the stream cannot be trusted.
    """

    __slots__ = ("_buffer", "_max_frame_bytes")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame_bytes = max_frame_bytes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Any]:
        """Buffer ``data`` and return the JSON values of all complete frames."""
        buf = self._buffer
        buf += data
        values = []
        offset = 0
        end = len(buf)
        while end - offset >= 4:
            (length,) = _INT32.unpack_from(buf, offset)
            if length <= 0 or length > self._max_frame_bytes:
                raise CodecError(f"frame length {length} outside 1..{self._max_frame_bytes} bytes")
            if end - offset - 4 < length:
                break
            start = offset + 4
            offset = start + length
            values.append(_decode_json(bytes(buf[start:offset])))
        if offset:
            del buf[:offset]
        return values


def _decode_json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
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
