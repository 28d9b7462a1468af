"""Tracker mode (``--tracker``): keep the tracker told that this board is free.

Invariants:
- On every tracker connection: UPDATE_INFO ``{"key": "server:<key>",
  "addr": [custom_addr or null, port]}``, then, while the board is idle, PUT
  ``[key, [port, matchkey], custom_addr]`` under a fresh match key.
- The UPDATE_INFO carries our ``"tvmrpc"`` field (the last session's outcome
  and bytes, see tvmrpc.status.extension); when it changed, UPDATE_INFO is
  sent again just before the next PUT, so the tracker learns how it went.
- Only the current match key is accepted (:meth:`claim`); claiming it
  consumes it, so nothing is registered while a session runs or waits. When
  the board is idle again a fresh key is PUT.
- Every ``period`` seconds GET_PENDING_MATCHKEYS; if the tracker handed our
  key out and no client came within ``grace`` seconds, a fresh key is PUT
  (the stale one then gets the no-match code).
- The tracker connection is re-established by ``ClientService`` with
  backoff; the server keeps serving meanwhile.
- With a :class:`Lifecycle`, the tracker is contacted only once the board is
  advertised (zygote warm, health check passed) and nothing is PUT while it
  is not. When the board is withdrawn or fails, the tracker connection is
  closed: the tracker drops a closed connection's resources (the wire has
  no un-PUT), so no client is handed to a board that cannot serve.
- With a board secret, every tracker connection proves it for our key
  (docs/security.md) before UPDATE_INFO; a tracker that refuses or does not
  know the proof is a failed attempt, logged and retried like any other.
- ``announcement.up`` is true exactly while a tracker link has been
  answered (UPDATE_INFO) and not lost or dropped.
- The registrar observes the board and the lifecycle only while it runs: it
  subscribes in ``startService`` and unsubscribes in ``stopService``.
- A re-offer is one round trip: an UPDATE_INFO and the PUT after it leave
  together (the tracker client pipelines them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import sockopts
from ..client import TrackerClientProtocol, TrackerLink
from ..codec import random_matchkey
from .board import Board
from .lifecycle import Announcement, Lifecycle, State

log = Logger()


class Registrar(service.Service):
    """Registers the board at a tracker and keeps its match key fresh."""

    name = "tvm-server tracker registrar"

    def __init__(
        self,
        reactor: Any,
        board: Board,
        key: str,
        tracker: tuple[str, int],
        port: defer.Deferred[int] | int,
        custom_addr: str | None = None,
        period: float = 2.0,
        grace: float = 5.0,
        lifecycle: Lifecycle | None = None,
        board_secret: bytes | None = None,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.keepalive = keepalive
        self.reactor = reactor
        self.board = board
        self.key = key
        self.tracker = tracker
        #: With a secret, each tracker connection proves it for our key first.
        self.board_secret = board_secret
        self.port_source = port
        self.port: int | None = port if isinstance(port, int) else None
        self.custom_addr = custom_addr
        self.period = period
        self.grace = grace
        self.matchkey: str | None = None
        self.old_keys: set[str] = set()
        self.link: TrackerClientProtocol | None = None
        self._put_on: TrackerClientProtocol | None = None
        self._missing_since: float | None = None
        self._checking = False
        self._client: TrackerLink | None = None
        #: The ``"tvmrpc"`` UPDATE_INFO field (tvmrpc.status); re-sent before a PUT when it changed.
        self.extension: Callable[[], dict[str, Any] | None] = lambda: None
        self._sent_extension: dict[str, Any] | None = None
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        #: Called with True each time the tracker acknowledged a PUT (registered and free),
        #: with False when the tracker link is lost.
        self.link_observers: list[Callable[[bool], None]] = []
        self.lifecycle = lifecycle
        self.announcement = Announcement()

    # -- service -----------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self.board.subscribe(self._register)
        if self.lifecycle is not None and self._state_changed not in self.lifecycle.observers:
            self.lifecycle.observers.append(self._state_changed)
        if self.port is None and isinstance(self.port_source, defer.Deferred):
            self.port_source.addCallback(self._bound)
        else:
            self._connect()

    def _bound(self, port: int) -> int:
        self.port = port
        if self.running:
            self._connect()
        return port

    def _advertised(self) -> bool:
        return self.lifecycle is None or self.lifecycle.serving

    def _connect(self) -> None:
        if self._client is not None or self.port is None or not self._advertised():
            return
        self._client = TrackerLink(
            self.reactor,
            self.tracker,
            self._ready,
            self._lost,
            board_secret=self.board_secret,
            board_key=self.key,
            keepalive=self.keepalive,
        )
        self._client.startService()

    def _state_changed(self, old: State, new: State, reason: str) -> None:
        if not self.running:
            return
        if new is State.ADVERTISED:
            self._connect()
            self._register()
        elif new in (State.WITHDRAWN, State.FAILED):
            if self._client is not None:
                log.info(
                    "withdrawn from tracker {host}:{port} ({reason})",
                    host=self.tracker[0],
                    port=self.tracker[1],
                    reason=reason,
                )
            self._disconnect()

    def _disconnect(self) -> defer.Deferred[None] | None:
        """Close the tracker link: the tracker forgets what this connection PUT."""
        if self._loop.running:
            self._loop.stop()
        if self.matchkey is not None:
            self.old_keys.add(self.matchkey)
        self.matchkey = None
        self.link = None
        self._put_on = None
        self.announcement.set(False, self._where())
        if self._client is not None:
            client, self._client = self._client, None
            return client.stopService()
        return None

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        self.board.unsubscribe(self._register)
        if self.lifecycle is not None and self._state_changed in self.lifecycle.observers:
            self.lifecycle.observers.remove(self._state_changed)
        return self._disconnect()

    # -- the tracker connection --------------------------------------------------

    def _ready(self, link: TrackerClientProtocol) -> defer.Deferred[None]:
        """Tell the tracker who we are; the link counts once that is answered."""
        d = link.update_info(self._info())
        return d.addCallback(lambda _: self._linked(link))

    def _where(self) -> str:
        return f"tracker {self.tracker[0]}:{self.tracker[1]}"

    def _info(self, extension: dict[str, Any] | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"key": f"server:{self.key}", "addr": [self.custom_addr, self.port]}
        self._sent_extension = extension if extension is not None else self.extension()
        if self._sent_extension is not None:
            info["tvmrpc"] = self._sent_extension
        return info

    def _linked(self, link: TrackerClientProtocol) -> None:
        if self._client is None:
            link.close()  # withdrawn while UPDATE_INFO was on its way
            return
        self.link = link
        self._put_on = None
        self.announcement.set(True, self._where())
        log.info(
            "registered with tracker {host}:{port} as server:{key}",
            host=self.tracker[0],
            port=self.tracker[1],
            key=self.key,
        )
        if not self._loop.running:
            self._loop.start(self.period, now=False)
        self._register()

    def _lost(self, link: TrackerClientProtocol) -> None:
        if link is not self.link or self._client is None:
            return
        self.link = None
        self._put_on = None
        self.announcement.set(False, self._where())
        if self._loop.running:
            self._loop.stop()
        if self.running:
            log.info("tracker connection lost; reconnecting")
            for observer in list(self.link_observers):
                observer(False)

    # -- match keys ----------------------------------------------------------------

    def claim(self, matchkey: str) -> bool:
        """Accept ``matchkey`` if it is the current one; it cannot be used twice."""
        if self.matchkey is None or matchkey != self.matchkey:
            return False
        self.matchkey = None
        self._missing_since = None
        return True

    def _register(self) -> None:
        """PUT a fresh match key when the board is idle and this link has none."""
        link, port = self.link, self.port
        if link is None or port is None or not self.running or self.board.busy:
            return
        if self.lifecycle is not None and not self.lifecycle.ready:
            return
        if self.matchkey is not None and self._put_on is link:
            return
        if self.matchkey is not None:
            self.old_keys.add(self.matchkey)
        self.matchkey = random_matchkey(self.key, self.old_keys)
        self._put_on = link
        self._missing_since = None
        extension = self.extension()
        if extension != self._sent_extension:
            info = self._info(extension)
            link.update_info(info).addErrback(self._call_failed, link, "UPDATE_INFO")
        d = link.put(self.key, port, self.matchkey, self.custom_addr)
        d.addCallback(lambda _: self._put_done(link))
        d.addErrback(self._call_failed, link, "PUT")

    def _put_done(self, link: TrackerClientProtocol) -> None:
        if link is self.link:
            for observer in list(self.link_observers):
                observer(True)

    def _check(self) -> defer.Deferred[None] | None:
        link = self.link
        if link is None or self._checking or self.matchkey is None or self.board.busy:
            self._missing_since = None
            return None
        self._checking = True
        d = link.pending_matchkeys()

        def checked(pending: list[str]) -> None:
            if self.matchkey is None or self.board.busy or link is not self.link:
                return
            if self.matchkey in pending:
                self._missing_since = None
                return
            now = self.reactor.seconds()
            if self._missing_since is None:
                self._missing_since = now
            elif now - self._missing_since >= self.grace - self.period / 2:
                log.info("match key handed out but no client came; registering a fresh one")
                self._put_on = None
                self._register()

        def done(result: Any) -> Any:
            self._checking = False
            return result

        d.addCallback(checked)
        d.addBoth(done)
        d.addErrback(self._call_failed, link, "GET_PENDING_MATCHKEYS")
        return None

    def _call_failed(self, failure: Failure, link: TrackerClientProtocol, what: str) -> None:
        if link is self.link:
            log.warn("tracker {what} failed: {err}", what=what, err=failure.getErrorMessage())
            link.close()
