"""The server's listening side: the RPC handshake, then a ticket for the board.

Invariants:
- A connection must complete its handshake within ``handshake_timeout``
  seconds or it is closed; it never holds up anyone else.
- Wrong magic, a bad length or non-UTF-8 key: closed without an answer.
  A key the matcher refuses (wrong key, stale match key): the no-match code,
  then close.
- An accepted key waits on the board (unanswered, still watched for EOF);
  its answer, success and ``server:<key>``, is one write with TCP_NODELAY
  set, sent only when its session starts.
- Every accepted connection gets TCP keepalive (``--dead-peer-timeout``),
  which its session socket keeps: a client that vanishes frees the board.
- A connection's :class:`Phase` (handshake → waiting → handed, or closed)
  changes only in its event methods; an event impossible in the current
  phase (``accept`` before the key was offered, ``reject`` after the hand-off)
  raises :class:`HandshakeStateError`.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, ISystemHandle, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import sockopts
from ..codec import (
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    CodecError,
    HandshakeDecoder,
    encode_reply,
    parse_key,
)
from .board import Board
from .handoff import detach

log = Logger()

#: Decides whether a client's match key may start a session (and claims it).
Matcher = Callable[[str], bool]


class Phase(enum.Enum):
    """Where one accepted connection is."""

    HANDSHAKE = "handshake"  # reading the client's magic, length and key
    WAITING = "waiting"  # key accepted: on the board, unanswered
    HANDED = "handed"  # answered: its socket belongs to a worker now
    CLOSED = "closed"  # refused, dropped or gone


class HandshakeStateError(Exception):
    """An event arrived in a phase where it cannot happen."""


class ServerHandshake(protocol.Protocol):
    """One accepted connection, from its first byte to its session's start.

    Its :class:`Phase` moves only through the event methods (bytes, key
    accepted, :meth:`accept`, :meth:`reject`, connection lost); each checks
    the phase it is called in and raises :class:`HandshakeStateError` for
    one that cannot happen there.
    """

    factory: HandshakeFactory
    transport: ITCPTransport

    def __init__(self) -> None:
        self.decoder = HandshakeDecoder()
        self.phase = Phase.HANDSHAKE
        self.timer: Any = None
        self.timeout: float | None = None
        self.label = "?"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.label = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        sockopts.set_nodelay(self.transport)
        # Kept by the session's duplicate: a client that vanishes frees the board.
        sockopts.set_keepalive(self.transport, self.factory.keepalive)
        self.timer = self.factory.reactor.callLater(
            self.factory.handshake_timeout, self._handshake_timed_out
        )

    # -- events ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(self.transport)
        if self.phase is Phase.HANDSHAKE:
            self._handshake_bytes(data)
        elif self.phase is Phase.WAITING:
            log.debug("{peer} sent data before its answer; closing", peer=self.label)
            self._close()
        # CLOSED: bytes already in flight when we closed; HANDED: Twisted reads no more.

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._cancel_timer()
        if self.phase is Phase.WAITING:
            self.phase = Phase.CLOSED
            self.factory.board.withdraw(self)
        elif self.phase is Phase.HANDSHAKE:
            self.phase = Phase.CLOSED
        # HANDED: the end :meth:`accept` reports itself; CLOSED: already over.

    def accept(self) -> socket.socket | None:
        """Ticket: answer success with ``server:<key>`` in one write, detach the socket.

        None when the client has gone meanwhile.
        """
        if self.phase is Phase.CLOSED:
            return None
        self._expect("accept", Phase.WAITING)
        reply = encode_reply(RPC_CODE_SUCCESS, f"server:{self.factory.key}")
        try:
            handle = cast(ISystemHandle, self.transport).getHandle()
            if not isinstance(handle, socket.socket):
                raise OSError("no socket behind the transport")
            sent = handle.send(reply)
        except OSError as exc:
            log.debug("client {peer} gone before its session: {exc}", peer=self.label, exc=exc)
            self._close()
            return None
        if sent != len(reply):  # cannot happen with an empty send buffer; be safe
            self._close()
            return None
        self.phase = Phase.HANDED
        sock = detach(self.factory.reactor, self.transport)
        # Twisted no longer reports this connection's end (it lives on in the worker),
        # so end it for this daemon: per-connection bookkeeping such as the per-peer
        # cap (tvmrpc/listening.py) lets go now. In the HANDED phase this does nothing else.
        self.connectionLost(Failure(ConnectionDone("handed to a worker")))
        return sock

    def reject(self) -> None:
        """Ticket: drop the client without a session (the server is stopping)."""
        if self.phase is Phase.CLOSED:
            return
        self._expect("reject", Phase.WAITING)
        self._close()

    # -- internals -------------------------------------------------------------

    def _handshake_bytes(self, data: bytes) -> None:
        try:
            result = self.decoder.feed(data)
        except CodecError as exc:
            log.debug("bad handshake from {peer}: {exc}", peer=self.label, exc=exc)
            self._close()
            return
        if result is None:
            return
        self._cancel_timer()
        key, rest = result
        if rest:
            log.debug("{peer} sent data after its handshake key; closing", peer=self.label)
            self._close()
            return
        try:
            peer_key = parse_key(key)
            self.timeout = peer_key.timeout
        except CodecError as exc:
            log.debug("bad key from {peer}: {exc}", peer=self.label, exc=exc)
            self._refuse()
            return
        if peer_key.role != "client" or not self.factory.matcher(peer_key.matchkey):
            log.debug("mismatch key {key!r} from {peer}", key=key[:200], peer=self.label)
            self._refuse()
            return
        self.phase = Phase.WAITING
        self.factory.board.offer(self)

    def _expect(self, event: str, *allowed: Phase) -> None:
        if self.phase not in allowed:
            raise HandshakeStateError(
                f"{event!r} cannot happen while {self.phase.value} ({self.label})"
            )

    def _refuse(self) -> None:
        self.phase = Phase.CLOSED
        self.transport.write(encode_reply(RPC_CODE_MISMATCH))
        self.transport.loseConnection()

    def _close(self) -> None:
        self._cancel_timer()
        if self.phase is Phase.WAITING:
            self.factory.board.withdraw(self)
        self.phase = Phase.CLOSED
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        self.timer = None
        log.debug("handshake from {peer} timed out", peer=self.label)
        self._close()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@attrs.define(eq=False, slots=False)
class HandshakeFactory(protocol.ServerFactory[ServerHandshake]):
    """Builds :class:`ServerHandshake` for the listening port."""

    reactor: Any
    board: Board
    key: str
    matcher: Matcher
    handshake_timeout: float
    keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> ServerHandshake:
        proto = ServerHandshake()
        proto.factory = self
        return proto
