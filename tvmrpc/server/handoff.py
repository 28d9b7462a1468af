"""Taking a connection away from Twisted for a worker process, and reading no byte too many.

The server hands each session's socket to a worker, so two things must hold
of a Twisted TCP transport:

- :func:`detach` returns a blocking duplicate of the transport's socket and
  takes the transport out of the reactor with public APIs only
  (``IReactorFDSet.removeReader``/``removeWriter``, ``ITCPTransport.getHandle``,
  the socket's own ``dup``/``close``): Twisted never reads, writes, shuts the
  connection down or calls ``connectionLost`` for it again, so the connection
  lives on in the duplicate.
- :class:`ImmediateWriter` hands a session's socket to the worker zygote at
  once: ``IUNIXTransport.sendFileDescriptor`` and ``write`` queue until the
  reactor's next turn (after whatever else this turn logs and computes), so
  it sends on the transport's socket (``getHandle``) itself, with
  :func:`socket.send_fds`, and uses the transport only once the socket
  would block.
- :func:`read_at_most` is the one workaround Twisted has no public API for:
  a transport's per-read size (``bufferSize``, what ``doRead`` passes to
  ``recv``), so a handshake answer is read without the session bytes that may
  follow it. tests/test_server_handoff.py pins that Twisted behaviour.

Invariants:
- Nothing else in :mod:`tvmrpc.server` touches a transport's private state.
- After :func:`detach`, closing the duplicate is the only way the
  connection ends; the transport object is inert.
- Through an :class:`ImmediateWriter`, bytes and descriptors reach the peer
  in the order written: it writes directly only while nothing was ever
  queued in the transport; after the first write that would block, every
  later one goes through the transport too.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet.interfaces import IReactorFDSet, ISystemHandle, IUNIXTransport


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


class ImmediateWriter:
    """Writes to a UNIX stream transport now, descriptors attached (see the invariants)."""

    def __init__(self, transport: IUNIXTransport) -> None:
        self.transport = transport
        #: True once anything went through the transport's queue (then everything does).
        self.queued = False

    def write(self, data: bytes, fd: int | None = None) -> None:
        """Send ``data`` (``fd`` attached to its first byte) now if the socket takes it."""
        sent = 0
        if not self.queued:
            handle = cast(socket.socket, ISystemHandle(self.transport).getHandle())
            try:
                sent = handle.send(data) if fd is None else socket.send_fds(handle, [data], [fd])
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # a broken connection: the transport reports it as usual
            if sent == len(data):
                return
            self.queued = True
        if fd is not None and sent == 0:
            self.transport.sendFileDescriptor(fd)
        self.transport.write(data[sent:])
