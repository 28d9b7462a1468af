"""TCP legs: the proxy port's protocol and factory."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .. import sockopts
from .leg import LegMixin
from .switchboard import Switchboard

#: Read size and write-buffer high-water mark while forwarding (Twisted's default is 64 KiB).
FORWARD_BUFFER = 1 << 20
#: Reads shorter than this are acknowledged at once (TCP_QUICKACK).
QUICKACK_BELOW = 1 << 16
#: Largest single send while forwarding (Twisted's default, 128 KiB, forces buffer joins).
SEND_LIMIT = 1 << 22


class ProxyProtocol(LegMixin, Protocol):
    """One TCP connection on the proxy port: handshake, wait, forward."""

    def __init__(self, switchboard: Switchboard, handshake_timeout: float) -> None:
        self._leg_init(switchboard, handshake_timeout)
        self._direct = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_name = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
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
        transport = self.transport
        if self._direct and not transport.dataBuffer and not transport._tempDataBuffer:
            # Nothing queued: send now rather than after another reactor turn.
            try:
                sent = transport.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the transport notices the error itself on its next write
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _close(self) -> None:
        self.transport.loseConnection()

    def _abort(self) -> None:
        self.transport.abortConnection()

    def _producer(self) -> Any:
        return self.transport

    def _on_waiting(self) -> None:
        sockopts.set_keepalive(self.transport)

    def _on_forwarding(self) -> None:
        transport = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = FORWARD_BUFFER
            transport.SEND_LIMIT = SEND_LIMIT
        self._direct = isinstance(getattr(transport, "socket", None), socket.socket) and hasattr(
            transport, "_tempDataBuffer"
        )


class ProxyFactory(Factory):
    """Builds :class:`ProxyProtocol` legs sharing one switchboard."""

    def __init__(self, switchboard: Switchboard, handshake_timeout: float = 5.0) -> None:
        self.switchboard = switchboard
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        proto = ProxyProtocol(self.switchboard, self.handshake_timeout)
        proto.factory = self
        return proto
