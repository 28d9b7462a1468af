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
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.error import ConnectionDone
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

log = Logger(namespace="tvmrpc.server.handshake")

#: Decides whether a client's match key may start a session (and claims it).
Matcher = Callable[[str], bool]


class ServerHandshake(protocol.Protocol):
    """One accepted connection, from its first byte to its session's start."""

    factory: HandshakeFactory

    def __init__(self) -> None:
        self.decoder = HandshakeDecoder()
        self.state = "handshake"  # -> "waiting" -> "handed" | "closed"
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

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(self.transport)
        if self.state == "waiting":
            log.warn("{peer} sent data before its handshake was answered; closing", peer=self.label)
            self._close()
            return
        if self.state != "handshake":
            return
        try:
            result = self.decoder.feed(data)
        except CodecError as exc:
            log.info("bad handshake from {peer}: {exc}", peer=self.label, exc=exc)
            self._close()
            return
        if result is None:
            return
        self._cancel_timer()
        key, rest = result
        if rest:
            log.warn("{peer} sent data after its handshake key; closing", peer=self.label)
            self._close()
            return
        try:
            peer_key = parse_key(key)
            self.timeout = peer_key.timeout
        except CodecError as exc:
            log.info("bad key from {peer}: {exc}", peer=self.label, exc=exc)
            self._refuse()
            return
        if peer_key.role != "client" or not self.factory.matcher(peer_key.matchkey):
            log.info("mismatch key {key!r} from {peer}", key=key[:200], peer=self.label)
            self._refuse()
            return
        self.state = "waiting"
        self.factory.board.offer(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._cancel_timer()
        if self.state == "waiting":
            self.state = "closed"
            self.factory.board.withdraw(self)
        elif self.state != "handed":
            self.state = "closed"

    # -- Ticket ----------------------------------------------------------------

    def accept(self) -> socket.socket | None:
        """Answer success with ``server:<key>`` in one write and detach the socket."""
        if self.state != "waiting":
            return None
        reply = encode_reply(RPC_CODE_SUCCESS, f"server:{self.factory.key}")
        try:
            sent = self.transport.getHandle().send(reply)
        except OSError as exc:
            log.info("client {peer} gone before its session: {exc}", peer=self.label, exc=exc)
            self._close()
            return None
        if sent != len(reply):  # cannot happen with an empty send buffer; be safe
            self._close()
            return None
        self.state = "handed"
        sock = detach(self.factory.reactor, self.transport)
        # Twisted no longer reports this connection's end (it lives on in the worker),
        # so end it for this daemon: per-connection bookkeeping such as the per-peer
        # cap (tvmrpc/listening.py) lets go now. In the "handed" state this does nothing else.
        self.connectionLost(Failure(ConnectionDone("handed to a worker")))
        return sock

    def reject(self) -> None:
        self._close()

    # -- internals -------------------------------------------------------------

    def _refuse(self) -> None:
        self.state = "closed"
        self.transport.write(encode_reply(RPC_CODE_MISMATCH))
        self.transport.loseConnection()

    def _close(self) -> None:
        self._cancel_timer()
        if self.state == "waiting":
            self.factory.board.withdraw(self)
        self.state = "closed"
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        self.timer = None
        log.info("handshake from {peer} timed out", peer=self.label)
        self._close()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class HandshakeFactory(protocol.ServerFactory):
    """Builds :class:`ServerHandshake` for the listening port."""

    protocol = ServerHandshake
    noisy = False

    def __init__(
        self,
        reactor: Any,
        board: Board,
        key: str,
        matcher: Matcher,
        handshake_timeout: float,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.reactor = reactor
        self.keepalive = keepalive
        self.board = board
        self.key = key
        self.matcher = matcher
        self.handshake_timeout = handshake_timeout
