"""No-op observers: what the tracker, proxy and server call when ``--status`` is off.

Each daemon's protocol code calls a handful of event methods on an observer
it is given (default: the no-op objects here). The real observers live in
:mod:`tvmrpc.status.tracker`, :mod:`.server` and :mod:`.proxy` and have the
same methods.

Invariants:
- Every method here returns None and does nothing; importing this module
  imports nothing else of ours.
"""

from __future__ import annotations

from typing import Any


class NullTrackerObserver:
    """Tracker events: connections, requests, PUTs, assignments, UPDATE_INFO, bad frames."""

    def connected(self, conn: Any) -> None: ...

    def disconnected(self, conn: Any) -> None: ...

    def bad_frame(self, conn: Any, reason: str) -> None: ...

    def requested(self, request: Any) -> None: ...

    def put(self, conn: Any, key: str, matchkey: str, addr: str, port: int) -> None: ...

    def assigned(self, assignment: Any) -> None: ...

    def info_updated(self, conn: Any, info: dict[str, Any]) -> None: ...


class NullProxyObserver:
    """Proxy events: a pairing starts, a paired leg closes, a waiting leg times out."""

    def paired(self, leg: Any, peer: Any) -> None: ...

    def unpaired(self, leg: Any, peer: Any) -> None: ...

    def timed_out(self, leg: Any) -> None: ...


class NullServerObserver:
    """Server events: a session starts, times out, ends."""

    def session_started(self, label: str, timeout: float | None, sock: Any) -> None: ...

    def session_timed_out(self) -> None: ...

    def session_ended(self, result: Any, sock: Any) -> None: ...


NULL_TRACKER = NullTrackerObserver()
NULL_PROXY = NullProxyObserver()
NULL_SERVER = NullServerObserver()
