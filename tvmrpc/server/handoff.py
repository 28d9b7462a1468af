"""Taking a connection away from Twisted for a worker process, and reading no byte too many.

The server hands each session's socket to a worker, so two things must hold
of a Twisted TCP transport:

- :func:`detach` returns a blocking duplicate of the transport's socket and
  takes the transport out of the reactor with public APIs only
  (``IReactorFDSet.removeReader``/``removeWriter``, ``ITCPTransport.getHandle``,
  the socket's own ``dup``/``close``): Twisted never reads, writes, shuts the
  connection down or calls ``connectionLost`` for it again, so the connection
  lives on in the duplicate.
- :func:`read_at_most` is the one workaround Twisted has no public API for:
  a transport's per-read size (``bufferSize``, what ``doRead`` passes to
  ``recv``), so a handshake answer is read without the session bytes that may
  follow it. tests/test_server_handoff.py pins that Twisted behaviour.

Invariants:
- Nothing else in :mod:`tvmrpc.server` touches a transport's private state.
- After :func:`detach`, closing the duplicate is the only way the
  connection ends; the transport object is inert.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IReactorFDSet


def detach(reactor: IReactorFDSet, transport: Any) -> socket.socket:
    """Take a TCP connection away from Twisted: return a blocking duplicate of its socket.

    The transport's write buffer must be empty (the caller wrote nothing
    through it, or it was flushed).
    """
    reactor.removeReader(transport)
    reactor.removeWriter(transport)
    handle = transport.getHandle()
    sock = handle.dup()
    sock.setblocking(True)
    handle.close()  # our descriptor only: close() never shuts the connection down
    return sock


def read_at_most(transport: Any, size: int) -> None:
    """Make each of ``transport``'s reads take at most ``size`` bytes from the socket."""
    transport.bufferSize = max(1, size)
