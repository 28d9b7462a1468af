"""Tracker mode: keep a tracker told about every server waiting at the proxy.

Invariants:
- Every waiting server is PUT at the tracker under its current match key
  with the proxy's port (and ``custom_addr`` or null, so the tracker hands
  clients the proxy's address); after a reconnect every waiting server is
  re-keyed and PUT again (the old keys may have been handed out already).
- UPDATE_INFO reports ``server:proxy[k1,k2,...]``: the device keys of the
  servers present now (the switchboard's bounded
  :class:`~tvmrpc.proxy.limits.DeviceKeys`, so the frame stays far below the
  tracker's 1 MiB limit) on every connection, at once when a new device key
  appears (before its PUT), and within one ``period`` after a key's last
  server left (the set shrinks).
- If the tracker refuses an UPDATE_INFO (answers FAIL, or closes the
  connection while it is the call in flight and we did not reset it), the
  registrar says so at warn and advertises plain ``server:proxy`` from then
  on: one refusal costs at most one reconnect, never a loop, and PUTs (what
  makes boards reachable) go on.
- A key the tracker handed out (missing from GET_PENDING_MATCHKEYS) that no
  client used within ``grace`` seconds is re-keyed and PUT again.
- A waiting server that goes away (closed, or dropped by keepalive) leaves
  the tracker's queue: the tracker protocol cannot withdraw one PUT, so the
  tracker connection is reset (at most once per ``withdraw_delay``) and every
  server still waiting is PUT again under a fresh key.
- With a board secret, every tracker connection proves it (as ``proxy``)
  before anything is sent, and for each key before its PUT.
- Nothing blocks: all tracker calls are Deferreds on one connection that
  ``ClientService`` re-establishes with backoff.
- The registrar hears of servers only while it runs (it subscribes to the
  switchboard in ``startService`` and unsubscribes in ``stopService``).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import sockopts
from ..client import TrackerClientProtocol, TrackerError, TrackerLink
from ..codec import encode_frame, split_matchkey
from .leg import address_text
from .switchboard import IServerWatcher, Switchboard

log = Logger()


@implementer(IServerWatcher)
@attrs.define(slots=False, eq=False, repr=False)
class Registrar(service.Service):
    """Registers the proxy's waiting servers at a tracker (``--tracker``).

    It watches ``switchboard`` while it runs: subscribed in
    :meth:`startService`, unsubscribed in :meth:`stopService`.
    """

    name = "tvm-proxy tracker registrar"

    reactor: Any
    switchboard: Switchboard
    tracker: Any  # (host, port) or a client endpoint description (tvmrpc.outgoing)
    #: Fires with the proxy's listening port: its number is what we PUT.
    bound: defer.Deferred[IListeningPort]
    custom_addr: str | None = None
    period: float = 2.0
    grace: float = 5.0
    #: With a secret, the link proves it as ``proxy`` and for each PUT key.
    board_secret: bytes | None = None
    keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE
    #: Seconds between a waiting server's departure and the link reset that withdraws it.
    withdraw_delay: float = attrs.field(default=0.2, init=False)
    port: int | None = attrs.field(default=None, init=False)
    #: The device keys the current tracker connection was last told about.
    advertised: frozenset[str] = attrs.field(default=frozenset(), init=False)
    #: True once the tracker refused our key list: advertise ``server:proxy`` only.
    compact: bool = attrs.field(default=False, init=False)
    link: TrackerClientProtocol | None = attrs.field(default=None, init=False)
    _client: TrackerLink | None = attrs.field(default=None, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _reset_call: IDelayedCall | None = attrs.field(default=None, init=False)
    _reset_link_obj: TrackerClientProtocol | None = attrs.field(default=None, init=False)
    _loss_seen_on: TrackerClientProtocol | None = attrs.field(default=None, init=False)

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self.switchboard.subscribe(self)
        log.info(
            "registering waiting servers at tracker {host}:{port}",
            host=self.tracker[0],
            port=self.tracker[1],
        )
        self.bound.addCallback(self._start)

    def _start(self, port: IListeningPort) -> IListeningPort:
        self.port = port.getHost().port  # type: ignore[attr-defined]  # IAddress: TCP ports have one
        if not self.running:
            return port
        self._client = TrackerLink(
            self.reactor,
            self.tracker,
            self._ready,
            self._lost,
            initial_delay=0.5,
            board_secret=self.board_secret,
            board_key="proxy",
            keepalive=self.keepalive,
        )
        self._client.startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(self.period, now=False)
        return port

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        self.switchboard.unsubscribe(self)
        if self._reset_call is not None and self._reset_call.active():
            self._reset_call.cancel()
        self._reset_call = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._client is not None:
            d: defer.Deferred[None] = self._client.stopService()
            return d
        return None

    # -- connection -------------------------------------------------------------

    def _ready(self, link: TrackerClientProtocol) -> TrackerClientProtocol:
        self.link = link
        log.info("connected to tracker {tracker}", tracker=address_text(link.transport))
        table = self.switchboard.table
        new_keys = table.rekey_all()
        self._update_info(link)
        for matchkey in new_keys:
            self._put(link, matchkey)
        return link

    def _lost(self, link: TrackerClientProtocol) -> None:
        if self.link is link:
            self.link = None
            log.info("lost the tracker connection; reconnecting")

    # -- registration -----------------------------------------------------------

    def server_waiting(self, device_key: str, matchkey: str) -> None:
        """IServerWatcher: PUT the new server (and tell a new device key first)."""
        link = self.link
        if link is None:
            return  # registered with everything else once connected
        if device_key not in self.advertised:
            self._update_info(link)
        self._put(link, matchkey)

    def server_gone(self, matchkey: str) -> None:
        """IServerWatcher: reset the link so that the tracker forgets the departed server."""
        if self.link is None or self._reset_call is not None:
            return  # re-registered from scratch on the next connection anyway
        log.debug("server {matchkey} left; re-registering to withdraw it", matchkey=matchkey)
        self._reset_call = self.reactor.callLater(self.withdraw_delay, self._reset_link)

    def _reset_link(self) -> None:
        self._reset_call = None
        link = self.link
        if link is not None and link.transport is not None:
            self._reset_link_obj = link
            link.transport.loseConnection()

    def info(self) -> dict[str, Any]:
        """The UPDATE_INFO value: ``server:proxy[k1,k2]`` at our address and port."""
        if self.compact:
            key = "server:proxy"
        else:
            key = "server:proxy[{}]".format(",".join(sorted(self.switchboard.device_keys.keys())))
        return {"key": key, "addr": [self.custom_addr, self.port]}

    def _update_info(self, link: TrackerClientProtocol) -> None:
        self.advertised = keys = self.switchboard.device_keys.keys()
        info = self.info()
        d = link.update_info(info)
        d.addCallback(
            lambda _: log.info(
                "tracker took UPDATE_INFO: {n} device keys ({size} bytes)",
                n=len(keys),
                size=len(encode_frame([5, info])),
            )
        )
        d.addErrback(self._info_failed, link, info)

    def _sync_info(self, link: TrackerClientProtocol) -> None:
        """Tell the tracker about keys that left (new ones are told at once).

        Not while the link is about to be reset: the next one is told anyway.
        """
        if self._reset_call is None and self.switchboard.device_keys.keys() != self.advertised:
            self._update_info(link)

    def _info_failed(
        self, failure: Failure, link: TrackerClientProtocol, info: dict[str, Any]
    ) -> None:
        lost = self._lost_in_flight(failure, link)
        if self.compact or not (failure.check(TrackerError) or lost):
            self._call_failed(failure, "UPDATE_INFO")
            return
        self.compact = True
        log.warn(
            "tracker refused our UPDATE_INFO ({n} device keys, {size} bytes): {error}; "
            "advertising plain 'server:proxy' from now on so that registration goes on "
            "(lower --max-server-keys, or restart the proxy to send the key list again)",
            n=len(self.advertised),
            size=len(encode_frame([5, info])),
            error=failure.getErrorMessage() if not lost else "it closed the connection",
        )

    def _lost_in_flight(self, failure: Failure, link: TrackerClientProtocol) -> bool:
        """Whether ``failure`` is the connection closing under the call in flight.

        A closing connection fails the call in flight first, then the queued
        ones; only the first is blamed, and never when we reset the link.
        """
        if not failure.check(ConnectionDone, ConnectionLost):
            return False
        first = self._loss_seen_on is not link
        self._loss_seen_on = link
        return first and self._reset_link_obj is not link

    def _put(self, link: TrackerClientProtocol, matchkey: str) -> None:
        assert self.port is not None
        key = split_matchkey(matchkey)
        if self.board_secret is not None:  # queued before the PUT (see the client)
            link.authenticate(self.board_secret, key).addErrback(self._call_failed, "board proof")
        d = link.put(key, self.port, matchkey, self.custom_addr)
        d.addCallback(lambda _: log.debug("put {matchkey} at the tracker", matchkey=matchkey))
        d.addErrback(self._put_failed, link)

    def _put_failed(self, failure: Failure, link: TrackerClientProtocol) -> None:
        self._lost_in_flight(failure, link)
        self._call_failed(failure, "PUT")

    def _call_failed(self, failure: Failure, what: str) -> None:
        # A lost connection is handled by the reconnect; anything else is logged.
        log.info("tracker {what} failed: {error}", what=what, error=failure.getErrorMessage())

    # -- periodic check -----------------------------------------------------------

    def _check(self) -> defer.Deferred[Any] | None:
        link = self.link
        if link is None:
            return None
        self._sync_info(link)
        if not self.switchboard.table.waiting("server"):
            return None
        d = link.pending_matchkeys()
        d.addCallback(self._regenerate, link)
        d.addErrback(self._pending_failed, link)
        return d

    def _pending_failed(self, failure: Failure, link: TrackerClientProtocol) -> None:
        self._lost_in_flight(failure, link)
        self._call_failed(failure, "GET_PENDING_MATCHKEYS")

    def _regenerate(self, pending: list[str], link: TrackerClientProtocol) -> None:
        table = self.switchboard.table
        stale = table.stale_server_keys(pending, self.reactor.seconds(), self.grace)
        if stale:
            log.debug("keys handed out but unused, regenerating: {keys}", keys=stale)
        for old in stale:
            if link is self.link:
                self._put(link, table.rekey(old))
