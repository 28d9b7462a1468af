"""The proxy's pairing table: who waits for whom, by role and match key.

Pure logic: no sockets, no reactor; time comes in as ``now`` arguments.

Invariants:
- At most one waiter per (role, match key); a second one is a duplicate and
  is not recorded.
- A waiter is in the table exactly until it is paired, withdrawn, expired or
  re-keyed (then it waits under its new key); every waiting leg appears once.
- A leg that arrives finds a waiting peer of the other role with the same
  match key, or waits (if ``may_wait``), or is refused; it never pairs with
  its own role.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

import attrs

from ..codec import random_matchkey, split_matchkey

L = TypeVar("L", bound=Hashable)

SERVER = "server"
CLIENT = "client"
ROLES = (SERVER, CLIENT)


def other(role: str) -> str:
    """The role a leg of ``role`` pairs with."""
    return CLIENT if role == SERVER else SERVER


@attrs.frozen
class Paired(Generic[L]):
    """The arriving leg pairs with ``peer``, which no longer waits."""

    peer: L


@attrs.frozen
class Waiting:
    """The arriving leg waits under ``matchkey`` until ``deadline`` (or forever if None)."""

    matchkey: str
    deadline: float | None


@attrs.frozen
class Duplicate:
    """Another leg of the same role already waits under this match key."""


@attrs.frozen
class NoMatch:
    """No peer waits and this leg may not wait (a client in tracker mode)."""


Outcome = Paired | Waiting | Duplicate | NoMatch


@attrs.define
class _Entry(Generic[L]):
    role: str
    matchkey: str
    deadline: float | None


class PairingTable(Generic[L]):
    """Waiting legs by role and match key, with deadlines and tracker bookkeeping."""

    def __init__(self) -> None:
        self._waiting: dict[str, dict[str, L]] = {role: {} for role in ROLES}
        self._entries: dict[L, _Entry[L]] = {}
        # Tracker mode: when each server key was first seen missing from the
        # tracker's pending set (handed out to a client that has not come).
        self._missing_since: dict[str, float] = {}

    # -- arrivals and departures ---------------------------------------------

    def arrive(
        self,
        leg: L,
        role: str,
        matchkey: str,
        now: float,
        timeout: float | None,
        may_wait: bool = True,
    ) -> Outcome:
        """Record ``leg`` arriving as ``role`` with ``matchkey``; say what happens."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if leg in self._entries:
            raise ValueError("leg is already waiting")
        peers = self._waiting[other(role)]
        peer = peers.pop(matchkey, None)
        if peer is not None:
            del self._entries[peer]
            self._missing_since.pop(matchkey, None)
            return Paired(peer)
        if not may_wait:
            return NoMatch()
        if matchkey in self._waiting[role]:
            return Duplicate()
        deadline = None if timeout is None else now + timeout
        self._waiting[role][matchkey] = leg
        self._entries[leg] = _Entry(role, matchkey, deadline)
        return Waiting(matchkey, deadline)

    def withdraw(self, leg: L) -> bool:
        """Forget ``leg`` (it closed); return whether it was waiting."""
        entry = self._entries.pop(leg, None)
        if entry is None:
            return False
        del self._waiting[entry.role][entry.matchkey]
        self._missing_since.pop(entry.matchkey, None)
        return True

    def expire(self, now: float) -> list[L]:
        """Remove and return every leg whose deadline is at or before ``now``."""
        due = [
            leg
            for leg, entry in self._entries.items()
            if entry.deadline is not None and entry.deadline <= now
        ]
        for leg in due:
            self.withdraw(leg)
        return due

    # -- queries --------------------------------------------------------------

    def is_waiting(self, leg: L) -> bool:
        return leg in self._entries

    def matchkey_of(self, leg: L) -> str | None:
        entry = self._entries.get(leg)
        return None if entry is None else entry.matchkey

    def waiting(self, role: str) -> dict[str, L]:
        """A copy of the waiting legs of ``role`` by match key."""
        return dict(self._waiting[role])

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._entries.values() if e.deadline is not None]
        return min(deadlines, default=None)

    def __len__(self) -> int:
        return len(self._entries)

    # -- tracker mode ---------------------------------------------------------

    def fresh_server_key(self, key: str) -> str:
        """A new match key ``<key>:<random>`` that no waiting server uses."""
        return random_matchkey(key, frozenset(self._waiting[SERVER]))

    def rekey(self, old: str) -> str:
        """Move the server waiting under ``old`` to a fresh key; return the new key."""
        leg = self._waiting[SERVER].pop(old)
        new = random_matchkey(split_matchkey(old), frozenset(self._waiting[SERVER]) | {old})
        self._waiting[SERVER][new] = leg
        self._entries[leg].matchkey = new
        self._missing_since.pop(old, None)
        return new

    def rekey_all(self) -> list[str]:
        """Re-key every waiting server (the tracker forgot them); return the new keys."""
        return [self.rekey(old) for old in list(self._waiting[SERVER])]

    def stale_server_keys(self, pending: Iterable[str], now: float, grace: float) -> list[str]:
        """Server keys the tracker handed out but no client used within ``grace`` seconds.

        A waiting server key missing from the tracker's ``pending`` set was
        assigned to a client; if that client has not arrived ``grace`` seconds
        after we first noticed, the key is stale and should be re-keyed and
        PUT again. Keys back in ``pending`` (or paired) are forgotten.
        """
        pending = set(pending)
        stale = []
        for matchkey in self._waiting[SERVER]:
            if matchkey in pending:
                self._missing_since.pop(matchkey, None)
                continue
            since = self._missing_since.setdefault(matchkey, now)
            if now - since >= grace:
                stale.append(matchkey)
        return stale
