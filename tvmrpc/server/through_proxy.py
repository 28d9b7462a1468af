"""Proxy mode (``--through-proxy``): connect out to a proxy and wait to be paired.

Invariants:
- At most one outbound connection exists, and only while the board is idle
  and a worker is warm; it sends ``server:<key> -tvmrpc-peer`` in one write
  (the option asks our proxy for the client's address; stock proxies pass it on).
- A success answer carries the client's key (with its ``-timeout``); that
  connection becomes the board's session. The next connection is made when
  the board is idle again.
- Duplicate key: a clear error and :attr:`fatal` fires (the daemon exits
  non-zero). No-match, refused or closed: retry with exponential backoff.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import sockopts
from ..codec import (
    RPC_CODE_DUPLICATE,
    RPC_CODE_SUCCESS,
    CodecError,
    ReplyDecoder,
    encode_handshake,
    parse_key,
)
from ..status.peeraddr import ASK, told
from .board import Board
from .handshake import detach

log = Logger(namespace="tvmrpc.server.proxy")


class DuplicateKeyError(Exception):
    """Another server already waits at the proxy under this key."""


def answer_bytes_missing(seen: bytes) -> int:
    """How many more bytes the handshake answer needs after ``seen`` (0: complete)."""
    if len(seen) < 4:
        return 4 - len(seen)
    if struct.unpack_from("<i", seen)[0] != RPC_CODE_SUCCESS:
        return 0
    if len(seen) < 8:
        return 8 - len(seen)
    return max(0, 8 + struct.unpack_from("<i", seen, 4)[0] - len(seen))


class _ProxyLeg(protocol.Protocol):
    """One outbound connection to the proxy; ``answered`` fires with the outcome."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.decoder = ReplyDecoder()
        self.answered: defer.Deferred[_ProxyLeg] = defer.Deferred()
        self.client_key: str | None = None
        self.timeout: float | None = None
        self.label = "proxy"
        self.handed = False

    def connectionMade(self) -> None:
        # Read no byte past the answer: the client's first session packet may
        # follow it at once, and it belongs to the worker.
        self._seen = b""
        self.transport.bufferSize = 4
        sockopts.set_nodelay(self.transport)
        sockopts.set_keepalive(self.transport)
        peer = self.transport.getPeer()
        self.label = f"proxy {getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.transport.write(encode_handshake(f"server:{self.key} {ASK}"))

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(self.transport)
        if self.answered.called:
            if not self.handed:
                self.transport.abortConnection()  # session bytes before the worker took over
            return
        try:
            result = self.decoder.feed(data)
        except CodecError as exc:
            self._fail(ConnectionError(f"bad answer from proxy: {exc}"))
            return
        if result is None:
            self._seen += data
            self.transport.bufferSize = max(1, answer_bytes_missing(self._seen))
            return
        code, peer_key, rest = result
        if code == RPC_CODE_DUPLICATE:
            self._fail(DuplicateKeyError(f"key server:{self.key} is already in use at the proxy"))
        elif code != RPC_CODE_SUCCESS or peer_key is None:
            self._fail(ConnectionError("proxy has no matching client key"))
        elif rest:
            self._fail(ConnectionError("proxy sent session bytes with its answer"))
        else:
            self.client_key = peer_key
            try:
                self.timeout = parse_key(peer_key).timeout
            except CodecError:
                self.timeout = None
            via = self.label
            self.label = f"{peer_key.split(' ', 1)[0]} via {via}"
            # The client's real address, when our proxy told it (tvmrpc.status.peeraddr).
            self.client = f"{told(peer_key)} via {via}" if told(peer_key) else self.label
            self.transport.pauseProducing()
            self.answered.callback(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.answered.called:
            error = ConnectionError(f"proxy closed: {reason.getErrorMessage()}")
            self.answered.errback(Failure(error))

    def _fail(self, exc: Exception) -> None:
        if not self.answered.called:
            self.answered.errback(Failure(exc))
        self.transport.abortConnection()

    # -- Ticket ----------------------------------------------------------------

    def accept(self) -> socket.socket | None:
        if self.handed or not self.transport.connected:
            return None
        self.handed = True
        return detach(self.transport)

    def reject(self) -> None:
        self.transport.abortConnection()


class ProxyConnector(service.Service):
    """Keeps one connection waiting at the proxy while the board is idle."""

    name = "tvm-server proxy connector"

    def __init__(
        self,
        reactor: Any,
        board: Board,
        key: str,
        proxy: tuple[str, int],
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.board = board
        self.key = key
        self.proxy = proxy
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.delay = initial_delay
        self.fatal: defer.Deferred[str] = defer.Deferred()
        self._leg: _ProxyLeg | None = None
        self._pending: Any = None
        self._retry: Any = None
        #: Called each time a connection waits at the proxy (the board is then idle and warm).
        self.waiting_observers: list[Callable[[], None]] = []
        board.idle_observers.append(self._maybe_connect)

    def startService(self) -> None:
        service.Service.startService(self)
        self.board.runtime.ready().addCallback(lambda _: self._maybe_connect())

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._pending is not None:
            self._pending.cancel()
        if self._leg is not None and self._leg.transport is not None and not self._leg.handed:
            self._leg.transport.abortConnection()

    def _maybe_connect(self) -> None:
        if not self.running or self.board.busy or self._leg is not None or self._pending:
            return
        if self._retry is not None and self._retry.active():
            return
        host, port = self.proxy
        leg = _ProxyLeg(self.key)
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=10)
        self._pending = connectProtocol(endpoint, leg)
        self._pending.addCallback(self._connected)
        self._pending.addErrback(self._failed)

    def _connected(self, leg: _ProxyLeg) -> defer.Deferred[None]:
        self._pending = None
        self._leg = leg
        log.info(
            "waiting at proxy {host}:{port} as server:{key}",
            host=self.proxy[0],
            port=self.proxy[1],
            key=self.key,
        )
        for observer in list(self.waiting_observers):
            observer()
        return leg.answered.addCallback(self._paired)

    def _paired(self, leg: _ProxyLeg) -> None:
        self._leg = None
        self.delay = self.initial_delay
        self.board.offer(leg)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        self._leg = None
        if not self.running:
            return
        if failure.check(DuplicateKeyError):
            log.error("{err}: another server uses this key; exiting", err=failure.getErrorMessage())
            if not self.fatal.called:
                self.fatal.callback(failure.getErrorMessage())
            return
        log.warn(
            "proxy {host}:{port}: {err}; retrying in {delay:.1f}s",
            host=self.proxy[0],
            port=self.proxy[1],
            err=failure.getErrorMessage(),
            delay=self.delay,
        )
        self._retry = self.reactor.callLater(self.delay, self._maybe_connect)
        self.delay = min(self.delay * 2, self.max_delay)
