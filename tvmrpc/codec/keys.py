"""The device-key grammar shared by the tracker, the proxy and the server.

Pure. A key names a kind of board (``rk3399``, ``proxy[k1,k2]``); match keys
are ``<key>:<random>``. Stock accepts any string; we bound keys so that one
peer cannot bloat a daemon's state or its replies.

Invariants:
- A valid key is 1..:data:`MAX_KEY_CHARS` characters (or 1..``max_chars``
  where a caller gives a larger bound, e.g. match keys and the tracker's
  ``server:proxy[...]`` info keys), each printable and not whitespace
  (whitespace separates handshake options on the wire).
- :func:`key_problem` returns ``None`` for every valid key and a one-line
  reason for every other value; :func:`check_key` raises :class:`BadKeyError` with
  that reason.
"""

from __future__ import annotations

#: Longest key accepted at PUT, REQUEST, UPDATE_INFO and the RPC handshake.
#: Real keys are tens of characters; match keys add a colon and a number.
MAX_KEY_CHARS = 256
#: Longest match key (``<key>:<random>``): a key plus room for the random part.
MAX_MATCHKEY_CHARS = MAX_KEY_CHARS + 64


class BadKeyError(ValueError):
    """A key that is empty, too long or has whitespace or control characters."""


def key_problem(key: object, what: str = "key", max_chars: int = MAX_KEY_CHARS) -> str | None:
    """Why ``key`` is not a valid key, or ``None`` if it is."""
    if not isinstance(key, str):
        return f"{what} must be a string, got {type(key).__name__}"
    if not key:
        return f"{what} is empty"
    if len(key) > max_chars:
        return f"{what} is {len(key)} characters long (at most {max_chars})"
    # str.isprintable() is false for every whitespace character but the ASCII
    # space (all others are control characters or separators), so one C-speed
    # call plus a search for " " is the whole check (the tracker's hot path).
    if not key.isprintable() or " " in key:
        return f"{what} {key[:40]!r} has whitespace or control characters"
    return None


def check_key(key: object, what: str = "key", max_chars: int = MAX_KEY_CHARS) -> str:
    """Return ``key`` if valid, else raise :class:`BadKeyError` saying why."""
    problem = key_problem(key, what, max_chars)
    if problem is not None:
        raise BadKeyError(problem)
    return key  # type: ignore[return-value]
