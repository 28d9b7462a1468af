"""A Deferred-based tracker client, used by the server, the proxy, the CLI and tests.

Invariant: at most one call is on the wire per connection. The tracker
answers a REQUEST only when a resource is free, and answers other calls at
once, so pipelining would make replies ambiguous; later calls queue behind
the one in flight. Cancelling an in-flight call closes the connection (the
protocol has no other way to withdraw a REQUEST).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from . import sockopts
from .codec import (
    TRACKER_MAGIC,
    CodecError,
    FrameDecoder,
    MagicDecoder,
    TrackerCode,
    encode_frame,
    encode_int32,
)


class TrackerError(Exception):
    """The peer is not a tracker, or the tracker refused a call."""


class TrackerClientProtocol(Protocol):
    """The client side of a tracker connection.

    ``ready`` fires with the protocol once the tracker has answered the magic.
    """

    def __init__(self) -> None:
        self.ready: Deferred[TrackerClientProtocol] = Deferred()
        self._magic = MagicDecoder()
        self._handshaken = False
        self._decoder = FrameDecoder()
        self._queue: collections.deque[tuple[bytes, Deferred[Any]]] = collections.deque()
        self._in_flight: Deferred[Any] | None = None
        self._closed: Failure | None = None

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        sockopts.set_nodelay(self.transport)
        sockopts.set_keepalive(self.transport)
        self.transport.write(encode_int32(TRACKER_MAGIC))

    def dataReceived(self, data: bytes) -> None:
        sockopts.quickack(self.transport)
        if not self._handshaken:
            greeting = self._magic.feed(data)
            if greeting is None:
                return
            magic, data = greeting
            if magic != TRACKER_MAGIC:
                self._fail(TrackerError(f"peer answered magic {magic:#x}: not a TVM tracker"))
                return
            self._handshaken = True
            self.ready.callback(self)
            self._send_next()
        try:
            replies = self._decoder.feed(data)
        except CodecError as exc:
            self._fail(TrackerError(f"bad frame from tracker: {exc}"))
            return
        for reply in replies:
            waiting, self._in_flight = self._in_flight, None
            if waiting is None:
                self._fail(TrackerError(f"unsolicited reply from tracker: {reply!r}"))
                return
            waiting.callback(reply)
            self._send_next()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closed = reason
        if not self.ready.called:
            self.ready.errback(reason)
        pending = [self._in_flight] if self._in_flight is not None else []
        pending += [d for _, d in self._queue]
        self._in_flight = None
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
        self._queue.append((encode_frame(request), d))
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

    def summary(self) -> Deferred[dict[str, Any]]:
        """SUMMARY; fires with ``{"queue_info": ..., "server_info": ...}``."""
        return self.call([TrackerCode.SUMMARY]).addCallback(_expect_success_value, "SUMMARY")

    def pending_matchkeys(self) -> Deferred[list[str]]:
        """GET_PENDING_MATCHKEYS; fires with this connection's unassigned match keys."""
        return self.call([TrackerCode.GET_PENDING_MATCHKEYS]).addCallback(_expect_list)

    def close(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionDone."""
        if self.transport is not None:
            self.transport.loseConnection()

    # -- internals ------------------------------------------------------------

    def _send_next(self) -> None:
        if self._in_flight is not None or not self._queue or not self._handshaken:
            return
        frame, d = self._queue.popleft()
        self._in_flight = d
        self.transport.write(frame)

    def _cancel(self, d: Deferred[Any]) -> None:
        if d is self._in_flight:
            self._in_flight = None
            self.transport.abortConnection()
        else:
            self._queue = collections.deque(item for item in self._queue if item[1] is not d)
        d.errback(Failure(CancelledError()))

    def _fail(self, exc: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(Failure(exc))
        waiting, self._in_flight = self._in_flight, None
        if waiting is not None:
            waiting.errback(Failure(exc))
        self.transport.abortConnection()


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
    reactor: IReactorTCP, host: str, port: int, timeout: float = 10
) -> Deferred[TrackerClientProtocol]:
    """Connect to a tracker; fires with a ready client protocol."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    d = connectProtocol(endpoint, TrackerClientProtocol())
    return d.addCallback(lambda proto: proto.ready)


class _NotifyingTrackerProtocol(TrackerClientProtocol):
    """A tracker connection that reports its loss to ``factory.on_lost``."""

    factory: _NotifyingFactory

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)
        self.factory.on_lost(self)


class _NotifyingFactory(TrackerClientFactory):
    protocol = _NotifyingTrackerProtocol
    noisy = False

    def __init__(self, on_lost: Callable[[TrackerClientProtocol], None]) -> None:
        self.on_lost = on_lost


def tracker_link_service(
    reactor: Any,
    tracker: tuple[str, int],
    on_ready: Callable[[TrackerClientProtocol], Any],
    on_lost: Callable[[TrackerClientProtocol], None],
    initial_delay: float = 0.2,
    max_delay: float = 5.0,
) -> ClientService:
    """A ``ClientService`` that keeps one tracker connection up, with backoff.

    ``on_ready`` is called with each new connection once the tracker answered
    the magic (it may return a Deferred; the connection counts as made when
    that fires); ``on_lost`` with the same protocol object when it closes.
    Used by the server and the proxy to stay registered across tracker restarts.
    """
    host, port = tracker
    endpoint = HostnameEndpoint(reactor, host, port, timeout=10)
    return ClientService(
        endpoint,
        _NotifyingFactory(on_lost),
        retryPolicy=backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay),
        clock=reactor,
        # ClientService hands over a wrapper; ``ready`` fires with the real protocol.
        prepareConnection=lambda wrapped: wrapped.ready.addCallback(on_ready),
    )
