"""Rate-limited reporting: say it the first time, then at most once per interval.

Used for log lines an operator must see once but that a misbehaving peer or
an unreachable target could otherwise repeat thousands of times (refused
connections, failed reconnects).

Invariants:
- Pure logic: the caller passes the current time; nothing here reads a clock
  or logs.
- The first event of a streak is always reported; later ones at most once per
  ``interval`` seconds, and each report carries how many were held back since
  the previous one, so no count is lost.
- :meth:`RateLimit.reset` ends a streak: the next event is reported at once.
"""

from __future__ import annotations

import attrs


@attrs.define
class RateLimit:
    """Decides which of a stream of events to report."""

    interval: float = 60.0
    _last: float | None = None
    _held: int = 0

    def event(self, now: float) -> int | None:
        """Record one event at ``now``.

        Returns ``None`` if it should not be reported, else the number of
        events held back since the last report (0 for the first of a streak).
        """
        if self._last is not None and now - self._last < self.interval:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held

    def reset(self) -> int:
        """End the streak; returns how many events were held back and never reported."""
        held, self._held, self._last = self._held, 0, None
        return held
