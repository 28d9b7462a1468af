"""Which boards may be handed out: drains by operators, quarantine of failing boards.

Pure: no sockets, no clock. A board is named ``"<addr>:<port>"``, the address
clients are sent to (what SUMMARY's server_info and REQUEST replies show).

Invariants:
- A board is available unless it, or its key, is drained, or it is
  quarantined. Drains are only lifted by :meth:`BoardRules.resume`; they
  outlive the board's connection, so a drained board that reconnects stays
  drained (nothing here survives a tracker restart).
- A board is quarantined after ``quarantine_after`` consecutive failed
  sessions (:data:`FAILURES`); a session that ended well resets the count, and
  outcomes that are the client's doing (:data:`NEUTRAL`: a timeout because the
  client's code is slow, a client that went away) leave it as it is.
- A quarantined board returns after a passing health check it reports
  (``"health_ok"``) once quarantined, or when an operator resumes it. A
  passing check does not reset the count of failed sessions: our servers run
  one after every crash, and a board whose sessions keep crashing must still
  reach quarantine. Within one report the health check is counted before the
  session, so the check that followed the quarantining crash cannot lift it:
  the board needs a later passing check (e.g. its server restarted after a
  repair) or an operator.
- At most :data:`KEPT_FAILURES` recent failures are kept per board.
- A server's report (the ``"tvmrpc"`` field of its UPDATE_INFO, see
  :meth:`BoardRules.report`) counts each session and each health check once,
  however often the same report is sent again (reconnects re-send it).
"""

from __future__ import annotations

import collections
import enum

import attrs

#: Session outcomes that count against a board.
FAILURES = frozenset({"crashed", "health_failed"})
#: Outcomes that say nothing about the board's health.
NEUTRAL = frozenset({"timeout", "client_gone"})
#: Outcomes that clear the failure count ("ok") or a quarantine ("health_ok").
GOOD = frozenset({"ok", "health_ok"})
KEPT_FAILURES = 5


class BoardState(str, enum.Enum):
    """Why a board is or is not handed out (the tracker adds free/busy)."""

    AVAILABLE = "available"
    DRAINED = "drained"
    QUARANTINED = "quarantined"


@attrs.define
class BoardRules:
    """Operator drains and automatic quarantine, keyed by board and by key."""

    quarantine_after: int = 3
    drained_boards: set[str] = attrs.Factory(set)
    drained_keys: set[str] = attrs.Factory(set)
    quarantined: set[str] = attrs.Factory(set)
    _streaks: dict[str, int] = attrs.Factory(dict)
    _failures: dict[str, collections.deque[str]] = attrs.Factory(dict)
    _seen: dict[str, tuple[int, int]] = attrs.Factory(dict)  # board -> (sessions, checks)

    # -- operator ------------------------------------------------------------

    def drain(self, board: str | None = None, key: str | None = None) -> None:
        """Stop handing out ``board`` (``addr:port``) or every board of ``key``."""
        if board is not None:
            self.drained_boards.add(board)
        if key is not None:
            self.drained_keys.add(key)

    def resume(self, board: str | None = None, key: str | None = None) -> None:
        """Lift a drain and a quarantine of ``board``, or the drain of ``key``."""
        if board is not None:
            self.drained_boards.discard(board)
            self.quarantined.discard(board)
            self._streaks.pop(board, None)
        if key is not None:
            self.drained_keys.discard(key)

    # -- boards' reports -------------------------------------------------------

    def record(self, board: str, outcome: str) -> bool:
        """Count one session outcome; return True when it quarantines the board."""
        if outcome in FAILURES:
            self._failures.setdefault(board, collections.deque(maxlen=KEPT_FAILURES)).append(
                outcome
            )
            streak = self._streaks.get(board, 0) + 1
            self._streaks[board] = streak
            if streak >= self.quarantine_after and board not in self.quarantined:
                self.quarantined.add(board)
                return True
        elif outcome == "ok":
            self._streaks.pop(board, None)
        elif outcome == "health_ok" and board in self.quarantined:
            self.quarantined.discard(board)
            self._streaks.pop(board, None)
        return False

    def report(self, board: str, report: object) -> list[str]:
        """Count what a server reports about itself; return the outcomes counted.

        ``report`` is the UPDATE_INFO ``"tvmrpc"`` field of our servers:
        ``{"sessions": n, "last_session": {"outcome": o}, "health": {"checks": m,
        "ok": bool}}``, where ``n`` and ``m`` count since the server started.
        A count that went down means the server restarted: counted afresh.
        """
        if not isinstance(report, dict):
            return []
        sessions = _count(report.get("sessions"))
        health = report.get("health")
        if not isinstance(health, dict):
            health = {}
        checks = _count(health.get("checks"))
        seen_sessions, seen_checks = self._seen.get(board, (0, 0))
        counted = []
        if checks is not None and checks != seen_checks and checks > 0:
            counted.append("health_ok" if health.get("ok") is True else "health_failed")
        last = report.get("last_session")
        new_session = sessions is not None and sessions != seen_sessions and sessions > 0
        if new_session and isinstance(last, dict) and isinstance(last.get("outcome"), str):
            counted.append(last["outcome"])
        self._seen[board] = (
            sessions if sessions is not None else seen_sessions,
            checks if checks is not None else seen_checks,
        )
        for outcome in counted:
            self.record(board, outcome)
        return counted

    # -- queries ---------------------------------------------------------------

    def state(self, key: str, board: str) -> BoardState:
        """Whether ``board`` of ``key`` may be handed out, and if not why."""
        if board in self.drained_boards or key in self.drained_keys:
            return BoardState.DRAINED
        if board in self.quarantined:
            return BoardState.QUARANTINED
        return BoardState.AVAILABLE

    def available(self, key: str, board: str) -> bool:
        return self.state(key, board) is BoardState.AVAILABLE

    def failures(self, board: str) -> list[str]:
        """The board's most recent failed outcomes, oldest first."""
        return list(self._failures.get(board, ()))

    def streak(self, board: str) -> int:
        """Consecutive failed sessions of ``board`` so far."""
        return self._streaks.get(board, 0)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
