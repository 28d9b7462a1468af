"""One timer for many connections that must do something within the same timeout.

A tracker connection must send the tracker magic within the handshake
timeout. A ``callLater`` per connection costs a ``DelayedCall`` (about 400
bytes with its arguments) and a heap entry per connection, and as many
timer operations as connections; 10,000 boards connecting at once after a
restart made 10,000 of them. Every deadline here is "now + the same
timeout", so deadlines come in the order the items were added: an ordered
dict is the whole schedule, and one ``DelayedCall`` for its head is the only
timer.

Invariants:
- An item added at time ``t`` and not discarded is expired (``expire(item)``
  called once) at the first timer run at or after ``t + timeout``, never
  before; a discarded item is never expired.
- At most one ``DelayedCall`` is pending, and none while no item waits.
- Adding, discarding and expiring one item cost O(1).
- If the clock goes backwards, items added after the jump wait behind
  earlier ones: an expiry may come late by the jump, never early.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadlines:
    """Items that expire ``timeout`` seconds after they are added, unless discarded."""

    __slots__ = ("_clock", "_expire", "_items", "_timer", "timeout")

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[Any], None]) -> None:
        self._clock = clock
        self.timeout = timeout
        self._expire = expire
        self._items: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: Hashable) -> bool:
        return item in self._items

    def add(self, item: Hashable) -> None:
        """Expire ``item`` in ``timeout`` seconds unless it is discarded first."""
        self._items[item] = self._clock.seconds() + self.timeout
        if self._timer is None:
            self._timer = self._clock.callLater(self.timeout, self._run)

    def discard(self, item: Hashable) -> None:
        """Forget ``item`` (it did what it had to, or it is gone); no-op if not here."""
        if self._items.pop(item, None) is not None and not self._items:
            self.stop()

    def stop(self) -> None:
        """Cancel the timer (the items stay; the next ``add`` starts it again)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _run(self) -> None:
        self._timer = None
        items = self._items
        now = self._clock.seconds()
        while items:
            item, deadline = next(iter(items.items()))
            if deadline > now:
                if self._timer is None:  # ``expire`` may have added an item and a timer
                    self._timer = self._clock.callLater(deadline - now, self._run)
                return
            del items[item]
            self._expire(item)
