"""Tracker requests: validate a decoded JSON frame into a typed command.

Pure. Invariants:
- :func:`parse_command` accepts exactly the shapes stock clients and servers
  send and raises :class:`CommandError` for anything else (unknown code, wrong
  arity, wrong types), so the protocol can close that connection.
- Keys (PUT key, match key and custom address, REQUEST key) follow the shared
  grammar of :mod:`tvmrpc.codec.keys`, and UPDATE_INFO is reduced to what
  :func:`~tvmrpc.tracker.info.clean_info` keeps; a well-formed request that
  breaks those rules raises :class:`RefusedError` (a :class:`CommandError`), which
  the protocol answers with ``[FAIL, reason]`` and keeps the connection.
- Every value in a command is bounded: nothing a peer sends is stored larger
  than its key limits, and error messages show at most a short preview of
  the offending value (never a repr of arbitrary size or depth).
"""

from __future__ import annotations

import reprlib
from typing import Any, Union

import attrs

from ..boardauth import BOARD_AUTH, BOARD_CHALLENGE
from ..codec import MAX_KEY_CHARS, MAX_MATCHKEY_CHARS, TrackerCode, key_problem
from .info import InfoError, clean_info


class CommandError(ValueError):
    """A frame that is valid JSON but not a valid tracker request."""


class RefusedError(CommandError):
    """A well-formed request the tracker refuses (bad key, bad UPDATE_INFO value)."""


_preview_repr = reprlib.Repr()
_preview_repr.maxlevel = 2
_preview_repr.maxstring = 60
_preview_repr.maxother = 60


def preview(value: Any) -> str:
    """A short repr of a peer's value for messages (bounded length and depth)."""
    return _preview_repr.repr(value)[:80]


def _key(value: Any, what: str, max_chars: int = MAX_KEY_CHARS) -> str:
    # The common case inline (every PUT and REQUEST passes here); key_problem
    # is the one definition and gives the reason otherwise.
    if (
        type(value) is str
        and 0 < len(value) <= max_chars
        and value.isprintable()
        and " " not in value
    ):
        return value
    raise RefusedError(key_problem(value, what, max_chars) or f"{what} is not a valid key")


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


@attrs.frozen
class BoardChallenge:
    """Ours only (docs/security.md): ask for this connection's nonce."""


@attrs.frozen
class BoardAuth:
    """Ours only: prove the board secret for ``key`` (``proof`` is unchecked here)."""

    key: str
    proof: Any


Command = Union[  # noqa: UP007
    Ping,
    Stop,
    Put,
    RequestResource,
    UpdateInfo,
    Summary,
    GetPendingMatchkeys,
    BoardChallenge,
    BoardAuth,
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _arity(args: list[Any], *allowed: int) -> None:
    if len(args) not in allowed:
        expected = " or ".join(str(n) for n in allowed)
        raise CommandError(f"code {args[0]} takes {expected} elements, got {len(args)}")


def parse_command(value: Any) -> Command:
    """Turn one decoded frame into a command or raise :class:`CommandError`."""
    if not isinstance(value, list) or not value or not _is_int(value[0]):
        raise CommandError(
            f"a request is a list starting with an integer code, got {preview(value)}"
        )
    code = value[0]
    if code == TrackerCode.PING:
        _arity(value, 1)
        return Ping()
    if code == TrackerCode.STOP:
        _arity(value, 2)
        return Stop(value[1])
    if code == TrackerCode.PUT:
        _arity(value, 3, 4)
        slot = value[2]
        if not (isinstance(slot, list) and len(slot) == 2 and _is_int(slot[0])):
            raise CommandError(f"PUT wants [port, matchkey], got {preview(slot)}")
        if not 0 <= slot[0] <= 65535:
            raise CommandError(f"PUT port {slot[0]} out of range")
        key = _key(value[1], "PUT key")
        matchkey = _key(slot[1], "PUT matchkey", MAX_MATCHKEY_CHARS)
        custom_addr = value[3] if len(value) == 4 else None
        if custom_addr is not None:
            custom_addr = _key(custom_addr, "PUT custom address")
        return Put(key, slot[0], matchkey, custom_addr)
    if code == TrackerCode.REQUEST:
        _arity(value, 4)
        if not _is_number(value[3]):
            raise CommandError(f"REQUEST priority must be a number, got {preview(value[3])}")
        key = _key(value[1], "REQUEST key")
        # Stock ignores the user; keep a bounded form of it for logs.
        user = value[2] if isinstance(value[2], str) else preview(value[2])
        return RequestResource(key, user[:MAX_KEY_CHARS], value[3])
    if code == TrackerCode.UPDATE_INFO:
        _arity(value, 2)
        info = value[1]
        if not isinstance(info, dict):
            raise CommandError(f"UPDATE_INFO wants an object, got {preview(info)}")
        try:
            return UpdateInfo(clean_info(info))
        except InfoError as exc:
            raise RefusedError(str(exc)) from None
    if code == TrackerCode.SUMMARY:
        _arity(value, 1, 2)
        options = value[1] if len(value) == 2 else {}
        if not isinstance(options, dict):
            raise CommandError(f"SUMMARY options must be an object, got {preview(options)}")
        return Summary(extended=bool(options.get("tvmrpc")))
    if code == TrackerCode.GET_PENDING_MATCHKEYS:
        _arity(value, 1)
        return GetPendingMatchkeys()
    if code == BOARD_CHALLENGE:
        _arity(value, 1)
        return BoardChallenge()
    if code == BOARD_AUTH:
        _arity(value, 3)
        return BoardAuth(_key(value[1], "board key"), value[2])
    raise CommandError(f"unknown tracker code {code}")
