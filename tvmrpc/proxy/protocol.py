"""TCP legs: the proxy port's protocol and factory."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .. import sockopts
from . import handover
from .leg import LegMixin
from .switchboard import Switchboard

#: Read size and write-buffer high-water mark while forwarding in userspace. Twisted's
#: default, 64 KiB, measured cheaper here than 1 MiB (0.7 vs 1.2 s CPU per GiB): large
#: reads and the joins before each send touch fresh pages every time.
FORWARD_BUFFER = 1 << 16
#: Reads shorter than this are acknowledged at once (TCP_QUICKACK): small reads are
#: where a stock peer's second write waits for our ACK; bulk reads are ACKed anyway.
QUICKACK_BELOW = 1 << 14
#: Largest single send while forwarding (Twisted's default, 128 KiB, forces buffer joins).
SEND_LIMIT = 1 << 22


class ProxyProtocol(LegMixin, Protocol):
    """One TCP connection on the proxy port: handshake, wait, forward."""

    def __init__(
        self, switchboard: Switchboard, handshake_timeout: float, splice_reactor: Any = None
    ) -> None:
        self._leg_init(switchboard, handshake_timeout)
        #: The reactor that drives splice relays, or None to forward in userspace.
        self.splice_reactor = splice_reactor

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_name = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.peer_host = getattr(peer, "host", None)
        sockopts.set_nodelay(self.transport)
        self._leg_started()

    def dataReceived(self, data: bytes) -> None:
        if len(data) < QUICKACK_BELOW:
            # Small reads are where a stock peer's second write waits for our ACK;
            # bulk reads are ACKed promptly anyway and the syscall costs ~15 % of a relay.
            sockopts.quickack(self.transport)
        self._leg_data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._leg_lost()

    # -- LegMixin hooks ---------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _close(self) -> None:
        self.transport.loseConnection()

    def _abort(self) -> None:
        self.transport.abortConnection()

    def _producer(self) -> Any:
        return self.transport

    def _on_waiting(self) -> None:
        sockopts.set_keepalive(self.transport, self.factory.keepalive)

    def _on_forwarding(self) -> None:
        transport = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = FORWARD_BUFFER
            transport.SEND_LIMIT = SEND_LIMIT

    def _splice_socket(self) -> Any:
        if self.splice_reactor is None:
            return None
        return handover.spliceable_socket(self.transport)

    def _splice_reactor(self) -> Any:
        return self.splice_reactor


class ProxyFactory(Factory):
    """Builds :class:`ProxyProtocol` legs sharing one switchboard."""

    def __init__(
        self,
        switchboard: Switchboard,
        handshake_timeout: float = 5.0,
        splice_reactor: Any = None,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.keepalive = keepalive
        self.switchboard = switchboard
        self.handshake_timeout = handshake_timeout
        #: Splice paired TCP legs with this reactor (IReactorFDSet); None: userspace only.
        self.splice_reactor = splice_reactor

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        proto = ProxyProtocol(self.switchboard, self.handshake_timeout, self.splice_reactor)
        proto.factory = self
        return proto
