"""Proxy mode (``--through-proxy``): connect out to a proxy and wait to be paired.

Invariants:
- At most one outbound connection exists, and only while the board is
  advertised (warm, checked) and idle; it sends ``server:<key> -tvmrpc-peer``
  in one write (the option asks our proxy for the client's address; stock
  proxies pass it on). When the board is withdrawn the waiting connection is
  closed, so the proxy pairs no client with it.
- A success answer carries the client's key (with its ``-timeout``); that
  connection becomes the board's session. The next connection is made when
  the board is idle again.
- Every failure (refused, connect timeout after ``connect_timeout`` seconds,
  duplicate key, no match, closed, a peer that is not a TVM proxy) is retried
  with Twisted's ``backoffPolicy``; nothing makes the daemon exit. Failures
  are logged at warn on the first one and then at most once per
  ``log_interval`` with the retry delay.
- ``announcement.up`` is true while a connection waits at the proxy or the
  client it paired is served; false after any failure or withdrawal.
- With a board secret the handshake key carries ``-tvmrpc-auth`` and the
  proxy's challenge is answered before anything else is read; no challenge
  within ``boardauth.CHALLENGE_TIMEOUT`` seconds, or another answer (a
  stock proxy pairing us), is a failure that says so in one line.
- A waiting connection has no answer timeout: the proxy answers only when a
  client pairs, so silence is normal; TCP keepalive (``--dead-peer-timeout``)
  detects a proxy that vanished.
- The proxy is ``HOST:PORT`` (plain TCP) or a client endpoint string
  (``tls:...``, :mod:`tvmrpc.outgoing`). A plain TCP session's socket is
  handed to the worker as is (:func:`~.handoff.detach`); any other
  connection (TLS) is relayed by the daemon through a socketpair
  (:mod:`.tlsrelay`), bytes that followed the answer included.
- The connector observes the board and the lifecycle only while it runs: it
  subscribes in ``startService`` and unsubscribes in ``stopService``.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionDone, DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import boardauth, sockopts
from ..codec import (
    RPC_CODE_DUPLICATE,
    RPC_CODE_SUCCESS,
    CodecError,
    ReplyDecoder,
    encode_handshake,
    parse_key,
)
from ..outgoing import Target, beneath, tls_failure
from ..ratelimit import RateLimit
from ..status.peeraddr import ASK, told
from .board import Board
from .handoff import detach, read_at_most
from .lifecycle import Announcement, Lifecycle, State, unsubscribe
from .tlsrelay import SessionRelay, relay_session

log = Logger(namespace="tvmrpc.server.proxy")


class DuplicateKeyError(Exception):
    """Another server already waits at the proxy under this key."""


class NotAProxyError(Exception):
    """The peer answered something that is not the TVM RPC handshake."""


def answer_bytes_missing(seen: bytes) -> int:
    """How many more bytes the handshake answer needs after ``seen`` (0: complete)."""
    if len(seen) < 4:
        return 4 - len(seen)
    if struct.unpack_from("<i", seen)[0] != RPC_CODE_SUCCESS:
        return 0
    if len(seen) < 8:
        return 8 - len(seen)
    return max(0, 8 + struct.unpack_from("<i", seen, 4)[0] - len(seen))


class ProxyTLSError(Exception):
    """The TLS handshake with the proxy failed (its certificate, or ours)."""


class BoardProofError(Exception):
    """The proxy did not challenge us (stock, or no secret there) though we hold a secret."""


class _ProxyLeg(protocol.Protocol):
    """One outbound connection to the proxy; ``answered`` fires with the outcome."""

    #: A connected TCP or TLS transport (ITCPTransport, IPushProducer, IConsumer).
    transport: Any

    def __init__(
        self,
        key: str,
        board_secret: bytes | None = None,
        clock: Any = None,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.key = key
        self.keepalive = keepalive
        #: With a secret: answers the proxy's challenge first (docs/security.md).
        self.answerer = (
            boardauth.ProxyAnswerer(board_secret, key) if board_secret is not None else None
        )
        self.clock = clock
        self._challenge_timer: Any = None
        #: We sent a board proof on this connection.
        self.proved = False
        self.decoder = ReplyDecoder()
        self.answered: defer.Deferred[_ProxyLeg] = defer.Deferred()
        self.client_key: str | None = None
        self.timeout: float | None = None
        self.label = "proxy"
        self.handed = False
        self.client = "?"
        self._seen = b""
        #: Not a plain TCP socket (TLS): the session is relayed, not handed over.
        self.relayed = False
        #: Session bytes that arrived with or after the answer (relayed sessions only).
        self._early = bytearray()
        self.relay: SessionRelay | None = None

    def connectionMade(self) -> None:
        # Read no byte past the answer: the client's first session packet may
        # follow it at once, and it belongs to the worker.
        self._seen = b""
        self.relayed = sockopts.tcp_socket(self.transport) is None
        read_at_most(self.transport, 4)
        tcp = beneath(self.transport)
        sockopts.set_nodelay(tcp)
        sockopts.set_keepalive(tcp, self.keepalive)
        peer = self.transport.getPeer()
        self.label = f"proxy {getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        if self.answerer is None:
            self.transport.write(encode_handshake(f"server:{self.key} {ASK}"))
            return
        read_at_most(self.transport, boardauth.CHALLENGE_BYTES)  # nothing follows it unasked
        key = f"server:{self.key} {ASK} {boardauth.PROXY_OPTION}"
        self.transport.write(encode_handshake(key))
        self._challenge_timer = self.clock.callLater(
            boardauth.CHALLENGE_TIMEOUT, self._no_challenge
        )

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(beneath(self.transport))
        if self.answered.called:
            if self.relay is not None:
                self.relay.from_client(data)
            elif self.relayed and not self.handed:
                self._early += data  # the TLS layer read past the answer; paused now
            elif not self.handed:
                self.transport.abortConnection()  # session bytes before the worker took over
            return
        if self.answerer is not None:
            self._challenge_data(data)
            return
        try:
            result = self.decoder.feed(data)
        except CodecError as exc:
            self._fail(NotAProxyError(f"not a TVM proxy (it answered: {exc}); check --host/--port"))
            return
        if result is None:
            self._seen += data
            read_at_most(self.transport, answer_bytes_missing(self._seen))
            return
        code, peer_key, rest = result
        if code == RPC_CODE_DUPLICATE:
            self._fail(DuplicateKeyError(f"key server:{self.key} is already in use at the proxy"))
        elif code != RPC_CODE_SUCCESS and self.proved:
            self._fail(
                BoardProofError(
                    "the proxy refused us after our board proof: is --board-secret-file "
                    "the same file as the proxy's?"
                )
            )
        elif code != RPC_CODE_SUCCESS or peer_key is None:
            self._fail(ConnectionError("proxy has no matching client key"))
        elif rest and not self.relayed:
            self._fail(ConnectionError("proxy sent session bytes with its answer"))
        else:
            self._early += rest
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

    def _challenge_data(self, data: bytes) -> None:
        assert self.answerer is not None
        try:
            reply = self.answerer.feed(data)
        except boardauth.FrameError as exc:
            self._fail(BoardProofError(str(exc)))
            return
        if reply is None:
            return
        self._stop_challenge_timer()
        self.answerer = None
        read_at_most(self.transport, 4)
        self.transport.write(reply)
        self.proved = True

    def _no_challenge(self) -> None:
        self._challenge_timer = None
        self._fail(
            BoardProofError(
                f"no board challenge from the proxy within {boardauth.CHALLENGE_TIMEOUT:g} s: "
                f"{boardauth.STOCK_PROXY_HINT}"
            )
        )

    def _stop_challenge_timer(self) -> None:
        timer, self._challenge_timer = self._challenge_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._stop_challenge_timer()
        if self.relay is not None:
            self.relay.client_lost()
        if not self.answered.called:
            tls = tls_failure(reason)
            if tls is not None:
                self.answered.errback(Failure(ProxyTLSError(tls)))
                return
            error = ConnectionError(f"closed before answering ({reason.getErrorMessage()})")
            self.answered.errback(Failure(error))

    def _fail(self, exc: Exception) -> None:
        self._stop_challenge_timer()
        if not self.answered.called:
            self.answered.errback(Failure(exc))
        self.transport.abortConnection()

    # -- Ticket ----------------------------------------------------------------

    def accept(self) -> socket.socket | None:
        if self.handed or not self.transport.connected:
            return None
        self.handed = True
        reactor = self.clock
        if reactor is None:
            from twisted.internet import reactor
        if not self.relayed:
            return detach(reactor, self.transport)
        early, self._early = bytes(self._early), bytearray()
        sock, self.relay = relay_session(reactor, self.transport, early)
        return sock

    def reject(self) -> None:
        self.transport.abortConnection()


class ConnectorPhase(enum.Enum):
    """Where a :class:`ProxyConnector` is; each phase holds at most one of its handles."""

    STOPPED = "stopped"  # not running
    IDLE = "idle"  # running, no connection (board busy, not advertised, or about to connect)
    CONNECTING = "connecting"  # ``_pending`` is the connect attempt
    WAITING = "waiting"  # ``_leg`` waits at the proxy for a client
    BACKOFF = "backoff"  # ``_retry`` is the delayed next attempt


class ConnectorPhaseError(Exception):
    """An event arrived in a phase where it cannot happen (a bug, not a peer's fault)."""


#: The phases each phase may move to.
_CONNECTOR_MOVES: dict[ConnectorPhase, frozenset[ConnectorPhase]] = {
    ConnectorPhase.STOPPED: frozenset({ConnectorPhase.IDLE}),
    ConnectorPhase.IDLE: frozenset(
        {ConnectorPhase.CONNECTING, ConnectorPhase.IDLE, ConnectorPhase.STOPPED}
    ),
    ConnectorPhase.CONNECTING: frozenset(
        {
            ConnectorPhase.WAITING,
            ConnectorPhase.BACKOFF,
            ConnectorPhase.IDLE,
            ConnectorPhase.STOPPED,
        }
    ),
    ConnectorPhase.WAITING: frozenset(
        {ConnectorPhase.IDLE, ConnectorPhase.BACKOFF, ConnectorPhase.STOPPED}
    ),
    ConnectorPhase.BACKOFF: frozenset({ConnectorPhase.IDLE, ConnectorPhase.STOPPED}),
}


class ProxyConnector(service.Service):
    """Keeps one connection waiting at the proxy while the board is advertised and idle.

    Its life cycle is :class:`ConnectorPhase`; a move the table does not allow
    raises :class:`ConnectorPhaseError`.
    """

    name = "tvm-server proxy connector"
    #: A waiting connection that lasted longer than this ended normally, not by a fault.
    LONG_WAIT = 30.0

    def __init__(
        self,
        reactor: Any,
        board: Board,
        key: str,
        proxy: tuple[str, int] | Target,
        lifecycle: Lifecycle | None = None,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        connect_timeout: float = 10.0,
        log_interval: float = 60.0,
        board_secret: bytes | None = None,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.reactor = reactor
        self.keepalive = keepalive
        self.board_secret = board_secret
        self.board = board
        self.key = key
        self.proxy = proxy
        self.lifecycle = lifecycle
        self.retry_policy = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay)
        self.connect_timeout = connect_timeout
        self.report = RateLimit(log_interval)
        self.announcement = Announcement()
        self.failures = 0
        self._leg: _ProxyLeg | None = None
        self._leg_since = 0.0
        self._pending: Any = None
        self._retry: Any = None
        self.phase = ConnectorPhase.STOPPED
        #: Called each time a connection waits at the proxy (the board is then idle and warm).
        self.waiting_observers: list[Callable[[], None]] = []

    def _move(self, new: ConnectorPhase) -> None:
        if new not in _CONNECTOR_MOVES[self.phase]:
            raise ConnectorPhaseError(f"proxy connector: {self.phase.value} -> {new.value}")
        self.phase = new

    def startService(self) -> None:
        service.Service.startService(self)
        self._move(ConnectorPhase.IDLE)
        self.board.subscribe(self._maybe_connect)
        if self.lifecycle is not None:
            self.lifecycle.observers.append(self._state_changed)
        if self.lifecycle is None:
            self.board.runtime.ready().addCallback(lambda _: self._maybe_connect())
        else:
            self._maybe_connect()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.board.unsubscribe(self._maybe_connect)
        if self.lifecycle is not None:
            unsubscribe(self.lifecycle.observers, self._state_changed)
        self._disconnect()
        self._move(ConnectorPhase.STOPPED)

    def _state_changed(self, old: State, new: State, reason: str) -> None:
        if new is State.ADVERTISED:
            self._maybe_connect()
        elif new in (State.WITHDRAWN, State.FAILED, State.CHECKING):
            self._disconnect(f"board {new.value}")

    def _where(self) -> str:
        return f"proxy {self.proxy[0]}:{self.proxy[1]}"

    def _endpoint(self) -> Any:
        """Where to connect: the endpoint string's endpoint (TLS), else TCP to HOST:PORT."""
        if isinstance(self.proxy, Target) and self.proxy.description is not None:
            return self.proxy.endpoint(self.reactor)
        host, port = self.proxy[0], self.proxy[1]
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)

    def _disconnect(self, why: str | None = None) -> None:
        """Drop the waiting connection; with ``why``, log once it is really closed."""

        def left(_: object) -> None:
            if why is not None:
                log.info("left proxy {where}: {why}", where=self._where()[len("proxy ") :], why=why)

        self.announcement.set(False, self._where())
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            left(None)
        leg, self._leg = self._leg, None
        if leg is not None and leg.transport is not None and not leg.handed:
            leg.answered.addBoth(left)  # runs from connectionLost: the socket is closed
            leg.transport.abortConnection()
        if self.phase is not ConnectorPhase.STOPPED:
            self._move(ConnectorPhase.IDLE)

    def _advertised(self) -> bool:
        return self.lifecycle.ready if self.lifecycle is not None else self.board.runtime.is_ready

    def _maybe_connect(self) -> None:
        if self.phase is not ConnectorPhase.IDLE or self.board.busy or not self._advertised():
            return
        self._move(ConnectorPhase.CONNECTING)
        leg = _ProxyLeg(self.key, self.board_secret, self.reactor, self.keepalive)
        pending = connectProtocol(self._endpoint(), leg)
        self._pending = pending
        pending.addCallback(self._connected, pending)
        pending.addErrback(self._failed, None)

    def _connected(self, leg: _ProxyLeg, pending: Any) -> defer.Deferred[None] | None:
        if pending is not self._pending:
            leg.transport.abortConnection()  # withdrawn or stopped meanwhile
            return None
        self._pending = None
        self._move(ConnectorPhase.WAITING)
        self._leg = leg
        self._leg_since = self.reactor.seconds()
        self.announcement.set(True, self._where())
        log.info(
            "waiting at proxy {host}:{port} as server:{key}",
            host=self.proxy[0],
            port=self.proxy[1],
            key=self.key,
        )
        for observer in list(self.waiting_observers):
            observer()
        return leg.answered.addCallbacks(self._paired, self._failed, errbackArgs=(leg,))

    def _paired(self, leg: _ProxyLeg) -> None:
        self._leg = None
        if self.phase is ConnectorPhase.WAITING:
            self._move(ConnectorPhase.IDLE)  # the board is busy; its idle observer reconnects
        if self.failures:
            log.info(
                "proxy {host}:{port}: paired with a client after {n} failed attempts",
                host=self.proxy[0],
                port=self.proxy[1],
                n=self.failures,
            )
        self.failures = 0
        self.report.reset()
        self.board.offer(leg)

    def _failed(self, failure: Failure, leg: _ProxyLeg | None) -> None:
        if failure.check(defer.CancelledError) or self.phase is ConnectorPhase.STOPPED:
            return  # an attempt we dropped ourselves
        if leg is None:
            self._pending = None
        elif leg is not self._leg:
            return  # a connection we dropped ourselves
        else:
            self._leg = None
        waited = self.reactor.seconds() - self._leg_since if leg is not None else 0.0
        if waited > self.LONG_WAIT and not failure.check(
            DuplicateKeyError, NotAProxyError, BoardProofError, ProxyTLSError
        ):
            # The proxy let a long wait go (its --timeout-server, a restart): routine.
            log.info(
                "proxy {host}:{port} ended our {secs:.0f}s wait ({err}); reconnecting",
                host=self.proxy[0],
                port=self.proxy[1],
                secs=waited,
                err=failure.getErrorMessage(),
            )
            self.failures = 0
            self.report.reset()
            self._move(ConnectorPhase.IDLE)
            self._maybe_connect()
            return
        self.announcement.set(False, self._where())
        delay = self.retry_policy(self.failures)
        self.failures += 1
        held = self.report.event(self.reactor.seconds())
        if held is not None:
            log.warn(
                "proxy {host}:{port}: {err}; retrying in {delay:.1f}s{more}",
                host=self.proxy[0],
                port=self.proxy[1],
                err=describe_failure(failure),
                delay=delay,
                more=f" ({held} similar failures not logged)" if held else "",
            )
        self._move(ConnectorPhase.BACKOFF)
        self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._move(ConnectorPhase.IDLE)
        self._maybe_connect()


def describe_failure(failure: Failure) -> str:
    """One line for the operator: what went wrong at the proxy and what to do."""
    if failure.check(DuplicateKeyError):
        return (
            f"{failure.getErrorMessage()} (another server holds it; "
            "it is retried until that one leaves)"
        )
    if failure.check(NotAProxyError):
        return failure.getErrorMessage()
    if failure.check(ProxyTLSError):
        return f"failed TLS verification: {failure.getErrorMessage()}"
    if failure.check(ConnectError, DNSLookupError):
        return f"unreachable ({failure.getErrorMessage()}): is tvm-proxy running there?"
    return failure.getErrorMessage()
