"""Tracker requests: validate a decoded JSON frame into a typed command.

Pure. :func:`parse_command` accepts exactly the shapes stock clients and
servers send and raises :class:`CommandError` for anything else (unknown
code, wrong arity, wrong types), so the protocol can close that connection.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from ..codec import TrackerCode


class CommandError(ValueError):
    """A frame that is valid JSON but not a valid tracker request."""


@attrs.frozen
class Ping:
    pass


@attrs.frozen
class Stop:
    stop_key: Any


@attrs.frozen
class Put:
    key: str
    port: int
    matchkey: str
    custom_addr: str | None


@attrs.frozen
class RequestResource:
    key: str
    user: str
    priority: float


@attrs.frozen
class UpdateInfo:
    info: dict[str, Any]


@attrs.frozen
class Summary:
    """SUMMARY; ``extended`` when the client asked for our extra fields."""

    extended: bool = False


@attrs.frozen
class GetPendingMatchkeys:
    pass


Command = Union[Ping, Stop, Put, RequestResource, UpdateInfo, Summary, GetPendingMatchkeys]  # noqa: UP007


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _arity(args: list[Any], *allowed: int) -> None:
    if len(args) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise CommandError(f"code {args[0]} takes {expected} elements, got {len(args)}")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{what} must be a string, got {value!r:.80}")
    return value


def parse_command(value: Any) -> Command:
    """Turn one decoded frame into a command or raise :class:`CommandError`."""
    if not isinstance(value, list) or not value or not _is_int(value[0]):
        raise CommandError(f"a request is a list starting with an integer code, got {value!r:.80}")
    code = value[0]
    if code == TrackerCode.PING:
        _arity(value, 1)
        return Ping()
    if code == TrackerCode.STOP:
        _arity(value, 2)
        return Stop(value[1])
    if code == TrackerCode.PUT:
        _arity(value, 3, 4)
        key = _string(value[1], "PUT key")
        slot = value[2]
        if not (isinstance(slot, list) and len(slot) == 2 and _is_int(slot[0])):
            raise CommandError(f"PUT wants [port, matchkey], got {slot!r:.80}")
        if not 0 <= slot[0] <= 65535:
            raise CommandError(f"PUT port {slot[0]} out of range")
        matchkey = _string(slot[1], "PUT matchkey")
        custom_addr = value[3] if len(value) == 4 else None
        if custom_addr is not None:
            custom_addr = _string(custom_addr, "PUT custom address")
        return Put(key, slot[0], matchkey, custom_addr)
    if code == TrackerCode.REQUEST:
        _arity(value, 4)
        key = _string(value[1], "REQUEST key")
        user = value[2] if isinstance(value[2], str) else str(value[2])
        if not _is_number(value[3]):
            raise CommandError(f"REQUEST priority must be a number, got {value[3]!r:.80}")
        return RequestResource(key, user, value[3])
    if code == TrackerCode.UPDATE_INFO:
        _arity(value, 2)
        info = value[1]
        if not isinstance(info, dict):
            raise CommandError(f"UPDATE_INFO wants an object, got {info!r:.80}")
        if "key" in info and not isinstance(info["key"], str):
            raise CommandError("UPDATE_INFO key must be a string")
        addr = info.get("addr")
        if addr is not None and not (isinstance(addr, list) and len(addr) == 2):
            raise CommandError(f"UPDATE_INFO addr must be [host, port], got {addr!r:.80}")
        return UpdateInfo(info)
    if code == TrackerCode.SUMMARY:
        _arity(value, 1, 2)
        options = value[1] if len(value) == 2 else {}
        if not isinstance(options, dict):
            raise CommandError(f"SUMMARY options must be an object, got {options!r:.80}")
        return Summary(extended=bool(options.get("tvmrpc")))
    if code == TrackerCode.GET_PENDING_MATCHKEYS:
        _arity(value, 1)
        return GetPendingMatchkeys()
    raise CommandError(f"unknown tracker code {code}")
