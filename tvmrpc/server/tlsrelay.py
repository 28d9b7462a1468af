"""A session over TLS: the daemon relays between the TLS connection and the worker's socket.

A worker runs the runtime's own server loop on a plain socket, so a session
whose connection is TLS (``--proxy tls:...``) cannot be handed over as is.
:func:`relay_session` makes a ``socketpair``: one end goes to the worker
exactly as a plain session socket would; the other end is adopted by the
reactor and glued to the TLS transport.

Invariants:
- Bytes pass unchanged and in order in both directions; bytes the TLS layer
  decrypted before the relay existed (``early``) go to the worker first.
- Flow control: each side is the other's streaming producer, so a slow
  reader pauses the other side's reads; the relay holds at most about one
  transport buffer per direction.
- When either side ends, the other is closed after its buffered bytes are
  written (the TLS side with a TLS close); the relay holds nothing after.
- Only public Twisted API: ``IReactorSocket.adoptStreamConnection``,
  ``IConsumer.registerProducer``, ``IPushProducer``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IPushProducer)
class _Reads:
    """Pauses and resumes a transport's reading; stopping is left to the relay's close."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Nothing: the relay closes each side itself, after its bytes are written."""


class SessionRelay(protocol.Protocol):
    """The daemon's end of the worker's socketpair, glued to a TLS transport (``outer``)."""

    #: The adopted UNIX stream transport (ITransport, IConsumer, IPushProducer).
    transport: Any

    def __init__(self, outer: Any, early: bytes = b"") -> None:
        self.outer = outer
        self.early = early
        self.outer_gone = False
        #: Bytes moved: client to worker and worker to client (for logs and tests).
        self.to_worker = 0
        self.to_client = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(_Reads(self.outer), True)
        self.outer.registerProducer(_Reads(self.transport), True)
        early, self.early = self.early, b""
        if early:
            self.from_client(early)
        if self.outer_gone:
            self.transport.loseConnection()
            return
        self.outer.resumeProducing()  # the leg paused it after the handshake answer

    def from_client(self, data: bytes) -> None:
        """Bytes the TLS connection delivered (the leg calls this)."""
        self.to_worker += len(data)
        self.transport.write(data)

    def client_lost(self) -> None:
        """The TLS connection ended: let the worker read what is left, then EOF."""
        self.outer_gone = True
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.to_client += len(data)
        self.outer.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.outer_gone:
            self.outer_gone = True
            self.outer.unregisterProducer()
            self.outer.loseConnection()


def relay_session(
    reactor: Any, outer: Any, early: bytes = b""
) -> tuple[socket.socket, SessionRelay]:
    """Start relaying ``outer`` (a connected TLS transport); return the worker's blocking socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay = SessionRelay(outer, early)
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _One(relay))
    finally:
        ours.close()  # the reactor holds its own duplicate
    theirs.setblocking(True)
    return theirs, relay


class _One(protocol.Factory):
    """Builds the one relay it was given."""

    def __init__(self, relay: SessionRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> SessionRelay:
        return self.relay
