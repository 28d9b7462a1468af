"""The tracker's wire protocol: one :class:`TrackerProtocol` per connection.

Invariants:
- Every request frame gets exactly one reply, written with one ``write``;
  a REQUEST's reply is written when a resource is assigned.
- Bad input (wrong magic, bad frame, invalid request) is logged with the peer
  and closes that connection only; what it had queued or PUT is dropped, and
  nothing belonging to another connection is touched. A well-formed request
  with a bad key or a bad UPDATE_INFO value is refused with
  ``[FAIL, reason]`` (logged at warn with the peer, at most once a minute
  per connection with a count of the others); the connection stays.
- A connection that does not send the tracker magic within the handshake
  timeout is closed. One timer serves every connection still greeting
  (:class:`~.deadlines.Deadlines`), none is kept per connection.
- A connection's life is its :class:`Phase`: GREETING, then SERVING, then
  CLOSED (or STOPPING, after an accepted STOP: the tracker stops once that
  connection is gone). Only the transitions in :data:`TRANSITIONS` happen;
  any other raises :class:`PhaseError`. Frames are handled only while SERVING.
- Flow control: each connection is a streaming producer on its transport.
  While its unsent replies exceed the transport's buffer (64 KiB), it reads
  nothing and handles none of the frames it already received; at most
  ``frames_per_turn`` frames are handled before other connections get a turn
  of the reactor. So one peer's burst costs the others at most one turn, and
  its replies never pile up in memory.
- A connection has at most :data:`MAX_WAITING_REQUESTS` requests waiting;
  one more is refused.
- A closed connection's queued requests, free resources and unhandled frames
  leave at once.
- With a board secret, a PUT whose key, or an UPDATE_INFO with a ``server``
  key, that the connection has not proved the secret for (BOARD_CHALLENGE,
  then BOARD_AUTH: docs/security.md) is refused with ``[FAIL, reason]``,
  logged at warn with the peer and counted; it never reaches the queue.
  Peers in an ``allow_board_from`` network, and connections whose client
  certificate verified at an ``mtls:`` port (:mod:`tvmrpc.boardtls`), need
  no proof; ``board_auth`` without a secret asks for one of those. Each connection
  gets its own nonce, so a recorded proof fails on any other connection.
- SUMMARY is encoded once per change of state and the same bytes are sent to
  every asker until the state changes again. Its two parts are cached apart:
  the server list (every board's info: the bulk at scale) is encoded again
  only when some connection's info changes, the queue counts whenever the
  scheduler's state changes; the frame is the two joined, byte for byte what
  ``json.dumps`` makes of the whole.
- Logging: a board joining or leaving (UPDATE_INFO with a ``server`` key,
  its connection closing), STOP and quarantine are info; refusals and bad
  input warn; per-request events (``--verbose``: PUT, REQUEST, assignment)
  and closing a connection that never greeted are debug.
- Memory: a connection's state is a fixed set of slots (no instance dict),
  and containers it may never need (board keys, refusal counter, decoder
  buffer) are made on first use: at 10,000 boards every byte here counts
  10,000 times (docs/tracker.md, "At scale").
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import boardauth, boardtls, sockopts
from ..codec.constants import MAX_FRAME_BYTES, TRACKER_MAGIC, TrackerCode
from ..codec.errors import CodecError
from ..codec.frames import NO_FRAME, FrameDecoder, MagicDecoder, encode_frame, encode_int32
from ..listening import Network, address_in
from ..ratelimit import RateLimit
from ..status.hooks import NULL_TRACKER
from ..status.refusals import REFUSED
from . import commands as cmd
from .boards import BoardState
from .deadlines import Deadlines
from .estimates import HoldTracker, WaitEstimator
from .scheduler import Assignment, Scheduler, board_name

log = Logger()

#: Seconds a new connection may take to send the tracker magic.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Frames handled for one connection before the reactor serves the others.
FRAMES_PER_TURN = 128
#: Requests one connection may have waiting at once (a stock client has one).
MAX_WAITING_REQUESTS = 1024
#: Seconds between two warnings about refused requests of one connection.
REFUSAL_LOG_INTERVAL = 60.0
_NO_SECRET = "this tracker has no --board-secret-file"


class Phase(enum.Enum):
    """Where a tracker connection is in its life."""

    GREETING = "waiting for the tracker magic"
    SERVING = "serving requests"
    STOPPING = "closing after an accepted STOP"
    CLOSED = "closing or closed"


#: The phase changes that can happen; anything else is a bug (:class:`PhaseError`).
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.GREETING: frozenset({Phase.SERVING, Phase.CLOSED}),
    Phase.SERVING: frozenset({Phase.STOPPING, Phase.CLOSED}),
    Phase.STOPPING: frozenset({Phase.STOPPING}),  # the transport reporting the close
    Phase.CLOSED: frozenset({Phase.CLOSED}),
}


class PhaseError(RuntimeError):
    """An event that cannot happen in the connection's current phase."""


# Module-level names for the per-frame checks: an enum class attribute costs
# ten times a global lookup, and the tracker checks the phase on every read.
_GREETING, _SERVING, _STOPPING, _CLOSED = (
    Phase.GREETING,
    Phase.SERVING,
    Phase.STOPPING,
    Phase.CLOSED,
)
#: The decoder of a connection not made yet (holds nothing; ``clear`` is harmless).
_NO_DECODER = FrameDecoder()


class ITrackerTransport(ITCPTransport, IConsumer, IPushProducer):
    """What the tracker needs of its transport: TCP, a consumer of its replies
    (it registers itself as their producer) and a producer of its requests."""


@implementer(IPushProducer)
class TrackerProtocol(Protocol):
    """Serves one tracker connection (a server, a proxy or a client)."""

    __slots__ = (
        "_board_keys",
        "_decoder",
        "_greeting",
        "_nonce",
        "_reading_paused",
        "_refusals",
        "_turn",
        "_write_paused",
        "board_trusted",
        "connected",
        "factory",
        "info",
        "peer_host",
        "phase",
        "transport",
    )

    factory: TrackerFactory
    transport: ITrackerTransport

    def __init__(self) -> None:
        self.connected = 0
        self.info: dict[str, Any] = {}
        self.peer_host = "?"
        self.phase = _GREETING
        self._greeting: MagicDecoder | None = MagicDecoder()  # dropped once greeted
        self._decoder = _NO_DECODER  # its own from connectionMade
        self._write_paused = False  # the transport's write buffer is over its bound
        self._reading_paused = False  # we told the transport to stop reading
        self._turn: Any = None  # DelayedCall that continues a backlog
        self._refusals: RateLimit | None = None
        #: Registration needs no proof (no secret, or an --allow-board-from peer).
        self.board_trusted = True
        self._nonce: str | None = None
        self._board_keys: set[str] | None = None  # keys proved with the board secret

    def __repr__(self) -> str:
        return f"<tracker connection {self.peer_host} {self.info.get('key', '')}>"

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise PhaseError(f"{self!r}: cannot go from {self.phase.name} to {phase.name}")
        self.phase = phase

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        self.peer_host = str(getattr(peer, "host", peer))
        if factory.board_auth:
            self.board_trusted = address_in(self.peer_host, factory.allow_board_from)
        self._decoder = FrameDecoder(factory.max_frame_bytes)
        sockopts.set_nodelay(self.transport)
        sockopts.set_keepalive(self.transport, factory.keepalive)
        factory.connections[self] = None
        factory.observer.connected(self)
        self.transport.registerProducer(self, True)
        factory.greeting.add(self)

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is _SERVING:
            sockopts.quickack(self.transport)
        elif phase is _GREETING:
            sockopts.quickack(self.transport)
            greeting = self._greeting.feed(data)  # type: ignore[union-attr]  # set until greeted
            if greeting is None:
                return
            magic, data = greeting
            if not self._greeted(magic):
                return
        else:
            return
        self._decoder.append(data)
        self._serve()

    def _greeted(self, magic: int) -> bool:
        """The magic arrived: serve if it is the tracker's, else close."""
        self._greeting = None
        self.factory.greeting.discard(self)
        if magic != TRACKER_MAGIC:
            self._reject(f"bad tracker magic {magic:#x}")
            return False
        self._enter(_SERVING)
        self.transport.write(encode_int32(TRACKER_MAGIC))
        if not self.board_trusted:  # data came through TLS: a client certificate is known
            who = f"tracker connection from {self.peer_host}"
            self.board_trusted = boardtls.admitted(self.transport, who)
        return True

    def connectionLost(self, reason: Failure | None = None) -> None:
        stopping = self.phase is _STOPPING
        self._shut(_STOPPING if stopping else _CLOSED)
        factory = self.factory
        factory.forget(self)
        factory.observer.disconnected(self)
        key = self.info.get("key", "")
        if key.startswith("server"):
            log.info("{key} at {host} disconnected", key=key, host=self.peer_host)
        if stopping:
            factory.on_stop()

    # -- IPushProducer (called by the transport) --------------------------------

    def pauseProducing(self) -> None:
        """The peer's unsent replies exceed the bound: stop reading and handling."""
        self._write_paused = True
        self._pause_reading()

    def resumeProducing(self) -> None:
        """The peer took its replies: handle what is buffered, then read again."""
        self._write_paused = False
        if self._turn is None:
            self._serve()

    def stopProducing(self) -> None:
        """The transport is gone: drop every frame not handled yet."""
        self._shut(_STOPPING if self.phase is _STOPPING else _CLOSED)

    # -- flow control ----------------------------------------------------------

    def _serve(self) -> None:
        """Handle buffered frames until none is left, replies back up or the turn ends."""
        budget = self.factory.frames_per_turn
        pop = self._decoder.pop
        while self.phase is _SERVING and not self._write_paused:
            if budget == 0:
                self._pause_reading()
                self._turn = self.factory.clock.callLater(0, self._next_turn)
                return
            try:
                frame = pop()
            except CodecError as exc:
                self._reject(str(exc))
                return
            if frame is NO_FRAME:
                if self._reading_paused:
                    self._resume_reading()
                return
            budget -= 1
            try:
                command = cmd.parse_command(frame)
            except cmd.RefusedError as exc:
                self._refuse(str(exc))
                continue
            except cmd.CommandError as exc:
                self._reject(str(exc))
                return
            self._handle(command)

    def _next_turn(self) -> None:
        self._turn = None
        self._serve()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.phase is not _CLOSED:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    # -- requests -------------------------------------------------------------

    def _handle(self, command: cmd.Command) -> None:
        """One handler per command (the commonest first)."""
        match command:
            case cmd.RequestResource():
                self._request(command)
            case cmd.Put():
                self._put(command)
            case cmd.Ping():
                self.reply(TrackerCode.SUCCESS)
            case cmd.GetPendingMatchkeys():
                self.reply(self.factory.scheduler.pending_matchkeys(self))
            case cmd.Summary(extended=True):  # expected waits change with time: never cached
                self.reply([TrackerCode.SUCCESS, self.factory.summary(extended=True)])
            case cmd.Summary():
                self.transport.write(self.factory.summary_frame())
            case cmd.UpdateInfo():
                self._update_info(command)
            case cmd.BoardChallenge():
                self._board_challenge()
            case cmd.BoardAuth():
                self._board_auth(command)
            case cmd.Stop():
                self._stop(command)

    def _request(self, command: cmd.RequestResource) -> None:
        factory = self.factory
        if factory.scheduler.waiting_requests(self) >= MAX_WAITING_REQUESTS:
            self._refuse(
                f"this connection already has {MAX_WAITING_REQUESTS} requests waiting "
                f"(at most {MAX_WAITING_REQUESTS}; stock clients wait for each answer)"
            )
            return
        factory.trace(
            "{host} requests {key} (priority {priority})",
            host=self.peer_host,
            key=command.key,
            priority=command.priority,
        )
        request, assignments = factory.scheduler.request(
            command.key, command.user, command.priority, self, host=self.peer_host
        )
        factory.observer.requested(request)
        factory.deliver(assignments)

    def _put(self, command: cmd.Put) -> None:
        factory = self.factory
        if not self.board_trusted and command.key not in (self._board_keys or ()):
            self._refuse_board(f"PUT {command.key}")
            return
        addr = command.custom_addr if command.custom_addr is not None else self.peer_host
        factory.trace(
            "{host} put {matchkey} under {key} at {addr}",
            host=self.peer_host,
            matchkey=command.matchkey,
            key=command.key,
            addr=board_name(addr, command.port),
        )
        factory.board_free_again(self)
        assignments = factory.scheduler.put(command.key, addr, command.port, command.matchkey, self)
        factory.observer.put(self, command.key, command.matchkey, addr, command.port)
        self.reply(TrackerCode.SUCCESS)
        factory.deliver(assignments)

    def _update_info(self, command: cmd.UpdateInfo) -> None:
        factory = self.factory
        info = command.info  # cleaned and made for this request: ours to keep
        registers = str(info.get("key", "")).startswith("server")
        if registers and not self.board_trusted and not self._board_keys:
            self._refuse_board(f"UPDATE_INFO {info['key']}")
            return
        addr = info.get("addr")
        if addr is not None and addr[0] is None:
            addr[0] = self.peer_host
        if self.info:
            self.info.update(info)
        else:
            self.info = info
        factory.info_changed()
        factory.observer.info_updated(self, info)
        if registers:
            log.info("{key} registered from {host}", key=info["key"], host=self.peer_host)
        self.reply(TrackerCode.SUCCESS)
        factory.server_report(self)

    def _board_challenge(self) -> None:
        if self.factory.board_secret is None:
            self.reply([TrackerCode.FAIL, _NO_SECRET])
            return
        if self._nonce is None:
            self._nonce = boardauth.new_nonce()
        self.reply([TrackerCode.SUCCESS, self._nonce])

    def _board_auth(self, command: cmd.BoardAuth) -> None:
        secret = self.factory.board_secret
        if secret is None:
            self.reply([TrackerCode.FAIL, _NO_SECRET])
        elif boardauth.verify(
            secret, boardauth.LABEL_TRACKER, self._nonce, command.key, command.proof
        ):
            if self._board_keys is None:
                self._board_keys = set()
            self._board_keys.add(command.key)
            self.reply(TrackerCode.SUCCESS)
        else:
            REFUSED.add("board auth")
            self._refuse(
                f"bad board proof for {command.key} (a wrong --board-secret-file, "
                "or a proof not made for this connection's nonce)"
            )

    def _stop(self, command: cmd.Stop) -> None:
        stop_key = self.factory.stop_key
        if stop_key is not None and command.stop_key == stop_key:
            log.info("stop requested by {host}", host=self.peer_host)
            self.reply(TrackerCode.SUCCESS)
            self._close(_STOPPING)
        else:
            log.warn("refused STOP from {host}: wrong or no stop key", host=self.peer_host)
            self.reply(TrackerCode.FAIL)

    def reply(self, value: Any) -> None:
        """Write one reply frame."""
        self.transport.write(encode_frame(value))

    # -- endings --------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        """Answer a well-formed but unacceptable request; the connection stays.

        Logged the first time, then at most once a minute per connection with
        the count held back, so a peer repeating a bad request cannot flood
        the log.
        """
        if self._refusals is None:
            self._refusals = RateLimit(REFUSAL_LOG_INTERVAL)
        held = self._refusals.event(self.factory.clock.seconds())
        if held is not None:
            more = f" ({held} more refused from this connection since the last report)"
            log.warn(
                "refused a request from {host}: {reason}{more}",
                host=self.peer_host,
                reason=reason,
                more=more if held else "",
            )
        self.reply([TrackerCode.FAIL, reason])

    def _refuse_board(self, what: str) -> None:
        REFUSED.add("board auth")
        self._refuse(
            f"{what}: board registration needs the board secret (--board-secret-file "
            "on the registering server or proxy), or a peer in --allow-board-from, or a "
            "client certificate at an mtls: port"
        )

    def handshake_timed_out(self) -> None:
        """No tracker magic within the handshake timeout (called by the factory)."""
        log.debug(
            "closing tracker connection from {host}: no tracker magic within {timeout:g} s",
            host=self.peer_host,
            timeout=self.factory.handshake_timeout,
        )
        self._close()

    def _reject(self, reason: str) -> None:
        log.warn(
            "closing tracker connection from {host}: {reason}", host=self.peer_host, reason=reason
        )
        self.factory.observer.bad_frame(self, reason)
        self._close()

    def _close(self, phase: Phase = _CLOSED) -> None:
        """Stop serving, drop this connection's state and close it after its replies."""
        self._shut(phase)
        self.factory.forget(self)
        # A transport with a registered producer never closes: unregister first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _shut(self, phase: Phase) -> None:
        """Enter ``phase`` (CLOSED or STOPPING): no more frames, no timers, no buffers."""
        self._enter(phase)
        self.factory.greeting.discard(self)
        self._greeting = None
        if self._turn is not None:
            if self._turn.active():
                self._turn.cancel()
            self._turn = None
        self._decoder.clear()


def _handshake_timed_out(conn: TrackerProtocol) -> None:
    conn.handshake_timed_out()


@attrs.define(kw_only=True, eq=False, slots=False, on_setattr=attrs.setters.NO_OP)
class TrackerFactory(Factory[TrackerProtocol]):
    """Holds the tracker's state: the scheduler and the live connections."""

    protocol = TrackerProtocol

    #: The reactor's time and timers (a ``task.Clock`` in tests).
    clock: IReactorTime
    stop_key: str | None = None
    on_stop: Callable[[], None] = lambda: None
    max_frame_bytes: int = MAX_FRAME_BYTES
    verbose: bool = False
    scheduler: Scheduler = attrs.Factory(Scheduler)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    frames_per_turn: int = FRAMES_PER_TURN
    #: Told of connections, requests, PUTs, assignments and registrations (tvmrpc.status).
    observer: Any = NULL_TRACKER
    #: With a secret, board registration needs a proof (docs/security.md).
    board_secret: bytes | None = None
    allow_board_from: tuple[Network, ...] = attrs.field(default=(), converter=tuple)
    keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE
    #: Registration needs a proof: the secret's, a client certificate (mtls:) or
    #: an --allow-board-from address (default, ``None``: with a secret).
    board_auth: bool | None = None

    holds: HoldTracker = attrs.field(init=False, factory=HoldTracker)
    waits: WaitEstimator = attrs.field(init=False, factory=WaitEstimator)
    connections: dict[TrackerProtocol, None] = attrs.field(init=False, factory=dict)
    #: Connections that have not sent the tracker magic yet, on one timer.
    greeting: Deadlines = attrs.field(init=False)
    _info_generation: int = attrs.field(init=False, default=0)
    _summary_cache: tuple[tuple[int, int], bytes] | None = attrs.field(init=False, default=None)
    _servers_span: tuple[int, int] = attrs.field(init=False, default=(0, 0))

    def __attrs_post_init__(self) -> None:
        if self.board_auth is None:
            self.board_auth = self.board_secret is not None
        self.greeting = Deadlines(self.clock, self.handshake_timeout, _handshake_timed_out)
        # A key that leaves the tracker takes its hold-time statistics with it.
        self.scheduler.on_forget = self.waits.forget

    def doStop(self) -> None:
        """The last port closed: no handshake timer outlives it."""
        super().doStop()
        self.greeting.stop()

    def trace(self, format: str, **fields: object) -> None:
        """Log one per-request event at debug, with ``--verbose`` only."""
        if self.verbose:
            log.debug(format, **fields)

    def forget(self, conn: TrackerProtocol) -> None:
        """Drop a connection's requests and resources (idempotent)."""
        if self.connections.pop(conn, False) is not False:
            self.scheduler.drop_owner(conn)
            self.board_free_again(conn)
            if conn.info:
                self.info_changed()

    def info_changed(self) -> None:
        """A connection's info changed: SUMMARY must be encoded again."""
        self._info_generation += 1

    def board_free_again(self, conn: TrackerProtocol) -> None:
        """``conn``'s board is free again (it PUT) or gone: its hold, if any, ended."""
        ended = self.holds.end(conn, self.clock.seconds())
        if ended is not None:
            hold, seconds = ended
            self.waits.record(hold.key, seconds)

    def server_report(self, conn: TrackerProtocol) -> None:
        """Count the session outcomes and health checks our servers report."""
        report = conn.info.get("tvmrpc")
        addr = conn.info.get("addr")
        if report is None or not (isinstance(addr, list) and len(addr) == 2):
            return
        board = board_name(str(addr[0]), addr[1])
        rules = self.scheduler.rules
        was = rules.state("", board)
        counted = rules.report(board, report)
        now = rules.state("", board)
        if counted and now is not was:
            if now is BoardState.QUARANTINED:
                log.warn(
                    "board {board} quarantined after {n} failed sessions in a row ({failures}); "
                    "it returns after a passing health check or `tvmrpc resume`",
                    board=board,
                    n=rules.quarantine_after,
                    failures=", ".join(rules.failures(board)),
                )
            elif was is BoardState.QUARANTINED:
                log.info("board {board} passed its health check: back in service", board=board)
            # Free counts changed either way; a board back in service may serve at once.
            self.deliver(self.scheduler.rematch())

    def expected_waits(self) -> dict[str, float | None]:
        """Each key's expected wait for a request joining the back of its queue now."""
        waits = {}
        for key, queue in self.scheduler.queue_info().items():
            busy = self.holds.busy(key)
            waits[key] = self.waits.expected_wait(key, queue["pending"], queue["free"], busy)
        return waits

    def deliver(self, assignments: list[Assignment]) -> None:
        """Send each assigned resource to the connection that requested it."""
        now = self.clock.seconds()
        for assignment in assignments:
            conn: TrackerProtocol = assignment.request.owner  # type: ignore[assignment]
            resource = assignment.resource
            self.holds.start(resource.owner, resource.key, resource.board, now)
            self.observer.assigned(assignment)
            self.trace(
                "assigned {matchkey} to {host}", matchkey=resource.matchkey, host=conn.peer_host
            )
            conn.reply([TrackerCode.SUCCESS, resource.value()])

    def summary(self, extended: bool = False) -> dict[str, Any]:
        """The SUMMARY payload, shaped exactly as stock's.

        ``extended`` (asked for by ``[6, {"tvmrpc": 1}]``, which stock
        trackers answer as a plain SUMMARY) adds our ``"tvmrpc"`` field:
        each key's expected wait in seconds (``null`` while unknown).
        """
        summary: dict[str, Any] = {
            "queue_info": self.scheduler.queue_info(),
            "server_info": self._servers(),
        }
        if extended:
            summary["tvmrpc"] = {"expected_wait_seconds": self.expected_waits()}
        return summary

    def _servers(self) -> list[dict[str, Any]]:
        return [
            conn.info
            for conn in self.connections
            if conn.info and str(conn.info.get("key", "")).startswith("server")
        ]

    def summary_frame(self) -> bytes:
        """The encoded plain SUMMARY reply, cached until the state changes.

        Only the frame is kept (550 KB at 10,000 boards): when only the queue
        counts changed, its server list is reused from the previous frame
        through a memoryview, not kept a second time.
        """
        version = (self.scheduler.generation, self._info_generation)
        cache = self._summary_cache
        if cache is not None and cache[0] == version:
            return cache[1]
        servers: bytes | memoryview
        if cache is not None and cache[0][1] == self._info_generation:
            start, end = self._servers_span
            servers = memoryview(cache[1])[start:end]
        else:
            servers = json.dumps(self._servers()).encode("utf-8")
        queues = json.dumps(self.scheduler.queue_info()).encode("utf-8")
        head = b'[%d, {"queue_info": %s, "server_info": ' % (TrackerCode.SUCCESS, queues)
        size = len(head) + len(servers) + 2
        frame = b"".join((encode_int32(size), head, servers, b"}]"))
        start = 4 + len(head)
        self._servers_span = (start, start + len(servers))
        self._summary_cache = (version, frame)
        return frame
