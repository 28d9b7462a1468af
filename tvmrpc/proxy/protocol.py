"""TCP legs: the proxy port's protocol and factory.

Invariants:
- A :class:`ProxyProtocol` is the :class:`~tvmrpc.proxy.leg.ILegTransport`
  of exactly one :class:`~tvmrpc.proxy.leg.Leg` and passes it every
  connection event, once: made, each read, lost.
- Only public Twisted interfaces are used: writes, ``loseConnection``,
  ``abortConnection``, the transport as producer/consumer, and
  :mod:`tvmrpc.proxy.handover` for the socket a splice relay takes over.
- A leg is spliceable only when the factory was given a splice reactor.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFDSet, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import sockopts
from . import handover
from .leg import ILegTransport, Leg, address_text
from .switchboard import Switchboard

#: Reads shorter than this are acknowledged at once (TCP_QUICKACK): small reads are
#: where a stock peer's second write waits for our ACK; bulk reads are ACKed anyway.
QUICKACK_BELOW = 1 << 14


@implementer(ILegTransport)
class ProxyProtocol(Protocol):
    """One TCP connection on the proxy port: its events go to its :class:`Leg`."""

    transport: ITCPTransport  # once connected: the TCP transport the port made
    peer_name = "?"
    #: The remote IP address, for --allow-board-from.
    peer_host: str | None = None

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.leg = Leg(factory.switchboard, self, factory.handshake_timeout, factory.splice_reactor)

    @property
    def forwarding(self) -> str:
        """``splice`` or ``userspace`` (see :attr:`Leg.forwarding`)."""
        return self.leg.forwarding

    def connectionMade(self) -> None:
        self.peer_name = address_text(self.transport)
        self.peer_host = getattr(self.transport.getPeer(), "host", None)
        sockopts.set_nodelay(self.transport)
        self.leg.connected()

    def dataReceived(self, data: bytes) -> None:
        if len(data) < QUICKACK_BELOW:
            # Small reads are where a stock peer's second write waits for our ACK;
            # bulk reads are ACKed promptly anyway and the syscall costs ~15 % of a relay.
            sockopts.quickack(self.transport)
        self.leg.received(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.leg.lost()

    # -- ILegTransport ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def producer(self) -> Any:
        return self.transport

    def on_waiting(self) -> None:
        sockopts.set_keepalive(self.transport, self.factory.keepalive)

    def splice_socket(self) -> socket.socket | None:
        return handover.spliceable_socket(self.transport)


@attrs.define(slots=False, eq=False, repr=False)
class ProxyFactory(Factory):
    """Builds :class:`ProxyProtocol` legs sharing one switchboard."""

    switchboard: Switchboard
    handshake_timeout: float = 5.0
    #: Splice paired TCP legs with this reactor; None: userspace only.
    splice_reactor: IReactorFDSet | None = None
    keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        return ProxyProtocol(self)
