"""Twisted's endpoint-string grammar, the part our own parsers share.

**Invariants**
- Pure: no I/O, no Twisted import (the systemd activation parser runs before the reactor).
- ``:`` separates fields unless a backslash escapes it; a backslash keeps the next
  character as it is (a trailing backslash is dropped), as ``twisted.internet.endpoints``
  reads them.
"""

from __future__ import annotations


def split_colons(text: str) -> list[str]:
    """The ``:``-separated fields of ``text``, escapes resolved, empty fields kept."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts
