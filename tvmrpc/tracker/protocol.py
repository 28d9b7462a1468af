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
  timeout is closed.
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
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import boardauth, boardtls, sockopts
from ..codec import (
    MAX_FRAME_BYTES,
    NO_FRAME,
    TRACKER_MAGIC,
    CodecError,
    FrameDecoder,
    MagicDecoder,
    TrackerCode,
    encode_frame,
    encode_int32,
)
from ..listening import Network, address_in
from ..ratelimit import RateLimit
from ..status.hooks import NULL_TRACKER
from ..status.refusals import REFUSED
from .boards import BoardState
from .commands import (
    BoardAuth,
    BoardChallenge,
    CommandError,
    GetPendingMatchkeys,
    Ping,
    Put,
    RefusedError,
    RequestResource,
    Stop,
    Summary,
    UpdateInfo,
    parse_command,
)
from .estimates import HoldTracker, WaitEstimator
from .scheduler import Assignment, Scheduler, board_name

log = Logger(namespace="tvmrpc.tracker")

#: Seconds a new connection may take to send the tracker magic.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Frames handled for one connection before the reactor serves the others.
FRAMES_PER_TURN = 128
#: Requests one connection may have waiting at once (a stock client has one).
MAX_WAITING_REQUESTS = 1024
#: Seconds between two warnings about refused requests of one connection.
REFUSAL_LOG_INTERVAL = 60.0


class Phase(enum.Enum):
    """Where a tracker connection is in its life."""

    GREETING = "waiting for the tracker magic"
    SERVING = "serving requests"
    CLOSED = "closing or closed"


# Module-level names for the per-frame checks: an enum class attribute costs
# ten times a global lookup, and the tracker checks the phase on every read.
_GREETING, _SERVING, _CLOSED = Phase.GREETING, Phase.SERVING, Phase.CLOSED
#: The decoder of a connection not made yet (holds nothing; ``clear`` is harmless).
_NO_DECODER = FrameDecoder()


@implementer(IPushProducer)
class TrackerProtocol(Protocol):
    """Serves one tracker connection (a server, a proxy or a client)."""

    factory: TrackerFactory

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.peer_host = "?"
        self.phase = Phase.GREETING
        self._greeting: MagicDecoder | None = MagicDecoder()  # dropped once greeted
        self._decoder = _NO_DECODER  # its own from connectionMade (memory at 10,000 boards)
        self._stop_requested = False
        self._write_paused = False  # the transport's write buffer is over its bound
        self._reading_paused = False  # we told the transport to stop reading
        self._turn: Any = None  # DelayedCall that continues a backlog
        self._handshake_timer: Any = None
        self._refusals: RateLimit | None = None
        #: Registration needs no proof (no secret, or an --allow-board-from peer).
        self.board_trusted = True
        self._nonce: str | None = None
        self._board_keys: set[str] = set()

    def __repr__(self) -> str:
        return f"<tracker connection {self.peer_host} {self.info.get('key', '')}>"

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        self.peer_host = getattr(peer, "host", str(peer))
        if factory.board_auth:
            self.board_trusted = address_in(self.peer_host, factory.allow_board_from)
        self._decoder = FrameDecoder(factory.max_frame_bytes)
        sockopts.set_nodelay(self.transport)
        sockopts.set_keepalive(self.transport, factory.keepalive)
        factory.connections[self] = None
        factory.observer.connected(self)
        self.transport.registerProducer(self, True)
        self._handshake_timer = factory.clock.callLater(
            factory.handshake_timeout, self._handshake_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is _CLOSED:
            return
        sockopts.quickack(self.transport)
        if phase is _GREETING:
            greeting = self._greeting.feed(data)  # type: ignore[union-attr]
            if greeting is None:
                return
            self._greeting = None
            self._cancel_handshake_timer()
            magic, data = greeting
            if magic != TRACKER_MAGIC:
                self._reject(f"bad tracker magic {magic:#x}")
                return
            self.phase = _SERVING
            self.transport.write(encode_int32(TRACKER_MAGIC))
            if not self.board_trusted:  # data came through TLS: a client certificate is known
                who = f"tracker connection from {self.peer_host}"
                self.board_trusted = boardtls.admitted(self.transport, who)
        self._decoder.append(data)
        self._serve()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._shut()
        self.factory.forget(self)
        self.factory.observer.disconnected(self)
        if self.info.get("key", "").startswith("server"):
            log.info(
                "{key} at {host} disconnected",
                key=self.info["key"],
                host=self.peer_host,
            )
        if self._stop_requested:
            self.factory.on_stop()

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
        self._shut()

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
                command = parse_command(frame)
            except RefusedError as exc:
                self._refuse(str(exc))
                continue
            except CommandError as exc:
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

    def _handle(self, command: Any) -> None:
        factory = self.factory
        if isinstance(command, RequestResource):
            if factory.scheduler.waiting_requests(self) >= MAX_WAITING_REQUESTS:
                self._refuse(
                    f"this connection already has {MAX_WAITING_REQUESTS} requests waiting "
                    f"(at most {MAX_WAITING_REQUESTS}; stock clients wait for each answer)"
                )
                return
            if factory.verbose:
                log.info(
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
        elif isinstance(command, Put):
            if not self.board_trusted and command.key not in self._board_keys:
                self._refuse_board(f"PUT {command.key}")
                return
            addr = command.custom_addr if command.custom_addr is not None else self.peer_host
            if factory.verbose:
                log.info(
                    "{host} put {matchkey} under {key} at {addr}:{port}",
                    host=self.peer_host,
                    matchkey=command.matchkey,
                    key=command.key,
                    addr=addr,
                    port=command.port,
                )
            factory.board_free_again(self)
            assignments = factory.scheduler.put(
                command.key, addr, command.port, command.matchkey, self
            )
            factory.observer.put(self, command.key, command.matchkey, addr, command.port)
            self.reply(TrackerCode.SUCCESS)
            factory.deliver(assignments)
        elif isinstance(command, Ping):
            self.reply(TrackerCode.SUCCESS)
        elif isinstance(command, GetPendingMatchkeys):
            self.reply(factory.scheduler.pending_matchkeys(self))
        elif isinstance(command, Summary):
            if command.extended:  # expected waits change with time: never cached
                self.reply([TrackerCode.SUCCESS, factory.summary(extended=True)])
            else:
                self.transport.write(factory.summary_frame())
        elif isinstance(command, UpdateInfo):
            info = dict(command.info)
            if (
                not self.board_trusted
                and not self._board_keys
                and str(info.get("key", "")).startswith("server")
            ):
                self._refuse_board(f"UPDATE_INFO {info['key']}")
                return
            addr = info.get("addr")
            if addr is not None and addr[0] is None:
                info["addr"] = [self.peer_host, addr[1]]
            self.info.update(info)
            factory.info_changed()
            factory.observer.info_updated(self, info)
            if str(info.get("key", "")).startswith("server"):
                log.info("{key} registered from {host}", key=info["key"], host=self.peer_host)
            self.reply(TrackerCode.SUCCESS)
            factory.server_report(self)
        elif isinstance(command, BoardChallenge):
            if factory.board_secret is None:
                self.reply([TrackerCode.FAIL, "this tracker has no --board-secret-file"])
                return
            if self._nonce is None:
                self._nonce = boardauth.new_nonce()
            self.reply([TrackerCode.SUCCESS, self._nonce])
        elif isinstance(command, BoardAuth):
            secret = factory.board_secret
            if secret is None:
                self.reply([TrackerCode.FAIL, "this tracker has no --board-secret-file"])
            elif boardauth.verify(
                secret, boardauth.LABEL_TRACKER, self._nonce, command.key, command.proof
            ):
                self._board_keys.add(command.key)
                self.reply(TrackerCode.SUCCESS)
            else:
                REFUSED.add("board auth")
                self._refuse(
                    f"bad board proof for {command.key} (a wrong --board-secret-file, "
                    "or a proof not made for this connection's nonce)"
                )
        elif isinstance(command, Stop):
            if factory.stop_key is not None and command.stop_key == factory.stop_key:
                log.info("stop requested by {host}", host=self.peer_host)
                self.reply(TrackerCode.SUCCESS)
                self._stop_requested = True
                self._close()
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

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        log.info(
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

    def _close(self) -> None:
        """Stop serving, drop this connection's state and close it after its replies."""
        self._shut()
        self.factory.forget(self)
        # A transport with a registered producer never closes: unregister first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _shut(self) -> None:
        """Enter CLOSED: no more frames handled, timers cancelled, buffers dropped."""
        self.phase = _CLOSED
        self._cancel_handshake_timer()
        if self._turn is not None:
            if self._turn.active():
                self._turn.cancel()
            self._turn = None
        self._decoder.clear()

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()


class TrackerFactory(Factory):
    """Holds the tracker's state: the scheduler and the live connections."""

    protocol = TrackerProtocol

    def __init__(
        self,
        stop_key: str | None = None,
        on_stop: Callable[[], None] | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        verbose: bool = False,
        scheduler: Scheduler | None = None,
        clock: IReactorTime | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        frames_per_turn: int = FRAMES_PER_TURN,
        observer: Any = NULL_TRACKER,
        board_secret: bytes | None = None,
        allow_board_from: tuple[Network, ...] = (),
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
        board_auth: bool | None = None,
    ) -> None:
        self.keepalive = keepalive
        #: With a secret, board registration needs a proof (docs/security.md).
        self.board_secret = board_secret
        #: Registration needs a proof: the secret's, a client certificate (mtls:) or
        #: an --allow-board-from address (default: with a secret).
        self.board_auth = board_secret is not None if board_auth is None else board_auth
        self.allow_board_from = tuple(allow_board_from)
        #: Told of connections, requests, PUTs, assignments and registrations (tvmrpc.status).
        self.observer = observer
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock = clock
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.holds = HoldTracker()
        self.waits = WaitEstimator()
        # A key that leaves the tracker takes its hold-time statistics with it.
        self.scheduler.on_forget = self.waits.forget
        self.connections: dict[TrackerProtocol, None] = {}
        self.stop_key = stop_key
        self.on_stop = on_stop or (lambda: None)
        self.max_frame_bytes = max_frame_bytes
        self.verbose = verbose
        self.handshake_timeout = handshake_timeout
        self.frames_per_turn = frames_per_turn
        self._info_generation = 0
        self._summary_cache: tuple[tuple[int, int], bytes] | None = None
        self._servers_cache: tuple[int, bytes] | None = None

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
            conn = assignment.request.owner
            resource = assignment.resource
            self.holds.start(resource.owner, resource.key, resource.board, now)
            self.observer.assigned(assignment)
            if self.verbose:
                log.info(
                    "assigned {matchkey} to {host}",
                    matchkey=assignment.resource.matchkey,
                    host=conn.peer_host,
                )
            conn.reply([TrackerCode.SUCCESS, assignment.resource.value()])

    def summary(self, extended: bool = False) -> dict[str, Any]:
        """The SUMMARY payload, shaped exactly as stock's.

        ``extended`` (asked for by ``[6, {"tvmrpc": 1}]``, which stock
        trackers answer as a plain SUMMARY) adds our ``"tvmrpc"`` field:
        each key's expected wait in seconds (``null`` while unknown).
        """
        summary = {"queue_info": self.scheduler.queue_info(), "server_info": self._servers()}
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
        """The encoded plain SUMMARY reply, cached until the state changes."""
        version = (self.scheduler.generation, self._info_generation)
        cache = self._summary_cache
        if cache is None or cache[0] != version:
            servers = self._servers_cache
            if servers is None or servers[0] != self._info_generation:
                servers = self._servers_cache = (
                    self._info_generation,
                    json.dumps(self._servers()).encode("utf-8"),
                )
            queues = json.dumps(self.scheduler.queue_info()).encode("utf-8")
            payload = b'[%d, {"queue_info": %s, "server_info": %s}]' % (
                TrackerCode.SUCCESS,
                queues,
                servers[1],
            )
            cache = self._summary_cache = (version, encode_int32(len(payload)) + payload)
        return cache[1]
