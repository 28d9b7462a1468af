"""Expected wait for a new request, from recent hold times of a key's boards.

Pure. Invariants:
- At most ``window`` hold times are kept per key (a fixed-size ring).
- With no hold time recorded yet the estimate is ``None`` (unknown), never 0.
- The estimate for a request at the back of the queue is the work ahead of it
  (the queued requests, plus the boards now busy finishing their sessions)
  shared across the key's boards, at the key's mean hold time.
"""

from __future__ import annotations

import collections

import attrs


@attrs.define
class WaitEstimator:
    """Recent hold times per key and the wait they imply."""

    window: int = 20
    _holds: dict[str, collections.deque[float]] = attrs.Factory(dict)

    def record(self, key: str, seconds: float) -> None:
        """A board of ``key`` was held ``seconds`` by one client."""
        ring = self._holds.setdefault(key, collections.deque(maxlen=self.window))
        ring.append(max(0.0, seconds))

    def mean_hold(self, key: str) -> float | None:
        ring = self._holds.get(key)
        return sum(ring) / len(ring) if ring else None

    def expected_wait(self, key: str, queued: int, free: int, busy: int) -> float | None:
        """Seconds a request joining the back of ``key``'s queue now should wait."""
        if free > queued:
            return 0.0
        mean = self.mean_hold(key)
        boards = free + busy
        if mean is None or boards == 0:
            return None
        # Sessions ahead: the queue, and half a hold left on average for each busy board.
        ahead = queued + busy / 2
        return mean * ahead / boards

    def forget(self, key: str) -> None:
        self._holds.pop(key, None)


@attrs.define
class Hold:
    """A board handed to a client: which key, since when."""

    key: str
    board: str
    since: float


@attrs.define
class HoldTracker:
    """Boards now held by clients, by the connection that PUT them.

    A hold starts when the tracker hands a board's resource to a client and
    ends when the same server connection PUTs again (the board is free once
    more) or closes. At most one hold per server connection: the board serves
    one session at a time.
    """

    _holds: dict[object, Hold] = attrs.Factory(dict)

    def start(self, owner: object, key: str, board: str, now: float) -> None:
        self._holds[owner] = Hold(key=key, board=board, since=now)

    def end(self, owner: object, now: float) -> tuple[Hold, float] | None:
        """End ``owner``'s hold, if any: the hold and how long it lasted."""
        hold = self._holds.pop(owner, None)
        return None if hold is None else (hold, max(0.0, now - hold.since))

    def busy(self, key: str) -> int:
        """How many boards of ``key`` are held now."""
        return sum(1 for hold in self._holds.values() if hold.key == key)

    def held(self) -> list[Hold]:
        return list(self._holds.values())
