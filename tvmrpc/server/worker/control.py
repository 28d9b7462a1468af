"""The control channel's messages, for both ends (pure: no sockets, no Twisted).

Two channels join the daemon and the zygote:

- **commands** (daemon → zygote, ``--command-fd``, a ``SOCK_SEQPACKET``
  socketpair): one record per command, a JSON object. ``{"cmd": "serve",
  "id": I, "dir": D}`` carries the session socket in the same record
  (SCM_RIGHTS, one ``sendmsg``); ``{"cmd": "check", "id": I}`` carries none.
- **events** (zygote → daemon, ``--control-fd``, a stream socketpair): one
  JSON line per event, see the classes below.

A record and the descriptors sent with it arrive together, so a session's
socket is paired with its ``serve`` command by construction, not by order
of arrival.

Invariants:
- :func:`parse_command` and :func:`parse_event` return a typed message or
  raise :class:`ControlError` whose text is one line naming what was wrong
  and quoting (a bounded prefix of) the message; they never raise anything
  else, whatever the bytes.
- A ``serve`` command is valid only with exactly one descriptor; every other
  command only with none. Descriptors of a refused command are the caller's
  to close (:attr:`ControlError.fds`).
- ``encode_*`` output is what ``parse_*`` reads back (round trip).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

#: Largest command record the zygote reads (a command is ~100 bytes).
MAX_RECORD = 65536
#: Most descriptors one record may carry before the kernel truncates (we need 1).
MAX_FDS = 4


class ControlError(ValueError):
    """A control message that cannot be obeyed; ``str()`` is one line naming it.

    ``id`` is the message's id when it had a usable one (so a refused
    ``serve`` can still end its session), ``fds`` the descriptors it carried.
    """

    def __init__(self, problem: str, raw: bytes, msg_id: int | None = None) -> None:
        super().__init__(f"{problem}: {_quote(raw)}")
        self.id = msg_id
        self.fds: list[int] = []


def _quote(raw: bytes) -> str:
    text = raw[:120].decode("utf-8", "replace").strip()
    return repr(text + ("..." if len(raw) > 120 else ""))


# -- commands (daemon -> zygote) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Serve:
    """Run one session on ``fd`` (the client's socket) in directory ``dir``."""

    id: int
    dir: str
    fd: int


@dataclasses.dataclass(frozen=True)
class Check:
    """Run the health check in a fresh worker."""

    id: int


Command = Serve | Check


def encode_command(command: Command) -> tuple[bytes, list[int]]:
    """The record and the descriptors to send with it in one ``sendmsg``."""
    if isinstance(command, Serve):
        body = {"cmd": "serve", "id": command.id, "dir": command.dir}
        return json.dumps(body).encode(), [command.fd]
    return json.dumps({"cmd": "check", "id": command.id}).encode(), []


def parse_command(record: bytes, fds: list[int], truncated: bool = False) -> Command:
    """One command record and the descriptors that came with it."""
    try:
        return _parse_command(record, fds, truncated)
    except ControlError as exc:
        exc.fds = list(fds)
        raise


def _parse_command(record: bytes, fds: list[int], truncated: bool) -> Command:
    if truncated:
        raise ControlError("command record or its descriptors truncated", record)
    message = _object(record)
    msg_id = _field(message, "id", int, record)
    cmd = message.get("cmd")
    if cmd == "serve":
        root = _field(message, "dir", str, record, msg_id)
        if len(fds) != 1:
            raise ControlError(f"serve needs one socket, got {len(fds)}", record, msg_id)
        return Serve(msg_id, root, fds[0])
    if cmd == "check":
        if fds:
            raise ControlError(f"check carries no socket, got {len(fds)}", record, msg_id)
        return Check(msg_id)
    raise ControlError(f"unknown command {cmd!r}", record, msg_id)


# -- events (zygote -> daemon) -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ready:
    """The zygote is warm; ``str_type_index`` is its runtime's raw-string type index."""

    name: ClassVar[str] = "ready"
    pid: int
    str_type_index: int


@dataclasses.dataclass(frozen=True)
class Failed:
    """The zygote could not start (one line: cause and fix); it exits next."""

    name: ClassVar[str] = "failed"
    error: str


@dataclasses.dataclass(frozen=True)
class Started:
    """Session ``id``'s worker ``pid`` has its socket."""

    name: ClassVar[str] = "started"
    id: int
    pid: int


@dataclasses.dataclass(frozen=True)
class Finished:
    """Session ``id``'s server loop returned (the worker is exiting)."""

    name: ClassVar[str] = "finished"
    id: int
    pid: int


@dataclasses.dataclass(frozen=True)
class Exited:
    """Session ``id``'s worker was reaped; ``code`` as :func:`os.waitstatus_to_exitcode`."""

    name: ClassVar[str] = "exited"
    id: int
    pid: int
    code: int


@dataclasses.dataclass(frozen=True)
class Refused:
    """A command was refused (one line why); for a ``serve``, its session is over."""

    name: ClassVar[str] = "refused"
    id: int | None
    error: str


@dataclasses.dataclass(frozen=True)
class SpareFailed:
    """A spare worker died before its session (a broken ``--init`` module)."""

    name: ClassVar[str] = "spare-failed"
    pid: int
    code: int


@dataclasses.dataclass(frozen=True)
class Checked:
    """A health check's verdict: ``error`` is empty when it passed."""

    name: ClassVar[str] = "checked"
    id: int
    ok: bool
    error: str


Event = Ready | Failed | Started | Finished | Exited | Refused | SpareFailed | Checked

#: The Python type of each annotation the event classes use (annotations are strings here).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "str": str,
    "bool": bool,
    "int | None": (int, type(None)),
}
_EVENTS: dict[str, Any] = {
    cls.name: cls
    for cls in (Ready, Failed, Started, Finished, Exited, Refused, SpareFailed, Checked)
}


def encode_event(event: Event) -> bytes:
    """One JSON line."""
    return json.dumps({"event": event.name, **dataclasses.asdict(event)}).encode() + b"\n"


def parse_event(line: bytes) -> Event:
    """One event line (without its newline)."""
    message = _object(line)
    name = message.get("event")
    cls = _EVENTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ControlError(f"unknown event {name!r}", line)
    values = {}
    for field in dataclasses.fields(cls):
        kind = _FIELD_TYPES[str(field.type)]
        values[field.name] = _field(message, field.name, kind, line)
    event: Event = cls(**values)
    return event


# -- internals ------------------------------------------------------------------------


def _object(raw: bytes) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ControlError(f"not JSON ({exc.__class__.__name__})", raw) from None
    except RecursionError:
        raise ControlError("JSON nested too deep", raw) from None
    if not isinstance(message, dict):
        raise ControlError("not a JSON object", raw)
    return message


def _field(
    message: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    raw: bytes,
    msg_id: int | None = None,
) -> Any:
    if name not in message:
        raise ControlError(f"field {name!r} missing", raw, msg_id)
    value = message[name]
    # bool is an int in Python; JSON true is not an id, pid or code.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ControlError(f"field {name!r} has the wrong type", raw, msg_id)
    return value
