"""The server's view of its sessions: outcome, duration and bytes, as records and metrics.

:class:`ServerStatus` is the board's observer (see :mod:`.hooks`). Outcomes:

- ``timeout``: the session outlived its ``-timeout`` and was aborted;
- ``ok``: the runtime's server loop returned (the client closed the session);
- ``client_gone``: the loop raised (worker exit 1): the connection broke;
- ``crashed``: the worker died otherwise (a signal, ``os._exit``, a lost zygote).

Invariants:
- Every session that starts yields exactly one record: an info event
  (namespace ``tvmrpc.sessions``) and an entry in a ring of :data:`RECENT`.
- Bytes are the socket's kernel counters (:mod:`.tcpinfo`), read just before
  the daemon closes its duplicate of the session socket.
- :meth:`extension` is the ``"tvmrpc"`` UPDATE_INFO value (:mod:`.extension`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from .extension import OUTCOMES, LastSession, build_extension
from .stats import Histogram, clip
from .tcpinfo import tcp_bytes

log = Logger(namespace="tvmrpc.sessions")

RECENT = 100


def classify(result: Any, timed_out: bool) -> str:
    """The outcome of a session from the worker's exit code (or a Failure)."""
    if timed_out:
        return "timeout"
    if result == 0 and isinstance(result, int):
        return "ok"
    if result == 1 and isinstance(result, int):
        return "client_gone"
    return "crashed"


class ServerStatus:
    """Observer of one server's board; also serves ``snapshot()`` and ``collect()``."""

    def __init__(self, clock: Any, key: str, runtime: Any = None, board: Any = None) -> None:
        self.clock = clock
        self.key = key
        self.runtime = runtime
        self.board = board
        self.current: dict[str, Any] | None = None
        self.sessions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.seconds = Histogram()
        self.bytes_in = 0
        self.bytes_out = 0
        self.last: LastSession | None = None
        self._timed_out = False
        #: Whether the board can take a client (the server's readiness), and
        #: its health checks ``{"checks": n, "ok": bool}``; set by the service.
        self.ready_source: Callable[[], bool] | None = None
        self.health_source: Callable[[], dict[str, Any]] | None = None

    # -- hooks --------------------------------------------------------------------

    def session_started(self, label: str, timeout: float | None, sock: Any) -> None:
        self._timed_out = False
        self.current = {"client": clip(label), "since": self.clock.seconds(), "timeout": timeout}

    def session_timed_out(self) -> None:
        self._timed_out = True

    def session_ended(self, result: Any, sock: Any) -> None:
        current, self.current = self.current, None
        now = self.clock.seconds()
        since = current["since"] if current else now
        client = current["client"] if current else "?"
        counted = tcp_bytes(sock) if sock is not None else None
        bytes_in, bytes_out = counted if counted is not None else (None, None)
        outcome = classify(result, self._timed_out)
        seconds = max(0.0, now - since)
        self.outcomes[outcome] += 1
        self.seconds.observe(seconds)
        self.bytes_in += bytes_in or 0
        self.bytes_out += bytes_out or 0
        self.last = LastSession(outcome, seconds, bytes_in, bytes_out, client)
        record = {
            "key": self.key,
            "client": client,
            "start": since,
            "seconds": round(seconds, 6),
            "outcome": outcome,
            "exit": result if isinstance(result, int) else None,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
        }
        self.sessions.append(record)
        log.info(
            "session of {client} on {key}: {outcome} after {seconds:.3f}s, "
            "{bytes_in} bytes in, {bytes_out} bytes out",
            session=record,
            **record,
        )

    # -- reading --------------------------------------------------------------------

    def extension(self) -> dict[str, Any]:
        """The ``"tvmrpc"`` value for this server's next UPDATE_INFO."""
        health = self.health_source() if self.health_source is not None else None
        return build_extension(self.last, self.outcomes, health)

    def _ready(self) -> bool:
        if self.ready_source is not None:
            return bool(self.ready_source())
        return bool(self.runtime is not None and self.runtime.is_ready)

    def snapshot(self) -> dict[str, Any]:
        """The ``/api/v1/status`` document of a server (see docs/observability.md)."""
        now = self.clock.seconds()
        current = None
        if self.current is not None:
            current = dict(self.current, age=round(now - self.current["since"], 6))
        waiting = len(self.board.queue) if self.board is not None else 0
        return {
            "version": 1,
            "daemon": "server",
            "now": now,
            "key": self.key,
            "state": "busy" if current is not None else "idle",
            "ready": self._ready(),
            "current": current,
            "waiting": waiting,
            "totals": dict(self.outcomes),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "zygote_restarts": getattr(self.runtime, "restarts", 0),
            "sessions": list(reversed(self.sessions)),
        }

    def collect(self) -> Any:
        from .stats import counter_family, gauge_family, histogram_family

        yield counter_family(
            "tvmrpc_server_sessions", "Sessions ended, by outcome.", self.outcomes, ["outcome"]
        )
        yield histogram_family(
            "tvmrpc_server_session_seconds",
            "Session duration, from handing the socket to a worker to its end.",
            {"": self.seconds},
            None,
        )
        yield counter_family(
            "tvmrpc_server_bytes_in",
            "Bytes received from clients (kernel counters).",
            {(): self.bytes_in},
            [],
        )
        yield counter_family(
            "tvmrpc_server_bytes_out",
            "Bytes sent to clients and acknowledged (kernel counters).",
            {(): self.bytes_out},
            [],
        )
        yield counter_family(
            "tvmrpc_server_zygote_restarts",
            "Times the worker zygote died and was restarted.",
            {(): getattr(self.runtime, "restarts", 0)},
            [],
        )
        yield gauge_family(
            "tvmrpc_server_ready",
            "1 when a warm worker can start a session at once.",
            [((), 1 if self._ready() else 0)],
        )
        yield gauge_family(
            "tvmrpc_server_busy",
            "1 while a session runs.",
            [((), 0 if self.current is None else 1)],
        )


def status_service(reactor: Any, endpoint: str, status: ServerStatus) -> Any:
    """The ``--status`` service of a server: metrics and JSON."""
    from .web import StatusService, status_site

    return StatusService(reactor, endpoint, status_site(status), "tvm-server")
