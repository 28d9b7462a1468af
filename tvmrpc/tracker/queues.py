"""Waiting REQUESTs of one key, in the order they are served.

Pure. Two orders share one small interface so the scheduler need not know
which is in force:

- :class:`PriorityFifo` (stock's order, the default): higher priority first,
  FIFO among equals.
- :class:`FairShare` (``--fair-share``): higher priority first; among equal
  priorities, round-robin across client hosts, FIFO within one host.

Invariants (both):
- :meth:`pop` returns live requests only; a cancelled request is never
  returned, and ``len()`` counts live requests only.
- A request is returned by :meth:`pop` at most once.
- Memory is bounded by the live requests: cancelled entries are compacted
  once they outnumber the live ones.
"""

from __future__ import annotations

import collections
import heapq
from typing import Generic, Protocol, TypeVar

import attrs


class Waiting(Protocol):
    """What a queue needs of a request."""

    priority: float
    seq: int
    host: str
    live: bool


W = TypeVar("W", bound=Waiting)


class RequestQueue(Protocol[W]):
    def push(self, request: W) -> None: ...
    def pop(self) -> W | None: ...
    def cancel(self, request: W) -> None: ...
    def __len__(self) -> int: ...


@attrs.define
class PriorityFifo(Generic[W]):
    """Stock's order: a heap on (-priority, arrival)."""

    _heap: list[tuple[float, int, W]] = attrs.Factory(list)
    _live: int = 0

    def push(self, request: W) -> None:
        heapq.heappush(self._heap, (-request.priority, request.seq, request))
        self._live += 1

    def pop(self) -> W | None:
        while self._heap:
            _, _, request = heapq.heappop(self._heap)
            if request.live:
                self._live -= 1
                return request
        return None

    def cancel(self, request: W) -> None:
        """Count ``request`` (already marked not live) out; compact when worthwhile."""
        self._live -= 1
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [entry for entry in self._heap if entry[2].live]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return self._live


@attrs.define
class FairShare(Generic[W]):
    """Priority first; within a priority, round-robin over hosts, FIFO per host.

    ``_levels`` maps a priority to an ordered dict host -> deque of requests;
    the dict's order is the round-robin order: a host that was just served
    moves to the back, a new host joins at the back.
    """

    _levels: dict[float, dict[str, collections.deque[W]]] = attrs.Factory(dict)
    _live: int = 0
    _dead: int = 0

    def push(self, request: W) -> None:
        hosts = self._levels.setdefault(request.priority, {})
        hosts.setdefault(request.host, collections.deque()).append(request)
        self._live += 1

    def pop(self) -> W | None:
        for priority in sorted(self._levels, reverse=True):
            hosts = self._levels[priority]
            for host in list(hosts):
                waiting = hosts.pop(host)
                while waiting and not waiting[0].live:
                    waiting.popleft()
                    self._dead -= 1
                if not waiting:
                    continue
                request = waiting.popleft()
                if waiting:
                    hosts[host] = waiting  # to the back of the round
                self._live -= 1
                if not hosts:
                    del self._levels[priority]
                return request
            del self._levels[priority]
        return None

    def cancel(self, request: W) -> None:
        self._live -= 1
        self._dead += 1
        if self._dead > self._live + 64:
            for priority in list(self._levels):
                hosts = self._levels[priority]
                for host in list(hosts):
                    kept = collections.deque(r for r in hosts[host] if r.live)
                    if kept:
                        hosts[host] = kept
                    else:
                        del hosts[host]
                if not hosts:
                    del self._levels[priority]
            self._dead = 0

    def __len__(self) -> int:
        return self._live
