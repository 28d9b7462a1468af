"""TCP socket tuning shared by the daemons (latency and dead-peer detection).

Every function is a no-op on transports without a TCP socket (UNIX sockets,
string transports in tests), so callers need not check.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import attrs

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


@attrs.frozen
class Keepalive:
    """How long a silent peer may stay before the kernel declares it dead.

    A value, built once from ``--dead-peer-timeout`` and passed to the factories
    that set it on their connections (no process-wide state).
    """

    idle: int = 30
    interval: int = 10
    count: int = 3

    @classmethod
    def for_timeout(cls, seconds: float) -> Keepalive:
        """Half of ``seconds`` idle, the rest in three unanswered probes."""
        total = max(4, int(seconds))
        idle = total // 2
        return cls(idle, max(1, (total - idle) // 3), 3)

    @property
    def seconds(self) -> int:
        """The bound on silence (and on unacknowledged data), in seconds."""
        return self.idle + self.interval * self.count


#: About a minute, the default of ``--dead-peer-timeout``.
DEFAULT_KEEPALIVE = Keepalive()


def set_keepalive(transport: Any, keepalive: Keepalive = DEFAULT_KEEPALIVE) -> None:
    """Detect a dead peer (power loss, pulled cable) on an idle connection.

    TCP_USER_TIMEOUT bounds the time unacknowledged data may wait as well.
    """
    sock = tcp_socket(transport)
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", keepalive.idle),
        ("TCP_KEEPINTVL", keepalive.interval),
        ("TCP_KEEPCNT", keepalive.count),
        ("TCP_USER_TIMEOUT", keepalive.seconds * 1000),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
