"""The switchboard: applies the pairing table to live legs, with timers.

A *leg* is one connection that finished its handshake (TCP or WebSocket).
The switchboard decides its fate and tells it through :class:`ILeg`.

Invariants:
- Every leg handed to :meth:`Switchboard.arrive` ends in exactly one of:
  paired (``pair`` called on both legs), refused (``refuse`` called once),
  or withdrawn because it closed (``leave``).
- A waiting leg has a timer exactly when it has a deadline; the timer is
  cancelled when the leg stops waiting for any reason.
- In tracker mode servers wait without deadline under fresh match keys
  (as stock does: the tracker hands their keys to clients); clients never
  wait, a client without a waiting server is refused with no-match.
- A leg whose match key (or, in tracker mode, the match key the proxy makes
  for it) is not a valid key (:func:`tvmrpc.codec.key_problem`) is refused
  with no-match and a warn line saying why; it never enters the table.
- In tracker mode at most ``device_keys.limit`` distinct device keys are
  held by servers present (waiting or in a session); a server bringing a
  new key beyond that is refused with no-match and a warn line. A key is
  released when its last server closes, so the advertised set shrinks.
- Bytes a leg sends before it is paired are bounded by :attr:`early`
  (per leg and in total); they are released when it is paired or closes.
- In tracker mode every subscribed :class:`IServerWatcher` is told when a
  server starts waiting and when a waiting server goes away, in that order
  for any one server; a watcher hears nothing after it unsubscribed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from ..codec import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH, PeerKey, key_problem
from ..ratelimit import RateLimit
from ..status.hooks import NULL_PROXY
from .limits import Admission, DeviceKeys, EarlyBudget
from .pairing import SERVER, Duplicate, NoMatch, Paired, PairingTable, Waiting

log = Logger()


class ILeg(Interface):
    """One side of a pairing, as the switchboard sees it."""

    key = Attribute("The full handshake key string as received (options included).")
    peer_name = Attribute("A short description of the remote end, for logs.")
    forwarding = Attribute("How the leg's bytes are forwarded once started (for logs).")

    def pair(peer: ILeg) -> None:  # noqa: N805 - zope interface method
        """Answer success with ``peer.key`` and start forwarding to ``peer``."""

    def start() -> None:
        """Both sides are answered: begin forwarding (called after ``pair`` on both)."""

    def refuse(code: int) -> None:  # noqa: N805
        """Answer ``code`` (duplicate or no-match) and close."""


class IServerWatcher(Interface):
    """Told about servers waiting at the proxy (tracker mode): the registrar."""

    def server_waiting(device_key: str, matchkey: str) -> None:  # noqa: N805
        """A server with ``device_key`` started waiting under ``matchkey``."""

    def server_gone(matchkey: str) -> None:  # noqa: N805
        """The server waiting under ``matchkey`` went away before it was paired."""


class Switchboard:
    """Pairs legs by key; in tracker mode tells a registrar about waiting servers."""

    def __init__(
        self,
        clock: IReactorTime,
        timeout_client: float | None = 600.0,
        timeout_server: float | None = 600.0,
        tracker_mode: bool = False,
        verbose: bool = False,
        early: EarlyBudget | None = None,
        device_keys: DeviceKeys | None = None,
    ) -> None:
        self.clock = clock
        #: Log every wait and pairing (a log line costs about as much as the pairing itself).
        self.verbose = verbose
        self.timeouts = {"client": timeout_client, "server": timeout_server}
        self.tracker_mode = tracker_mode
        self.table: PairingTable[Any] = PairingTable()
        self._timers: dict[Any, IDelayedCall] = {}
        #: Told of servers that wait and go (tracker mode); see :meth:`subscribe`.
        self._watchers: list[IServerWatcher] = []
        self.pairings = 0
        #: Told of pairings, their end and wait timeouts (tvmrpc.status).
        self.observer: Any = NULL_PROXY
        #: Bytes held for legs before pairing (bounded per leg and in total).
        self.early = early if early is not None else EarlyBudget()
        #: Device keys of the servers present, bounded (tracker mode only).
        self.device_keys = device_keys if device_keys is not None else DeviceKeys()
        #: With a secret, ``server:`` legs prove it before they wait (docs/security.md).
        self.board_secret: bytes | None = None
        #: Networks whose servers need no proof (--allow-board-from).
        self.allow_board_from: tuple[Any, ...] = ()
        #: Board registration needs a proof, or a client certificate (mtls:); set by the service.
        self.board_auth: bool | None = None
        #: Refused registrations are logged at most once a minute (a stock board retries).
        self.board_refusals = RateLimit(60.0)

    def subscribe(self, watcher: IServerWatcher) -> None:
        """Tell ``watcher`` of servers that start waiting or go away, from now on."""
        if watcher not in self._watchers:
            self._watchers.append(watcher)

    def unsubscribe(self, watcher: IServerWatcher) -> None:
        """Stop telling ``watcher`` (idempotent)."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def _verbose(self, fmt: str, **fields: Any) -> None:
        """A per-connection line (debug), only with ``--verbose``: it costs about a pairing."""
        if self.verbose:
            log.debug(fmt, **fields)

    def arrive(self, leg: ILeg, key: PeerKey, matchkey: str) -> None:
        """A leg finished its handshake as ``key.role`` with proxy match key ``matchkey``."""
        now = self.clock.seconds()
        timeout = self.timeouts[key.role]
        may_wait = True
        device_key = matchkey
        problem = key_problem(matchkey, f"{key.role} key")
        if problem is None and self.tracker_mode:
            if key.role == SERVER:
                matchkey = self.table.fresh_server_key(matchkey)
                problem = key_problem(matchkey, "server key with the ':<random>' suffix")
                timeout = None
            else:
                may_wait = False
        if problem is not None:
            log.warn("refused {leg}: {problem}", leg=leg.peer_name, problem=problem)
            leg.refuse(RPC_CODE_MISMATCH)
            return
        if (
            self.tracker_mode
            and key.role == SERVER
            and self.device_keys.admit(leg, device_key) is Admission.FULL
        ):
            log.warn(
                "refused {leg}: server key {key} would be device key number {n} "
                "(at most {limit}, --max-server-keys)",
                leg=leg.peer_name,
                key=device_key[:40],
                n=len(self.device_keys) + 1,
                limit=self.device_keys.limit,
            )
            leg.refuse(RPC_CODE_MISMATCH)
            return
        if timeout is not None and timeout <= 0:
            timeout = None
        outcome = self.table.arrive(leg, key.role, matchkey, now, timeout, may_wait)
        if isinstance(outcome, Paired):
            peer = outcome.peer
            self._cancel_timer(peer)
            self.pairings += 1
            a, b = leg.peer_name, peer.peer_name
            self._verbose("paired {a} with {b} on {matchkey}", a=a, b=b, matchkey=matchkey)
            self.observer.paired(leg, peer)
            leg.pair(peer)
            peer.pair(leg)
            leg.start()
            peer.start()
            if self.verbose:  # ``forwarding`` is asked only when it is logged
                self._verbose("forwarding {a} and {b} by {path}", a=a, b=b, path=leg.forwarding)
        elif isinstance(outcome, Waiting):
            self._verbose(
                "{leg} waits as {role} {matchkey}",
                leg=leg.peer_name,
                role=key.role,
                matchkey=matchkey,
            )
            if outcome.deadline is not None:
                self._timers[leg] = self.clock.callLater(outcome.deadline - now, self._expire)
            if self.tracker_mode and key.role == SERVER:
                for watcher in list(self._watchers):
                    watcher.server_waiting(device_key, matchkey)
        elif isinstance(outcome, Duplicate):
            log.debug(
                "duplicate {role} key {matchkey} from {leg}",
                role=key.role,
                matchkey=matchkey,
                leg=leg.peer_name,
            )
            leg.refuse(RPC_CODE_DUPLICATE)
        elif isinstance(outcome, NoMatch):
            log.debug(
                "no server waits for client key {matchkey} from {leg}",
                matchkey=matchkey,
                leg=leg.peer_name,
            )
            leg.refuse(RPC_CODE_MISMATCH)

    def leave(self, leg: ILeg) -> None:
        """A leg closed; if it was waiting, forget it (and tell the registrar of a server)."""
        self._cancel_timer(leg)
        server_key = self.table.matchkey_of(leg)
        if server_key is not None and self.table.waiting(SERVER).get(server_key) is not leg:
            server_key = None
        self.table.withdraw(leg)
        self.early.release(leg)
        self.device_keys.release(leg)
        if server_key is not None and self.tracker_mode:
            for watcher in list(self._watchers):
                watcher.server_gone(server_key)

    def _expire(self) -> None:
        for leg in self.table.expire(self.clock.seconds()):
            self._timers.pop(leg, None)
            self.observer.timed_out(leg)
            log.debug("{leg} waited too long for a peer", leg=leg.peer_name)
            leg.refuse(RPC_CODE_MISMATCH)

    def _cancel_timer(self, leg: ILeg) -> None:
        timer = self._timers.pop(leg, None)
        if timer is not None and timer.active():
            timer.cancel()
