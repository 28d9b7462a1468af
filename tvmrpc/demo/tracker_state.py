"""Blocking looks at a tracker's state, for the demo and the tests that poll it.

A tiny synchronous tracker client (magic, then one SUMMARY frame) so polling
costs one short connection, not a process or a reactor. ``connect`` can be
replaced, e.g. by a function that opens the socket inside a network namespace.

Invariant: every call is bounded by ``timeout``; failures raise OSError or
:class:`~tvmrpc.codec.CodecError`, never hang.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from ..codec import (
    MAX_REPLY_FRAME_BYTES,
    TRACKER_MAGIC,
    FrameDecoder,
    TrackerCode,
    decode_int32,
    encode_frame,
    encode_int32,
)
from ..codec.errors import CodecError

Connect = Callable[[tuple[str, int], float], socket.socket]
POLL_SECONDS = 0.2


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("tracker closed the connection")
        data += chunk
    return bytes(data)


def summary(
    address: tuple[str, int],
    timeout: float = 5.0,
    connect: Connect = socket.create_connection,
) -> dict[str, Any]:
    """The tracker's SUMMARY reply: ``{"queue_info": ..., "server_info": [...]}``."""
    with connect(address, timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(encode_int32(TRACKER_MAGIC))
        if decode_int32(_recv_exact(sock, 4)) != TRACKER_MAGIC:
            raise CodecError("not a TVM tracker (bad magic)")
        sock.sendall(encode_frame([int(TrackerCode.SUMMARY)]))
        decoder = FrameDecoder(MAX_REPLY_FRAME_BYTES)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("tracker closed before answering SUMMARY")
            values = decoder.feed(chunk)
            if values:
                break
    reply = values[0]
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == 0):
        raise CodecError(f"unexpected SUMMARY reply {reply!r}")
    return reply[1]


def queue(state: dict[str, Any], key: str) -> tuple[int, int]:
    """``(free, pending)`` for ``key`` in a summary (zeros when absent)."""
    entry = state.get("queue_info", {}).get(key, {})
    return int(entry.get("free", 0)), int(entry.get("pending", 0))


def wait_until(
    address: tuple[str, int],
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
    connect: Connect = socket.create_connection,
    check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Poll SUMMARY every ~0.2 s until ``predicate`` holds; TimeoutError naming ``what``.

    ``check`` runs before each poll (e.g. to fail at once if a daemon died).
    Connection errors count as "not yet" (the tracker may be restarting).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if check is not None:
            check()
        try:
            state = summary(address, min(5.0, max(timeout, 0.5)), connect)
            if predicate(state):
                return state
            last = state
        except (OSError, CodecError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s; last tracker state: {last!r}")
        time.sleep(POLL_SECONDS)
