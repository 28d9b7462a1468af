"""Bytes a TCP connection carried, from the kernel's own counters (Linux ``TCP_INFO``).

Invariants:
- :func:`tcp_bytes` never raises: on a platform or kernel without these
  counters (older than 4.1/4.2) or a closed socket it returns None.
- ``bytes_out`` is ``tcpi_bytes_acked`` (sent and acknowledged by the peer),
  ``bytes_in`` is ``tcpi_bytes_received``; both count every byte of the
  connection, the RPC handshake included (and, on a connection we opened,
  one more for our SYN: Linux counts it in ``tcpi_bytes_acked``).
"""

from __future__ import annotations

import socket
import struct

#: Offsets of tcpi_bytes_acked and tcpi_bytes_received in struct tcp_info (linux/tcp.h).
_BYTES_ACKED = 120
_BYTES_RECEIVED = 128
_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def tcp_bytes(sock: socket.socket) -> tuple[int, int] | None:
    """``(bytes_in, bytes_out)`` of ``sock`` so far, or None if the kernel cannot say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except (OSError, ValueError):
        return None
    if len(info) < _BYTES_RECEIVED + 8:
        return None
    (acked,) = struct.unpack_from("=Q", info, _BYTES_ACKED)
    (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED)
    return received, acked
