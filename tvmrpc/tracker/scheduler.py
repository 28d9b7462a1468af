"""The tracker's scheduler: free resources and queued requests per key.

Pure: no sockets, no reactor. Owners are opaque hashable objects (the
tracker uses its connections). Invariants:

- Per key, a request with higher priority is served first, FIFO among equals;
  free resources are handed out oldest first.
- A request whose owner is gone is never served and never counted as pending:
  :meth:`Scheduler.drop_owner` removes it at once.
- Every resource an owner PUT and that is still free is removed when the owner
  is dropped, whether or not it sent UPDATE_INFO.
- A matchkey appears at most once among free resources: a PUT of a matchkey
  already free replaces the old entry.
- An owner's pending matchkeys are those it PUT that are still free.
- A free resource whose board (``addr:port``) the :class:`BoardRules` say is
  not available (drained, quarantined) is kept but never handed out, and is
  not counted as free; :meth:`Scheduler.rematch` hands it out once it is.
- The order of waiting requests is the queue's (:mod:`.queues`): stock's
  priority-then-FIFO by default, fair share across client hosts on request.
- A key is known (listed by :meth:`Scheduler.queue_info`) exactly while it has
  free resources, waiting requests, or a live owner that PUT under it (a
  server busy in a session keeps its key listed, as stock shows it); then it
  is forgotten, with everything stored for it, and ``on_forget`` is told.
- :attr:`Scheduler.generation` changes whenever anything :meth:`queue_info`
  or :meth:`pending_matchkeys` report may have changed (rule changes count
  once :meth:`Scheduler.rematch` is called), so callers can cache what they
  derive from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import attrs

from .boards import BoardRules
from .queues import FairShare, PriorityFifo, RequestQueue


@attrs.define(eq=False)
class Resource:
    """A free server slot: clients connect to ``addr:port`` presenting ``matchkey``."""

    key: str
    addr: str
    port: int
    matchkey: str
    owner: Hashable

    def value(self) -> list[Any]:
        """The REQUEST reply payload ``[addr, port, matchkey]``."""
        return [self.addr, self.port, self.matchkey]

    @property
    def board(self) -> str:
        """The board's name for drains and quarantine: ``addr:port``."""
        return board_name(self.addr, self.port)


def board_name(addr: str, port: int) -> str:
    """``addr:port``, with IPv6 addresses in brackets."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@attrs.define(eq=False)
class Request:
    """A queued REQUEST; ``live`` turns false when it is cancelled."""

    key: str
    user: str
    priority: float
    seq: int
    owner: Hashable
    host: str = ""
    live: bool = True


@attrs.frozen
class Assignment:
    """A resource handed to a request; the caller replies to ``request.owner``."""

    request: Request
    resource: Resource


@attrs.define(eq=False)
class _Owned:
    """What one owner PUT: its free resources and the keys it PUT under.

    One record per owner rather than a dict and a set in two tables: at
    10,000 boards each owner's containers count 10,000 times.
    """

    free: dict[str, Resource] = attrs.Factory(dict)  # matchkey -> Resource
    # Each counted once in that queue's holders. A tuple (48 bytes for one key,
    # a set is 216) while small; a set for an owner of many keys (a proxy).
    keys: tuple[str, ...] | set[str] = ()

    def add_key(self, key: str) -> bool:
        """Note that this owner PUT under ``key``; return whether it is new."""
        keys = self.keys
        if key in keys:
            return False
        if isinstance(keys, set):
            keys.add(key)
        elif len(keys) < _SMALL_KEYS:
            self.keys = (*keys, key)
        else:
            self.keys = {*keys, key}
        return True


_SMALL_KEYS = 8


@attrs.define(eq=False)
class _Queue:
    """The state of one key."""

    waiting: RequestQueue[Request]
    #: The one copy of the key that resources of this key keep (not one per PUT).
    key: str = ""
    free: dict[str, Resource] = attrs.Factory(dict)  # insertion order = FIFO
    holders: int = 0  # live owners that PUT under this key

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def idle(self) -> bool:
        return not self.free and not len(self.waiting) and not self.holders


class Scheduler:
    """Matches free resources with queued requests, per key."""

    def __init__(self, fair_share: bool = False, rules: BoardRules | None = None) -> None:
        self.fair_share = fair_share
        self.rules = rules if rules is not None else BoardRules()
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        # owner -> its free resources (the pending matchkeys) and the keys it PUT under
        self._owned: dict[Hashable, _Owned] = {}
        # owner -> its live requests
        self._requests: dict[Hashable, list[Request]] = {}
        # matchkey -> Resource, for replacement across keys and owners
        self._by_matchkey: dict[str, Resource] = {}
        #: Bumped on every change of state (see the module invariants).
        self.generation = 0
        #: Called with each key that is forgotten (e.g. to drop its statistics).
        self.on_forget: Callable[[str], None] | None = None

    # -- commands ------------------------------------------------------------

    def put(
        self, key: str, addr: str, port: int, matchkey: str, owner: Hashable
    ) -> list[Assignment]:
        """Add a free resource (replacing one with the same matchkey) and match."""
        self.generation += 1
        old = self._by_matchkey.get(matchkey)
        if old is not None:
            self._discard(old)
            self._collect(old.key)
        queue = self._queue(key)
        key = queue.key
        resource = Resource(key=key, addr=addr, port=port, matchkey=matchkey, owner=owner)
        owned = self._owned.get(owner)
        if owned is None:
            owned = self._owned[owner] = _Owned()
        if owned.add_key(key):
            queue.holders += 1
        queue.free[matchkey] = resource
        owned.free[matchkey] = resource
        self._by_matchkey[matchkey] = resource
        return self._match(key)

    def request(
        self, key: str, user: str, priority: float, owner: Hashable, host: str = ""
    ) -> tuple[Request, list[Assignment]]:
        """Queue a request from client ``host`` and match; it may be served at once."""
        self.generation += 1
        request = Request(
            key=key, user=user, priority=priority, seq=next(self._seq), owner=owner, host=host
        )
        queue = self._queue(key)
        queue.waiting.push(request)
        self._requests.setdefault(owner, []).append(request)
        return request, self._match(key)

    def rematch(self, key: str | None = None) -> list[Assignment]:
        """Match again after the rules changed (a resume, a quarantine lifted).

        Call it after every change of the rules: it also marks the state as
        changed (free counts depend on the rules).
        """
        self.generation += 1
        keys = [key] if key is not None else list(self._queues)
        assignments: list[Assignment] = []
        for name in keys:
            if name in self._queues:
                assignments += self._match(name)
        return assignments

    def drop_owner(self, owner: Hashable) -> None:
        """Forget an owner: cancel its requests and remove its free resources."""
        requests = self._requests.pop(owner, ())
        record = self._owned.pop(owner, None)
        owned, put_keys = (record.free, record.keys) if record is not None else ({}, ())
        if not (requests or owned or put_keys):
            return
        self.generation += 1
        touched = set(put_keys)
        for request in requests:
            if request.live:
                request.live = False
                self._queues[request.key].waiting.cancel(request)
                touched.add(request.key)
        for resource in list(owned.values()):
            self._discard(resource)
            touched.add(resource.key)
        for key in put_keys:
            self._queues[key].holders -= 1
        for key in touched:
            self._collect(key)

    def remove(self, matchkey: str) -> bool:
        """Remove a free resource by matchkey; return whether it was there."""
        resource = self._by_matchkey.get(matchkey)
        if resource is None:
            return False
        self.generation += 1
        self._discard(resource)
        self._collect(resource.key)
        return True

    # -- queries -------------------------------------------------------------

    def waiting_requests(self, owner: Hashable) -> int:
        """How many of ``owner``'s requests wait for a resource."""
        return len(self._requests.get(owner, ()))

    def pending_matchkeys(self, owner: Hashable) -> list[str]:
        """The matchkeys ``owner`` PUT that no request has taken yet."""
        owned = self._owned.get(owner)
        return list(owned.free) if owned is not None else []

    def queue_info(self) -> dict[str, dict[str, int]]:
        """``{key: {"free": n, "pending": m}}`` for every known key (see the invariants).

        ``free`` counts the resources that may be handed out now.
        """
        return {
            key: {"free": self._available_count(key, queue), "pending": queue.pending}
            for key, queue in self._queues.items()
        }

    def _available_count(self, key: str, queue: _Queue) -> int:
        if not (self.rules.drained_boards or self.rules.drained_keys or self.rules.quarantined):
            return len(queue.free)
        return sum(1 for r in queue.free.values() if self.rules.available(key, r.board))

    def free_resources(self, key: str) -> Iterator[Resource]:
        """The free resources of ``key``, oldest first."""
        queue = self._queues.get(key)
        return iter(list(queue.free.values())) if queue else iter(())

    # -- internals -----------------------------------------------------------

    def _queue(self, key: str) -> _Queue:
        queue = self._queues.get(key)
        if queue is None:
            waiting: RequestQueue[Request] = FairShare() if self.fair_share else PriorityFifo()
            queue = self._queues[key] = _Queue(waiting=waiting, key=key)
        return queue

    def known_keys(self) -> int:
        """How many keys the scheduler holds state for."""
        return len(self._queues)

    def _collect(self, key: str) -> None:
        """Forget ``key`` if nothing refers to it any more."""
        queue = self._queues.get(key)
        if queue is not None and queue.idle():
            del self._queues[key]
            if not self._queues:
                self._queues = {}  # a dict keeps its peak size; give that memory back
            if self.on_forget is not None:
                self.on_forget(key)

    def _discard(self, resource: Resource) -> None:
        self._queues[resource.key].free.pop(resource.matchkey, None)
        owned = self._owned.get(resource.owner)
        if owned is not None:
            owned.free.pop(resource.matchkey, None)
        if self._by_matchkey.get(resource.matchkey) is resource:
            del self._by_matchkey[resource.matchkey]
            if not self._by_matchkey:
                self._by_matchkey = {}  # as in _collect

    def _first_available(self, key: str, queue: _Queue) -> Resource | None:
        rules = self.rules
        for resource in queue.free.values():
            if rules.available(key, resource.board):
                return resource
        return None

    def _match(self, key: str) -> list[Assignment]:
        queue = self._queues[key]
        assignments = []
        while queue.free and queue.pending:
            resource = self._first_available(key, queue)
            if resource is None:
                break
            request = queue.waiting.pop()
            if request is None:
                break
            self._discard(resource)
            request.live = False
            owned_requests = self._requests.get(request.owner)
            if owned_requests is not None:
                owned_requests.remove(request)
                if not owned_requests:
                    del self._requests[request.owner]
            assignments.append(Assignment(request=request, resource=resource))
        return assignments
