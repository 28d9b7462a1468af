"""Bounds on what peers can make the proxy hold: early bytes and advertised keys.

Pure logic: no sockets, no reactor. The switchboard owns one of each.

Invariants:
- :class:`EarlyBudget`: the bytes held for one leg never exceed ``per_leg``
  and the bytes held for all legs together never exceed ``total``; a
  :meth:`~EarlyBudget.take` that would break either bound is refused, says
  why in one line and changes nothing. :meth:`~EarlyBudget.release` returns
  a leg's bytes to the pool (idempotent).
- :class:`DeviceKeys`: at most ``limit`` distinct device keys are held at
  once. A key is held exactly while at least one leg admitted under it has
  not been released, so :meth:`~DeviceKeys.keys` shrinks as servers leave.
  A leg is admitted at most once; a new key beyond the limit is refused and
  changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable

from ..codec import MAX_FRAME_BYTES, MAX_KEY_CHARS

#: Default bytes one leg may send after its handshake and before it is paired.
#: Stock peers send none (the handshake is lock-step; the stock proxy closes
#: a connection that does).
DEFAULT_EARLY_BYTES = 64 * 1024
#: Default bytes all waiting legs together may have sent before pairing.
DEFAULT_EARLY_TOTAL = 4 * 1024 * 1024
#: Default number of distinct device keys advertised to the tracker.
DEFAULT_SERVER_KEYS = 128
#: Bytes one key may take in the UPDATE_INFO frame at worst: JSON escapes a
#: character outside ASCII as a surrogate pair, 12 bytes; plus the comma.
WORST_KEY_BYTES = 12 * MAX_KEY_CHARS + 1
#: The most device keys ``--max-server-keys`` allows: even at worst their
#: UPDATE_INFO frame stays under the tracker's frame limit, with 1 KiB spare.
MAX_SERVER_KEYS = (MAX_FRAME_BYTES - 1024) // WORST_KEY_BYTES


class EarlyBudget:
    """Bytes held for legs before they are paired, bounded per leg and in total."""

    def __init__(self, per_leg: int = DEFAULT_EARLY_BYTES, total: int = DEFAULT_EARLY_TOTAL):
        if per_leg < 0 or total < 0:
            raise ValueError("early-byte bounds must not be negative")
        self.per_leg = per_leg
        self.total = total
        self._held: dict[Hashable, int] = {}
        #: Bytes held for all legs together.
        self.held_total = 0

    def take(self, leg: Hashable, nbytes: int) -> str | None:
        """Hold ``nbytes`` more for ``leg``; ``None`` if allowed, else why not."""
        mine = self._held.get(leg, 0) + nbytes
        if mine > self.per_leg:
            return (
                f"sent {mine} bytes before being paired "
                f"(at most {self.per_leg} per connection, --max-early-bytes)"
            )
        if self.held_total + nbytes > self.total:
            return (
                f"sent {mine} bytes before being paired while waiting connections "
                f"already hold {self.held_total} (at most {self.total} in total, "
                f"--max-early-total)"
            )
        if nbytes:
            self._held[leg] = mine
            self.held_total += nbytes
        return None

    def held(self, leg: Hashable) -> int:
        return self._held.get(leg, 0)

    def release(self, leg: Hashable) -> int:
        """Forget what ``leg`` held (paired or closed); return how much that was."""
        nbytes = self._held.pop(leg, 0)
        self.held_total -= nbytes
        return nbytes


class Admission(enum.Enum):
    """What :meth:`DeviceKeys.admit` decided."""

    NEW = "new"  # the key was not held before: the advertised set grew
    KNOWN = "known"  # another leg holds the key already
    FULL = "full"  # a new key, but ``limit`` keys are held: refused


class DeviceKeys:
    """Device keys of the servers present at the proxy, counted per leg, bounded."""

    def __init__(self, limit: int = DEFAULT_SERVER_KEYS) -> None:
        if limit < 1:
            raise ValueError("the device-key limit must be at least 1")
        self.limit = limit
        self._count: dict[str, int] = {}
        self._key_of: dict[Hashable, str] = {}

    def admit(self, leg: Hashable, key: str) -> Admission:
        """``leg`` is a server with device ``key``; hold the key for it if allowed."""
        if leg in self._key_of:
            raise ValueError("leg is already admitted")
        count = self._count.get(key, 0)
        if count == 0 and len(self._count) >= self.limit:
            return Admission.FULL
        self._count[key] = count + 1
        self._key_of[leg] = key
        return Admission.NEW if count == 0 else Admission.KNOWN

    def release(self, leg: Hashable) -> str | None:
        """``leg`` left; return its key if no leg holds that key any more, else None."""
        key = self._key_of.pop(leg, None)
        if key is None:
            return None
        count = self._count[key] - 1
        if count:
            self._count[key] = count
            return None
        del self._count[key]
        return key

    def keys(self) -> frozenset[str]:
        """The device keys held now."""
        return frozenset(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)
