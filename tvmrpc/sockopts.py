"""TCP socket tuning shared by the daemons (latency and dead-peer detection).

Every function is a no-op on transports without a TCP socket (UNIX sockets,
string transports in tests), so callers need not check.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def tcp_socket(transport: Any) -> socket.socket | None:
    """Return the TCP socket behind ``transport``, or ``None``."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        sock = get_handle()
    except Exception:  # noqa: BLE001 - some transports refuse; treat as "no socket"
        return None
    if not isinstance(sock, socket.socket) or sock.family not in _TCP_FAMILIES:
        return None
    return sock


def set_nodelay(transport: Any) -> None:
    """Disable Nagle's algorithm: our replies are whole frames written at once."""
    sock = tcp_socket(transport)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quickack(transport: Any) -> None:
    """Acknowledge what was just read at once instead of delaying the ACK.

    Stock peers write a length and its payload in two writes; with Nagle on
    their side the second write waits for our ACK of the first. Linux clears
    TCP_QUICKACK by itself, so call this after every read.
    """
    sock = tcp_socket(transport)
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


#: (idle, interval, count) of TCP keepalive; see :func:`configure_dead_peer_timeout`.
_keepalive = (30, 10, 3)


def configure_dead_peer_timeout(seconds: float) -> None:
    """Declare a silent peer dead after about ``seconds`` (process-wide default).

    Half the time passes idle, the rest in three unanswered probes; the same
    bound applies to unacknowledged data (TCP_USER_TIMEOUT).
    """
    global _keepalive
    total = max(4, int(seconds))
    idle = total // 2
    _keepalive = (idle, max(1, (total - idle) // 3), 3)


def set_keepalive(
    transport: Any, idle: int | None = None, interval: int | None = None, count: int | None = None
) -> None:
    """Detect a dead peer (power loss, pulled cable) on an idle connection.

    By default a silent peer is declared dead after about a minute (see
    :func:`configure_dead_peer_timeout`); TCP_USER_TIMEOUT bounds the time
    unacknowledged data may wait as well.
    """
    sock = tcp_socket(transport)
    if sock is None:
        return
    idle = _keepalive[0] if idle is None else idle
    interval = _keepalive[1] if interval is None else interval
    count = _keepalive[2] if count is None else count
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
        ("TCP_USER_TIMEOUT", (idle + interval * count) * 1000),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
