"""Handing a Twisted TCP transport's socket over to the splice relay.

Twisted has no public call that gives a connection's socket away. What the
relay relies on, all through public interfaces, is pinned by
``tests/test_proxy_splice.py``:

- ``ISystemHandle.getHandle()`` of a plain TCP transport is its connected,
  non-blocking ``socket.socket`` (a TLS transport's handle is not a socket,
  so it is never spliced: its bytes on the wire are not the stream);
- after ``IPushProducer.pauseProducing()`` the transport reads nothing more
  from the socket, and nothing writes to it while the transport was never
  written to (a leg writes nothing before its handshake answer, and the
  splice path sends that answer itself);
- ``loseConnection()`` on such a paused, never-written transport still closes
  the socket and calls ``connectionLost``.

Invariants:
- :func:`spliceable_socket` returns a socket only for a plain TCP transport
  (IPv4 or IPv6, not TLS); otherwise ``None`` and the caller forwards in
  userspace.
- :func:`take` leaves the transport connected but idle: it neither reads nor
  writes until its owner calls ``loseConnection``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IPushProducer, ISSLTransport, ISystemHandle, ITCPTransport

from .. import sockopts


def spliceable_socket(transport: Any) -> socket.socket | None:
    """The TCP socket behind ``transport`` if its bytes may be spliced, else ``None``."""
    if not (
        ITCPTransport.providedBy(transport)
        and ISystemHandle.providedBy(transport)
        and IPushProducer.providedBy(transport)
    ) or ISSLTransport.providedBy(transport):
        return None
    return sockopts.tcp_socket(transport)


def take(transport: Any) -> None:
    """Stop Twisted reading ``transport`` so that the relay owns its socket's bytes."""
    transport.pauseProducing()
