"""A Deferred-based tracker client, used by the server, the proxy, the CLI and tests.

Invariants:
- Calls are pipelined: every call but REQUEST is answered at once and in
  order, so several may be on the wire and their replies are matched in
  order (the server's UPDATE_INFO and PUT leave in one write, one round trip
  instead of two). A REQUEST is answered only when a resource is free, so it
  is sent only when nothing else is in flight, and nothing is sent after it
  until its reply came: replies are never ambiguous. Cancelling an in-flight
  call closes the connection (the protocol has no other way to withdraw a
  REQUEST).
- A peer that answers the magic wrongly, closes before answering it, or (with
  ``magic_timeout``) stays silent fails ``ready`` with :class:`NotATrackerError`,
  whose message says "not a TVM tracker".
- :meth:`TrackerClientProtocol.authenticate` asks for the connection's nonce
  once; once it is known, the proof's frame is queued before the method
  returns, so a PUT queued right after it reaches the tracker after it.
- :class:`TrackerLink` keeps one connection up: every attempt is bounded by a
  connect timeout and a magic timeout; failures are logged at warn on the
  first one of a streak and then at most once per ``report_interval`` with the
  retry delay; stopping it at any moment (connecting, waiting, connected)
  fires its Deferred once the connection is closed, and raises nothing.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTCP, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import sockopts
from .boardauth import BOARD_AUTH, BOARD_CHALLENGE, LABEL_TRACKER, proof
from .codec import (
    MAX_REPLY_FRAME_BYTES,
    TRACKER_MAGIC,
    CodecError,
    FrameDecoder,
    MagicDecoder,
    TrackerCode,
    encode_frame,
    encode_int32,
)
from .outgoing import beneath, tls_failure
from .ratelimit import RateLimit

log = Logger()


class TrackerError(Exception):
    """The peer is not a tracker, or the tracker refused a call."""


class LinkTLSError(TrackerError):
    """The TLS handshake with the tracker failed (certificate or host name)."""


class BoardAuthError(TrackerError):
    """The tracker did not accept (or does not know) our board proof."""


class NotATrackerError(TrackerError):
    """The peer accepted the connection but did not answer the TVM tracker magic."""


#: Seconds an outgoing tracker link may take to connect, and then to answer the magic.
CONNECT_TIMEOUT = 10.0
MAGIC_TIMEOUT = 5.0


class TrackerClientProtocol(Protocol):
    """The client side of a tracker connection.

    ``ready`` fires with the protocol once the tracker has answered the magic;
    with ``magic_timeout`` (seconds, and ``clock``) it fails with
    :class:`NotATrackerError` if no answer came in time. Cancelling ``ready``
    aborts the connection.
    """

    def __init__(
        self,
        magic_timeout: float | None = None,
        clock: Any = None,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.keepalive = keepalive
        self.ready: Deferred[TrackerClientProtocol] = Deferred(self._cancel_ready)
        self.magic_timeout = magic_timeout
        self.clock = clock
        self._magic_timer: Any = None
        self._magic = MagicDecoder()
        self._handshaken = False
        # Replies (a SUMMARY grows with the tracker's state) are bounded only
        # loosely: stock's client reads any length (see MAX_REPLY_FRAME_BYTES).
        self._decoder = FrameDecoder(MAX_REPLY_FRAME_BYTES)
        #: Calls not yet sent: (frame, is a REQUEST, Deferred).
        self._queue: collections.deque[tuple[bytes, bool, Deferred[Any]]] = collections.deque()
        #: Calls sent and not yet answered, oldest first; a REQUEST is always alone.
        self._in_flight: collections.deque[Deferred[Any]] = collections.deque()
        self._request_in_flight = False
        self._closed: Failure | None = None
        self._nonce: str | None = None  # this connection's board challenge
        self._board_keys: set[str] = set()  # keys proven on this connection

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        tcp = beneath(self.transport)  # the socket under TLS, for tls: links
        sockopts.set_nodelay(tcp)
        sockopts.set_keepalive(tcp, self.keepalive)
        self._tcp().write(encode_int32(TRACKER_MAGIC))
        if self.magic_timeout is not None:
            if self.clock is None:
                from twisted.internet import reactor as clock
            else:
                clock = self.clock
            self._magic_timer = clock.callLater(self.magic_timeout, self._no_magic)

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(beneath(self.transport))
        if not self._handshaken:
            greeting = self._magic.feed(data)
            if greeting is None:
                return
            magic, data = greeting
            if magic != TRACKER_MAGIC:
                shown = magic.to_bytes(4, "little", signed=True)
                why = f"not a TVM tracker: it answered {shown!r} to the magic"
                self._fail(NotATrackerError(why))
                return
            self._stop_magic_timer()
            self._handshaken = True
            self.ready.callback(self)
            self._send_next()
        try:
            replies = self._decoder.feed(data)
        except CodecError as exc:
            self._fail(TrackerError(f"bad frame from tracker: {exc}"))
            return
        for reply in replies:
            if not self._in_flight:
                self._fail(TrackerError(f"unsolicited reply from tracker: {reply!r}"))
                return
            waiting = self._in_flight.popleft()
            self._request_in_flight = False
            waiting.callback(reply)
        self._send_next()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = reason
        self._stop_magic_timer()
        if not self.ready.called:
            tls = tls_failure(reason)
            if tls is not None:
                reason = Failure(LinkTLSError(tls))
            elif self.transport is not None and not self._handshaken:
                reason = Failure(
                    NotATrackerError(
                        "not a TVM tracker: it closed the connection without answering the "
                        "magic (or it refused this connection)"
                    )
                )
            self.ready.errback(reason)
        pending = [*self._in_flight, *(d for _, _, d in self._queue)]
        self._in_flight.clear()
        self._request_in_flight = False
        self._queue.clear()
        for d in pending:
            d.errback(reason)

    # -- calls ----------------------------------------------------------------

    def call(self, request: list[Any]) -> Deferred[Any]:
        """Send one request frame; the Deferred fires with the raw JSON reply."""
        d: Deferred[Any] = Deferred(self._cancel)
        if self._closed is not None:
            d.errback(self._closed)
            return d
        self._queue.append((encode_frame(request), request[0] == TrackerCode.REQUEST, d))
        self._send_next()
        return d

    def ping(self) -> Deferred[None]:
        """PING; fires with ``None`` when the tracker answers SUCCESS."""
        return self.call([TrackerCode.PING]).addCallback(_expect_success, "PING")

    def stop(self, stop_key: str) -> Deferred[bool]:
        """STOP; fires with whether the tracker accepted the key."""
        d = self.call([TrackerCode.STOP, stop_key])
        return d.addCallback(lambda reply: reply == TrackerCode.SUCCESS)

    def put(
        self, key: str, port: int, matchkey: str, custom_addr: str | None = None
    ) -> Deferred[None]:
        """PUT a resource ``[addr, port, matchkey]`` under ``key``."""
        d = self.call([TrackerCode.PUT, key, [port, matchkey], custom_addr])
        return d.addCallback(_expect_success, "PUT")

    def update_info(self, info: dict[str, Any]) -> Deferred[None]:
        """UPDATE_INFO with ``{"key": "server:<key>", "addr": [host|None, port]}``."""
        d = self.call([TrackerCode.UPDATE_INFO, info])
        return d.addCallback(_expect_success, "UPDATE_INFO")

    def request(self, key: str, user: str = "", priority: int = 1) -> Deferred[list[Any]]:
        """REQUEST a resource; fires with ``[addr, port, matchkey]`` once assigned."""
        d = self.call([TrackerCode.REQUEST, key, user, priority])
        return d.addCallback(_expect_success_value, "REQUEST")

    def summary(self, extended: bool = False) -> Deferred[dict[str, Any]]:
        """SUMMARY; fires with ``{"queue_info": ..., "server_info": ...}``.

        ``extended`` asks our tracker for its ``"tvmrpc"`` field too (expected
        waits); a stock tracker ignores the request's extra element.
        """
        request: list[Any] = [TrackerCode.SUMMARY]
        if extended:
            request.append({"tvmrpc": 1})
        return self.call(request).addCallback(_expect_success_value, "SUMMARY")

    def pending_matchkeys(self) -> Deferred[list[str]]:
        """GET_PENDING_MATCHKEYS; fires with this connection's unassigned match keys."""
        return self.call([TrackerCode.GET_PENDING_MATCHKEYS]).addCallback(_expect_list)

    def authenticate(self, secret: bytes, key: str) -> Deferred[None]:
        """Prove the board secret for ``key`` (docs/security.md); queue PUT or
        UPDATE_INFO for ``key`` after this Deferred fires.

        Fails with :class:`BoardAuthError` saying what is wrong in one line
        (a stock tracker, a tracker without a secret, a wrong secret).
        """
        return Deferred.fromCoroutine(self._authenticate(secret, key))

    async def _authenticate(self, secret: bytes, key: str) -> None:
        if key in self._board_keys:
            return
        if self._nonce is None:
            try:
                reply = await self.call([BOARD_CHALLENGE])
            except (ConnectionDone, ConnectionLost):
                raise BoardAuthError(
                    "the tracker closed the connection when asked for a board challenge: it "
                    "does not support board authentication (a stock tracker?); run tvmrpc's "
                    "tracker with --board-secret-file, or drop --board-secret-file here"
                ) from None
            if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == 0):
                raise BoardAuthError(f"the tracker refused the board challenge: {reply!r}")
            self._nonce = str(reply[1])
        reply = await self.call([BOARD_AUTH, key, proof(secret, LABEL_TRACKER, self._nonce, key)])
        if reply != TrackerCode.SUCCESS:
            raise BoardAuthError(
                f"the tracker refused our board proof for {key}: {reply!r} "
                "(is --board-secret-file the same file as the tracker's?)"
            )
        self._board_keys.add(key)

    def close(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionDone."""
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (``abortConnection``); calls waiting fail."""
        if self.transport is not None:
            self._tcp().abortConnection()

    # -- internals ------------------------------------------------------------

    def _no_magic(self) -> None:
        self._magic_timer = None
        self._fail(
            NotATrackerError(
                f"not a TVM tracker: no answer to the magic within {self.magic_timeout:g} s"
            )
        )

    def _stop_magic_timer(self) -> None:
        if self._magic_timer is not None and self._magic_timer.active():
            self._magic_timer.cancel()
        self._magic_timer = None

    def _tcp(self) -> ITCPTransport:
        """This protocol's transport (a TCP, UNIX or TLS connection: all can abort)."""
        return cast(ITCPTransport, self.transport)

    def _cancel_ready(self, d: Deferred[Any]) -> None:
        self._stop_magic_timer()
        self.abort()

    def _send_next(self) -> None:
        """Write every queued call that may go now, in one write (see the invariants)."""
        if not self._handshaken or self._request_in_flight:
            return
        frames = []
        while self._queue:
            frame, is_request, d = self._queue[0]
            if is_request and self._in_flight:
                break  # a REQUEST goes alone: its reply may come after later calls' replies
            self._queue.popleft()
            self._in_flight.append(d)
            frames.append(frame)
            if is_request:
                self._request_in_flight = True
                break
        if frames:
            self._tcp().write(b"".join(frames))

    def _cancel(self, d: Deferred[Any]) -> None:
        if d in self._in_flight:
            self._in_flight.remove(d)
            self.abort()
        else:
            self._queue = collections.deque(item for item in self._queue if item[2] is not d)
        d.errback(Failure(CancelledError()))

    def _fail(self, exc: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(Failure(exc))
        waiting = list(self._in_flight)
        self._in_flight.clear()
        self._request_in_flight = False
        for d in waiting:
            d.errback(Failure(exc))
        self.abort()


def _expect_success(reply: Any, what: str) -> None:
    if reply != TrackerCode.SUCCESS:
        raise TrackerError(f"tracker refused {what}: {reply!r}")


def _expect_success_value(reply: Any, what: str) -> Any:
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == TrackerCode.SUCCESS):
        raise TrackerError(f"tracker refused {what}: {reply!r}")
    return reply[1]


def _expect_list(reply: Any) -> list[str]:
    if not isinstance(reply, list):
        raise TrackerError(f"bad GET_PENDING_MATCHKEYS reply: {reply!r}")
    return reply


class TrackerClientFactory(Factory):
    """Builds :class:`TrackerClientProtocol`; for ``ClientService`` reconnects.

    Use ``prepareConnection=lambda p: p.ready`` so a connection counts only
    once the tracker answered the magic.
    """

    protocol = TrackerClientProtocol


def connect_tracker(
    reactor: IReactorTCP,
    host: str,
    port: int,
    timeout: float = 10,
    magic_timeout: float | None = MAGIC_TIMEOUT,
) -> Deferred[TrackerClientProtocol]:
    """Connect to a tracker; fires with a ready client protocol.

    ``host`` may be ``unix:PATH`` for a tracker listening on a UNIX socket
    (``--listen unix:PATH``); ``port`` is then ignored. A peer that does not
    answer the magic within ``magic_timeout`` seconds fails with
    :class:`NotATrackerError`.
    """
    endpoint: Any
    if host.startswith("unix:"):
        endpoint = UNIXClientEndpoint(reactor, host[len("unix:") :], timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    d = connectProtocol(endpoint, TrackerClientProtocol(magic_timeout, reactor))
    return d.addCallback(lambda proto: proto.ready)


class LinkState(enum.Enum):
    """Where a :class:`TrackerLink` is in its life cycle."""

    STOPPED = "stopped"
    CONNECTING = "connecting"  # TCP connect, magic and ``on_ready`` in progress
    READY = "ready"
    WAITING = "waiting"  # a retry is scheduled


class _LinkProtocol(TrackerClientProtocol):
    """A tracker connection that reports its loss to its :class:`TrackerLink`."""

    link: TrackerLink

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)
        self.link._connection_lost(self)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: TrackerLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _LinkProtocol:
        proto = _LinkProtocol(self.link.magic_timeout, self.link.reactor, self.link.keepalive)
        proto.factory = self
        proto.link = self.link
        self.link._open = proto
        return proto


def describe_link_failure(failure: Failure, connect_timeout: float) -> str:
    """What went wrong with a link attempt, as the end of a sentence about the target."""
    exc = failure.value
    if isinstance(exc, NotATrackerError):
        return f"is {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "is unreachable: connection refused"
    if isinstance(exc, DNSLookupError):
        return "is unreachable: cannot resolve the host name"
    if isinstance(exc, (TimeoutError, defer.TimeoutError)):
        return f"is unreachable: no answer to connect within {connect_timeout:g} s"
    if isinstance(exc, LinkTLSError):
        return f"failed TLS verification: {exc}"
    if isinstance(exc, TrackerError):
        return f"refused us: {exc}"
    return f"is unreachable: {exc or type(exc).__name__}"


class TrackerLink(service.Service):
    """Keeps one tracker connection up, reconnecting with backoff.

    ``on_ready`` is called with each new connection once the tracker answered
    the magic (it may return a Deferred; the connection counts as made when
    that fires); ``on_lost`` with the same protocol object when a connection
    that was ready closes. Used by the server and the proxy to stay
    registered across tracker restarts.
    """

    def __init__(
        self,
        reactor: Any,
        tracker: tuple[str, int],
        on_ready: Callable[[TrackerClientProtocol], Any],
        on_lost: Callable[[TrackerClientProtocol], None],
        *,
        initial_delay: float = 0.2,
        max_delay: float = 5.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        magic_timeout: float = MAGIC_TIMEOUT,
        report_interval: float = 60.0,
        retry_policy: Callable[[int], float] | None = None,
        endpoint: Any = None,
        board_secret: bytes | None = None,
        board_key: str = "",
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.reactor = reactor
        self.keepalive = keepalive
        #: With a secret, each connection proves it for ``board_key`` before ``on_ready``.
        self.board_secret = board_secret
        self.board_key = board_key
        if endpoint is None and getattr(tracker, "description", None):
            make = getattr(tracker, "endpoint")  # noqa: B009 - a tvmrpc.outgoing.Target (tls:...)
            endpoint = make(reactor)
        self.endpoint = endpoint or HostnameEndpoint(
            reactor, tracker[0], tracker[1], timeout=connect_timeout
        )
        self.tracker = tracker
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.connect_timeout = connect_timeout
        self.magic_timeout = magic_timeout
        self.retry_policy = retry_policy or backoffPolicy(
            initialDelay=initial_delay, maxDelay=max_delay
        )
        self.state = LinkState.STOPPED
        self.failures = 0
        self.ready_link: TrackerClientProtocol | None = None
        self._report = RateLimit(report_interval)
        self._attempt: Deferred[Any] | None = None
        self._retry: Any = None
        self._open: _LinkProtocol | None = None
        self._closed_waiters: list[Deferred[None]] = []

    @property
    def target(self) -> str:
        return f"tracker {self.tracker[0]}:{self.tracker[1]}"

    # -- service events -----------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        if self.state is LinkState.STOPPED:
            self._connect()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        self.state = LinkState.STOPPED
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.called:
            attempt.cancel()
        self.ready_link = None
        if self._open is None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        self._open.abort()
        return d

    # -- connection events ----------------------------------------------------------

    def _connect(self) -> None:
        self.state = LinkState.CONNECTING
        d: Deferred[Any] = self.endpoint.connect(_LinkFactory(self))
        d.addCallback(lambda proto: proto.ready)
        if self.board_secret is not None:
            secret, key = self.board_secret, self.board_key
            d.addCallback(
                lambda proto: proto.authenticate(secret, key).addCallback(lambda _: proto)
            )
        d.addCallback(
            lambda proto: defer.maybeDeferred(self.on_ready, proto).addCallback(lambda _: proto)
        )
        d.addCallbacks(self._ready, self._attempt_failed)
        self._attempt = d

    def _ready(self, proto: TrackerClientProtocol) -> None:
        self._attempt = None
        if self.state is not LinkState.CONNECTING:
            return
        self.state = LinkState.READY
        self.ready_link = proto
        if self.failures:
            log.info(
                "{target} answered after {n} failed attempts",
                target=self.target,
                n=self.failures,
            )
        self.failures = 0
        self._report.reset()

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self.state is not LinkState.CONNECTING:
            return  # stopped meanwhile: the cancellation is expected
        if self._open is not None:
            self._open.abort()
        self.failures += 1
        delay = self.retry_policy(self.failures)
        held = self._report.event(self.reactor.seconds())
        if held is not None:
            what = describe_link_failure(failure, self.connect_timeout)
            if held == 0 and self.failures == 1:
                log.warn(
                    "{target} {what}; retrying in {delay:.1f} s "
                    "(further failures are logged at most once a minute)",
                    target=self.target,
                    what=what,
                    delay=delay,
                )
            else:
                log.warn(
                    "{target} still {what} ({n} failed attempts so far); retrying in {delay:.1f} s",
                    target=self.target,
                    what=what.removeprefix("is "),
                    n=self.failures,
                    delay=delay,
                )
        self._wait(delay)

    def _connection_lost(self, proto: _LinkProtocol) -> None:
        if proto is self._open:
            self._open = None
        if self.state is LinkState.STOPPED:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)
            return
        if self.state is LinkState.READY and proto is self.ready_link:
            self.ready_link = None
            self.on_lost(proto)
            self._wait(self.retry_policy(1))

    def _wait(self, delay: float) -> None:
        self.state = LinkState.WAITING
        self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.state is LinkState.WAITING:
            self._connect()
