"""What the tracker keeps of an UPDATE_INFO: validated, bounded, nothing else.

Pure. Stock stores whatever dict a peer sends and echoes it in every
SUMMARY, so one peer can make SUMMARY huge, or break it for everyone with a
value nested too deep to encode. We keep only the fields the tracker uses and
one bounded extension field.

Invariants:
- :func:`clean_info` returns a dict holding only ``"key"`` (a valid key of at
  most :data:`MAX_INFO_KEY_CHARS`), ``"addr"`` (``[host or None, port]``)
  and :data:`EXTENSION_FIELD` (a dict whose JSON encoding is at most
  :data:`MAX_EXTENSION_BYTES` bytes and nested at most
  :data:`MAX_EXTENSION_DEPTH` deep); every other field is dropped.
- A field that is present but invalid raises :class:`InfoError` with a
  one-line reason; nothing of that update is to be stored.
- Nothing here recurses on peer data, so no input raises anything but
  :class:`InfoError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..codec.keys import MAX_KEY_CHARS, key_problem

#: Longest ``key`` of an UPDATE_INFO. Larger than a device key: a proxy
#: reports ``server:proxy[k1,k2,...]`` with every key it serves (our proxy
#: allows at most 340 keys of 256 characters: 87,395 characters).
MAX_INFO_KEY_CHARS = 128 * 1024
#: The one extension field our own servers and proxies use to report session
#: outcomes; it is stored and shown in SUMMARY's ``server_info`` as sent.
EXTENSION_FIELD = "tvmrpc"
#: Largest JSON encoding of the extension field, in bytes.
MAX_EXTENSION_BYTES = 4096
#: Deepest nesting of the extension field (the dict itself is depth 1).
MAX_EXTENSION_DEPTH = 4


class InfoError(ValueError):
    """An UPDATE_INFO whose fields are present but invalid."""


def clean_info(info: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``info`` the tracker stores, validated; raise InfoError if bad."""
    clean: dict[str, Any] = {}
    if "key" in info:
        problem = key_problem(info["key"], "UPDATE_INFO key", MAX_INFO_KEY_CHARS)
        if problem is not None:
            raise InfoError(problem)
        clean["key"] = info["key"]
    if "addr" in info:
        clean["addr"] = _addr(info["addr"])
    if EXTENSION_FIELD in info:
        clean[EXTENSION_FIELD] = _extension(info[EXTENSION_FIELD])
    return clean


def _addr(addr: Any) -> list[Any]:
    if not (isinstance(addr, list) and len(addr) == 2):
        raise InfoError("UPDATE_INFO addr must be [host or null, port]")
    host, port = addr
    if host is not None:
        problem = key_problem(host, "UPDATE_INFO addr host", MAX_KEY_CHARS)
        if problem is not None:
            raise InfoError(problem)
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535):
        raise InfoError("UPDATE_INFO addr port must be an integer in 0..65535")
    return [host, port]


def _extension(value: Any) -> dict[str, Any]:
    what = f"UPDATE_INFO field {EXTENSION_FIELD!r}"
    if not isinstance(value, dict):
        raise InfoError(f"{what} must be an object, got {type(value).__name__}")
    depth = nesting_depth(value, MAX_EXTENSION_DEPTH)
    if depth > MAX_EXTENSION_DEPTH:
        raise InfoError(f"{what} is nested more than {MAX_EXTENSION_DEPTH} deep")
    size = len(json.dumps(value).encode("utf-8"))
    if size > MAX_EXTENSION_BYTES:
        raise InfoError(f"{what} is {size} bytes as JSON (at most {MAX_EXTENSION_BYTES})")
    return value


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (scalars 0, ``{}`` 1), counted up to ``limit + 1``.

    Iterative, and stops as soon as the depth exceeds ``limit``, so a value
    nested a thousand deep costs no more than one nested ``limit + 1`` deep.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest
