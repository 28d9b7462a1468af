"""Editing TVM's ``cmake/config.cmake``: pure text in, text and a change list out.

The file is a list of ``set(NAME VALUE)`` lines with comments between them.
Invariants: only the VALUE of existing ``set(...)`` lines changes (indentation
and trailing comments survive, every other line is kept byte for byte); an
option the file does not have is an error for ``--set`` and silently skipped
for the cross-build defaults.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from crossbuild.errors import CrossbuildError

# Off for every cross build: no LLVM on the board, no libbacktrace's autotools
# build for the target, no microTVM. Trees differ (newer ones call libbacktrace
# TVM_FFI_USE_LIBBACKTRACE and have no USE_MICRO): options a file lacks are skipped.
CROSS_DEFAULTS: dict[str, str] = {
    "USE_LLVM": "OFF",
    "USE_LIBBACKTRACE": "OFF",
    "TVM_FFI_USE_LIBBACKTRACE": "OFF",
    "USE_MICRO": "OFF",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SET_LINE = re.compile(
    r"^(?P<indent>[ \t]*)set[ \t]*\([ \t]*(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]+"
    r"(?P<value>[^)#]*?)[ \t]*\)(?P<tail>[ \t]*(?:#.*)?)$"
)


@dataclass(frozen=True)
class Change:
    """One option's value before and after (``old == new`` when already set)."""

    name: str
    old: str
    new: str


def parse_assignment(text: str) -> tuple[str, str]:
    """``"USE_OPENCL=ON"`` -> ``("USE_OPENCL", "ON")``; a one-line error otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name) or not value.strip():
        raise CrossbuildError(f"--set wants NAME=VALUE such as USE_OPENCL=ON, got {text!r}")
    return name, value.strip()


def options(text: str) -> dict[str, str]:
    """Every option ``set`` in ``text`` with its (last) raw value."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _SET_LINE.match(line)
        if match:
            found[match["name"]] = match["value"]
    return found


def _format_value(value: str) -> str:
    if value.startswith('"') or not re.search(r"[\s;()#\"]", value):
        return value
    return '"' + value.replace('"', '\\"') + '"'


def unknown_option_error(name: str, known: Iterable[str]) -> CrossbuildError:
    """The error for ``--set NAME=...`` when config.cmake has no NAME, with a close match."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return CrossbuildError(f"config.cmake has no option {name}{hint}")


def edit_config(
    text: str, settings: Mapping[str, str], defaults: Mapping[str, str] = CROSS_DEFAULTS
) -> tuple[str, list[Change]]:
    """Apply ``defaults`` (where present) then ``settings`` (must be present) to ``text``.

    Returns the new text and one Change per option touched, in file order.
    ``settings`` win over ``defaults``.
    """
    known = options(text)
    for name in settings:
        if name not in known:
            raise unknown_option_error(name, known)
    wanted = {k: v for k, v in defaults.items() if k in known}
    wanted.update(settings)
    changes: dict[str, Change] = {}
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        match = _SET_LINE.match(body)
        if match and match["name"] in wanted:
            name = match["name"]
            new = _format_value(wanted[name])
            body = f"{match['indent']}set({name} {new}){match['tail']}"
            changes[name] = Change(name, match["value"], new)
        out.append(body + ending)
    return "".join(out), list(changes.values())
