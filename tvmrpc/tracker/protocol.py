"""The tracker's wire protocol: one :class:`TrackerProtocol` per connection.

Invariants:
- Every request frame gets exactly one reply, written with one ``write``;
  a REQUEST's reply is written when a resource is assigned.
- Bad input (wrong magic, bad frame, invalid request) is logged with the peer
  and closes that connection only; what it had queued or PUT is dropped, and
  nothing belonging to another connection is touched.
- A closed connection's queued requests and free resources leave the
  scheduler at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import sockopts
from ..codec import (
    MAX_FRAME_BYTES,
    TRACKER_MAGIC,
    CodecError,
    FrameDecoder,
    MagicDecoder,
    TrackerCode,
    encode_frame,
    encode_int32,
)
from .boards import BoardState
from .commands import (
    CommandError,
    GetPendingMatchkeys,
    Ping,
    Put,
    RequestResource,
    Stop,
    Summary,
    UpdateInfo,
    parse_command,
)
from .estimates import HoldTracker, WaitEstimator
from .scheduler import Assignment, Scheduler, board_name

log = Logger(namespace="tvmrpc.tracker")


class TrackerProtocol(Protocol):
    """Serves one tracker connection (a server, a proxy or a client)."""

    factory: TrackerFactory

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.peer_host = "?"
        self._greeting = MagicDecoder()
        self._greeted = False
        self._closing = False
        self._stop_requested = False
        self._decoder: FrameDecoder | None = None

    def __repr__(self) -> str:
        return f"<tracker connection {self.peer_host} {self.info.get('key', '')}>"

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_host = getattr(peer, "host", str(peer))
        self._decoder = FrameDecoder(self.factory.max_frame_bytes)
        sockopts.set_nodelay(self.transport)
        sockopts.set_keepalive(self.transport)
        self.factory.connections[self] = None

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        sockopts.quickack(self.transport)
        if not self._greeted:
            greeting = self._greeting.feed(data)
            if greeting is None:
                return
            magic, data = greeting
            if magic != TRACKER_MAGIC:
                self._reject(f"bad tracker magic {magic:#x}")
                return
            self._greeted = True
            self.transport.write(encode_int32(TRACKER_MAGIC))
        try:
            frames = self._decoder.feed(data)
        except CodecError as exc:
            self._reject(str(exc))
            return
        for frame in frames:
            if self._closing:
                return
            try:
                command = parse_command(frame)
            except CommandError as exc:
                self._reject(str(exc))
                return
            self._handle(command)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.forget(self)
        if self.info.get("key", "").startswith("server"):
            log.info(
                "{key} at {host} disconnected",
                key=self.info["key"],
                host=self.peer_host,
            )
        if self._stop_requested:
            self.factory.on_stop()

    # -- requests -------------------------------------------------------------

    def _handle(self, command: Any) -> None:
        factory = self.factory
        if isinstance(command, RequestResource):
            if factory.verbose:
                log.info(
                    "{host} requests {key} (priority {priority})",
                    host=self.peer_host,
                    key=command.key,
                    priority=command.priority,
                )
            _, assignments = factory.scheduler.request(
                command.key, command.user, command.priority, self, host=self.peer_host
            )
            factory.deliver(assignments)
        elif isinstance(command, Put):
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
            self.reply(TrackerCode.SUCCESS)
            factory.deliver(assignments)
        elif isinstance(command, Ping):
            self.reply(TrackerCode.SUCCESS)
        elif isinstance(command, GetPendingMatchkeys):
            self.reply(factory.scheduler.pending_matchkeys(self))
        elif isinstance(command, Summary):
            self.reply([TrackerCode.SUCCESS, factory.summary(command.extended)])
        elif isinstance(command, UpdateInfo):
            info = dict(command.info)
            addr = info.get("addr")
            if addr is not None and addr[0] is None:
                info["addr"] = [self.peer_host, addr[1]]
            self.info.update(info)
            if str(info.get("key", "")).startswith("server"):
                log.info("{key} registered from {host}", key=info["key"], host=self.peer_host)
            self.reply(TrackerCode.SUCCESS)
            factory.server_report(self)
        elif isinstance(command, Stop):
            if factory.stop_key is not None and command.stop_key == factory.stop_key:
                log.info("stop requested by {host}", host=self.peer_host)
                self.reply(TrackerCode.SUCCESS)
                self._stop_requested = True
                self._closing = True
                self.transport.loseConnection()
            else:
                log.warn("refused STOP from {host}: wrong or no stop key", host=self.peer_host)
                self.reply(TrackerCode.FAIL)

    def reply(self, value: Any) -> None:
        """Write one reply frame."""
        self.transport.write(encode_frame(value))

    def _reject(self, reason: str) -> None:
        log.warn(
            "closing tracker connection from {host}: {reason}", host=self.peer_host, reason=reason
        )
        self._closing = True
        self.factory.forget(self)
        self.transport.loseConnection()


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
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock = clock
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.holds = HoldTracker()
        self.waits = WaitEstimator()
        self.connections: dict[TrackerProtocol, None] = {}
        self.stop_key = stop_key
        self.on_stop = on_stop or (lambda: None)
        self.max_frame_bytes = max_frame_bytes
        self.verbose = verbose

    def forget(self, conn: TrackerProtocol) -> None:
        """Drop a connection's requests and resources (idempotent)."""
        if self.connections.pop(conn, False) is not False:
            self.scheduler.drop_owner(conn)
            self.board_free_again(conn)

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
        servers = [
            conn.info
            for conn in self.connections
            if str(conn.info.get("key", "")).startswith("server")
        ]
        summary = {"queue_info": self.scheduler.queue_info(), "server_info": servers}
        if extended:
            summary["tvmrpc"] = {"expected_wait_seconds": self.expected_waits()}
        return summary
