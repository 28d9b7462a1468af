"""The tracker's view of the lab: boards, holders, queues, session records, metrics.

:class:`TrackerStatus` is the tracker's observer (see :mod:`.hooks`). A
*board* is what one tracker connection offers under one key: a stock or our
server is one board; a proxy is one board per key it serves. A board is
*busy* from the moment one of its match keys is assigned to a request until
its connection PUTs again (a server re-registers when its session is over)
or closes; *free* while it has a match key on offer; *withdrawn* otherwise.

Invariants:
- Every hold that ends yields exactly one session record (a ``tvmrpc.sessions``
  info event and an entry in a ring of :data:`RECENT` records).
- A closed connection's boards and queued requests leave this view at once.
- Everything kept is bounded: the session ring, the utilisation ring and the
  per-key metric tables (capped, see :mod:`.stats`).
- Hook methods do dictionary work only; no logging except the session record.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterator
from typing import Any

import attrs
from twisted.logger import Logger

from .extension import Extension, read_extension
from .stats import MAX_KEYS, OTHER_KEY, KeyedCounts, KeyedHistograms, clip, finite

# Not the module's default namespace: session records of every daemon share
# this one, which docs/observability.md names for log filters.
log = Logger(namespace="tvmrpc.sessions")

#: Session records kept for the page and the JSON API.
RECENT = 100
#: Utilisation samples kept (one per :data:`SAMPLE_SECONDS`: one hour).
SAMPLE_SECONDS = 10.0
SAMPLES = 360
#: What ``/api/v1/status`` says a board is: the first three from what it has on
#: offer, the others from the tracker's drains and quarantine (docs/scheduling.md).
STATES = ("free", "busy", "withdrawn", "draining", "maintenance", "quarantined")
#: Keys drawn on the utilisation chart at most.
MAX_CHART_KEYS = 50


@attrs.define(eq=False)
class Hold:
    """A client holding one of a board's match keys."""

    client: str
    user: str
    matchkey: str
    since: float
    queue_wait: float


@attrs.define(eq=False)
class Board:
    """What one connection offers under one key."""

    key: str
    conn: Hashable
    address: str
    since: float
    registered: bool = False
    free: dict[str, None] = attrs.Factory(dict)
    # A list, not a deque: an empty deque is 624 bytes, an empty list 56, and a
    # board holds one session at a time but for proxies (docs/tracker.md).
    holds: list[Hold] = attrs.Factory(list)
    seen_total: int = 0

    @property
    def state(self) -> str:
        if self.holds:
            return "busy"
        return "free" if self.free else "withdrawn"


def _key_of_info(info: dict[str, Any]) -> str | None:
    """``K`` from ``server:K`` (None for proxies' ``server:proxy[...]`` and non-servers)."""
    key = info.get("key")
    if not isinstance(key, str) or not key.startswith("server:"):
        return None
    key = key[len("server:") :]
    if key.startswith("proxy[") or not key:
        return None
    return key


class Utilisation:
    """Busy board-seconds over board-seconds per key, integrated at every state change.

    Pure. ``change`` is called before a key's busy or board count changes;
    ``sample`` returns ``{"t": now, "keys": {key: [busy share, boards]}}`` for
    the interval since the last reset (``boards`` is the mean board count).
    """

    def __init__(self, now: float) -> None:
        self.start = now
        # key -> [busy boards, boards, last change, busy board-seconds, board-seconds]
        self.keys: dict[str, list[float]] = {}

    def change(self, key: str, now: float, busy: int = 0, boards: int = 0) -> None:
        key = clip(key)
        entry = self.keys.get(key)
        if entry is None:
            if len(self.keys) >= MAX_KEYS:
                return
            entry = self.keys[key] = [0, 0, now, 0.0, 0.0]
        self._integrate(entry, now)
        entry[0] += busy
        entry[1] += boards

    @staticmethod
    def _integrate(entry: list[float], now: float) -> None:
        elapsed = max(0.0, now - entry[2])
        entry[3] += entry[0] * elapsed
        entry[4] += entry[1] * elapsed
        entry[2] = now

    def sample(self, now: float, reset: bool) -> dict[str, Any]:
        span = max(now - self.start, 1e-9)
        shown: dict[str, list[float]] = {}
        for key in sorted(self.keys):
            entry = self.keys[key]
            self._integrate(entry, now)
            if entry[4] > 0 and len(shown) < MAX_CHART_KEYS:
                shown[key] = [round(entry[3] / entry[4], 4), round(entry[4] / span, 3)]
            elif entry[4] == 0 and entry[1] > 0 and len(shown) < MAX_CHART_KEYS:
                shown[key] = [entry[0] / entry[1], entry[1]]
        if reset:
            self.start = now
            for key in [k for k, e in self.keys.items() if e[1] <= 0]:
                del self.keys[key]
            for entry in self.keys.values():
                entry[3] = entry[4] = 0.0
        return {"t": now, "keys": shown}


class TrackerStatus:
    """Observer of one tracker: call its hooks from the protocol; read it anywhere."""

    def __init__(self, clock: Any, scheduler: Any = None) -> None:
        self.clock = clock
        self.scheduler = scheduler
        #: Each key's expected wait for a new request (the tracker's estimate); set
        #: by the service to the factory's ``expected_waits``.
        self.expected_waits: Any = None
        self.boards: dict[Hashable, dict[str, Board]] = {}
        self.queued: dict[Hashable, dict[Any, float]] = {}
        self.sessions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=SAMPLES)
        self.extensions: dict[Hashable, Extension] = {}
        #: Connections that registered as a server (UPDATE_INFO with a ``server`` key).
        self.registered: set[Hashable] = set()
        self.utilisation = Utilisation(clock.seconds())
        self.requests = KeyedCounts()
        self.assignments = KeyedCounts()
        self.sessions_by_key = KeyedCounts()
        self.queue_waits = KeyedHistograms()
        self.hold_seconds = KeyedHistograms()
        self.registrations = 0
        self.evictions = 0
        self.connections = 0
        self.open_connections = 0
        self.bad_frames = 0

    # -- hooks ------------------------------------------------------------------

    def connected(self, conn: Hashable) -> None:
        self.connections += 1
        self.open_connections += 1

    def disconnected(self, conn: Hashable) -> None:
        self.open_connections -= 1
        self.queued.pop(conn, None)
        self.extensions.pop(conn, None)
        if conn in self.registered:
            self.registered.discard(conn)
            self.evictions += 1
        boards = self.boards.pop(conn, None)
        if boards:
            now = self.clock.seconds()
            for board in boards.values():
                while board.holds:
                    self._end_hold(board, now, "board gone")
                self.utilisation.change(board.key, now, boards=-1)

    def bad_frame(self, conn: Hashable, reason: str) -> None:
        self.bad_frames += 1

    def requested(self, request: Any) -> None:
        self.requests.add(request.key)
        self.queued.setdefault(request.owner, {})[request] = self.clock.seconds()

    def put(self, conn: Hashable, key: str, matchkey: str, addr: str, port: int) -> None:
        now = self.clock.seconds()
        board = self._board(conn, key, f"{addr}:{port}", now)
        if board.holds:
            self._end_hold(board, now, "released")
        elif not board.free:
            board.since = now  # withdrawn -> free
        board.free[matchkey] = None

    def assigned(self, assignment: Any) -> None:
        request, resource = assignment.request, assignment.resource
        now = self.clock.seconds()
        waiting = self.queued.get(request.owner)
        queued_at = now
        if waiting is not None:
            queued_at = waiting.pop(request, now)
            if not waiting:
                del self.queued[request.owner]
        wait = max(0.0, now - queued_at)
        self.assignments.add(request.key)
        self.queue_waits.observe(self.requests.label(request.key), wait)
        board = self.boards.get(resource.owner, {}).get(resource.key)
        if board is None:
            address = f"{resource.addr}:{resource.port}"
            board = self._board(resource.owner, resource.key, address, now)
        board.free.pop(resource.matchkey, None)
        client = getattr(request.owner, "peer_host", "?")
        if not board.holds:
            self.utilisation.change(board.key, now, busy=1)
        board.holds.append(Hold(client, clip(request.user), resource.matchkey, now, wait))
        board.since = now

    def info_updated(self, conn: Hashable, info: dict[str, Any]) -> None:
        ext = read_extension(info)
        if ext is not None:
            self.extensions[conn] = ext
        if conn not in self.registered and str(info.get("key", "")).startswith("server"):
            self.registered.add(conn)
            self.registrations += 1
            for board in self.boards.get(conn, {}).values():
                board.registered = True
        key = _key_of_info(info)
        if key is not None:
            addr = info.get("addr")
            address = f"{addr[0]}:{addr[1]}" if isinstance(addr, list) else "?"
            self._board(conn, key, address, self.clock.seconds())

    # -- internals ----------------------------------------------------------------

    def _board(self, conn: Hashable, key: str, address: str, now: float) -> Board:
        boards = self.boards.setdefault(conn, {})
        board = boards.get(key)
        if board is None:
            board = boards[key] = Board(
                key=key, conn=conn, address=address, since=now, registered=conn in self.registered
            )
            self.utilisation.change(key, now, boards=1)
            if ext := self.extensions.get(conn):
                board.seen_total = ext.total
        else:
            board.address = address
        return board

    def _end_hold(self, board: Board, now: float, ended_by: str) -> None:
        hold = board.holds.pop(0)
        if not board.holds:
            self.utilisation.change(board.key, now, busy=-1)
        board.since = now
        record: dict[str, Any] = {
            "key": clip(board.key),
            "board": clip(board.address),
            "client": hold.client,
            "user": hold.user,
            "start": hold.since,
            "queue_wait": round(hold.queue_wait, 6),
            "hold": round(now - hold.since, 6),
            "ended_by": ended_by,
            "outcome": None,
            "bytes_in": None,
            "bytes_out": None,
        }
        ext = self.extensions.get(board.conn)
        if ext is not None and ext.total > board.seen_total and ext.last_session is not None:
            board.seen_total = ext.total
            last = ext.last_session
            record.update(outcome=last.outcome, bytes_in=last.bytes_in, bytes_out=last.bytes_out)
        self.sessions.append(record)
        self.sessions_by_key.add(board.key)
        self.hold_seconds.observe(self.sessions_by_key.label(board.key), now - hold.since)
        log.info(
            "session on {key} board {board} for {client}: waited {queue_wait:.3f}s, "
            "held {hold:.3f}s, {ended_by}{detail}",
            session=record,
            detail=_detail(record),
            **record,
        )

    # -- reading ------------------------------------------------------------------

    def all_boards(self) -> Iterator[Board]:
        for boards in self.boards.values():
            yield from boards.values()

    def shown_state(self, board: Board) -> str:
        """The board's state with the tracker's rules applied (see :data:`STATES`)."""
        state = board.state
        rules = getattr(self.scheduler, "rules", None)
        if rules is None:
            return state
        why = getattr(rules.state(board.key, board.address), "value", "available")
        if why == "drained":
            return "draining" if state == "busy" else "maintenance"
        if why == "quarantined":
            return "quarantined"
        return state

    def _failures(self, board: Board) -> list[str]:
        """The board's last failed outcomes in a row (why it is or may be quarantined)."""
        rules = getattr(self.scheduler, "rules", None)
        if rules is None or not rules.streak(board.address):
            return []
        return rules.failures(board.address)[-rules.streak(board.address) :]

    def per_key(self) -> dict[str, dict[str, int]]:
        """``{key: {state: boards for each of STATES, "queued": requests}}``."""
        out: dict[str, dict[str, int]] = {}
        for board in self.all_boards():
            entry = out.setdefault(board.key, dict.fromkeys((*STATES, "queued"), 0))
            entry[self.shown_state(board)] += 1
        for waiting in self.queued.values():
            for request in waiting:
                if request.live:
                    entry = out.setdefault(request.key, dict.fromkeys((*STATES, "queued"), 0))
                    entry["queued"] += 1
        return out

    def sample(self) -> None:
        """Close a utilisation interval (called every :data:`SAMPLE_SECONDS`)."""
        self.samples.append(self.utilisation.sample(self.clock.seconds(), reset=True))

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/v1/status`` document (see docs/observability.md)."""
        now = self.clock.seconds()
        boards = []
        for board in self.all_boards():
            hold = board.holds[0] if board.holds else None
            boards.append(
                {
                    "key": clip(board.key),
                    "address": clip(board.address),
                    "state": self.shown_state(board),
                    "since": board.since,
                    "registered": board.registered,
                    "free": len(board.free),
                    "busy": len(board.holds),
                    "failures": self._failures(board),
                    "holder": None
                    if hold is None
                    else {
                        "address": hold.client,
                        "user": hold.user,
                        "since": hold.since,
                        "queue_wait": round(hold.queue_wait, 6),
                    },
                }
            )
        boards.sort(key=lambda b: (b["key"], b["address"]))
        queues: dict[str, dict[str, Any]] = {}
        waits = self.expected_waits() if self.expected_waits is not None else {}
        for key, entry in sorted(self.per_key().items()):
            queues[clip(key)] = {state: entry[state] for state in STATES}
            queues[clip(key)]["waiting"] = []
            wait = waits.get(key)
            queues[clip(key)]["expected_wait_seconds"] = None if wait is None else round(wait, 3)
        for owner, waiting in self.queued.items():
            for request, since in waiting.items():
                if request.live:
                    queues[clip(request.key)]["waiting"].append(
                        {
                            "client": getattr(owner, "peer_host", "?"),
                            "user": clip(request.user),
                            "priority": finite(request.priority),
                            "since": since,
                            "age": round(now - since, 6),
                            "_order": (-request.priority, request.seq),
                        }
                    )
        for queue in queues.values():
            queue["waiting"].sort(key=lambda w: w.pop("_order"))
        return {
            "version": 1,
            "daemon": "tracker",
            "now": now,
            "boards": boards,
            "queues": queues,
            "sessions": list(reversed(self.sessions)),
            "utilisation": {
                "interval": SAMPLE_SECONDS,
                "samples": [*self.samples, self.utilisation.sample(now, reset=False)],
            },
        }

    def collect(self) -> Iterator[Any]:
        """Prometheus metric families (a ``prometheus_client`` custom collector)."""
        from .stats import counter_family, gauge_family, histogram_family

        for name, doc, counts in (
            ("requests", "REQUEST commands received.", self.requests),
            ("assignments", "Requests answered with a board.", self.assignments),
            ("sessions", "Holds that ended.", self.sessions_by_key),
        ):
            yield counter_family(f"tvmrpc_tracker_{name}", doc, counts.values, ["key"])
        for name, doc, histograms in (
            ("queue_wait", "Seconds from REQUEST to assignment.", self.queue_waits),
            (
                "hold",
                "Seconds from assignment to the board's next PUT or disconnect.",
                self.hold_seconds,
            ),
        ):
            yield histogram_family(f"tvmrpc_tracker_{name}_seconds", doc, histograms.values, "key")
        per_key: dict[str, dict[str, int]] = {}
        for key, entry in sorted(self.per_key().items()):
            label = clip(key) if len(per_key) < MAX_KEYS else OTHER_KEY
            merged = per_key.setdefault(label, dict.fromkeys(entry, 0))
            for state in entry:
                merged[state] += entry[state]
        for state, doc in (
            ("queued", "Requests waiting for a board."),
            ("free", "Boards with a match key on offer."),
            ("busy", "Boards held by a client."),
            ("withdrawn", "Registered boards neither free nor busy."),
            ("draining", "Drained boards whose session still runs."),
            ("maintenance", "Drained boards, idle: not handed out until resumed."),
            ("quarantined", "Boards not handed out after failing sessions in a row."),
        ):
            yield gauge_family(
                f"tvmrpc_tracker_{state}",
                doc,
                (([key], counts[state]) for key, counts in per_key.items()),
                ["key"],
            )
        # The process-wide figures: one unlabelled sample each.
        for name, doc, value in (
            (
                "registrations",
                "Server and proxy registrations (first UPDATE_INFO with a server key).",
                self.registrations,
            ),
            (
                "evictions",
                "Registered server or proxy connections that closed (their boards leave).",
                self.evictions,
            ),
            ("connections", "Connections accepted.", self.connections),
            (
                "bad_frames",
                "Connections closed for bad input (magic, frame or request).",
                self.bad_frames,
            ),
        ):
            yield counter_family(f"tvmrpc_tracker_{name}", doc, {(): value}, [])
        yield gauge_family(
            "tvmrpc_tracker_open_connections",
            "Connections open now.",
            [((), self.open_connections)],
        )


def _detail(record: dict[str, Any]) -> str:
    if record["outcome"] is None:
        return ""
    text = f", outcome {record['outcome']}"
    if record["bytes_in"] is not None:
        text += f", {record['bytes_in']} bytes in, {record['bytes_out']} bytes out"
    return text


def status_service(reactor: Any, endpoint: str, status: TrackerStatus, admin: Any = None) -> Any:
    """The ``--status`` service of the tracker: metrics, JSON, the page, and sampling;
    ``admin`` (the tracker's admin API resource) is mounted at ``/api/v1/admin/``."""
    from .page import page_bytes
    from .web import StatusService, status_site

    site = status_site(status, page_bytes(), {b"admin": admin} if admin is not None else None)
    return StatusService(
        reactor, endpoint, site, "tvm-tracker", tick=status.sample, period=SAMPLE_SECONDS
    )
