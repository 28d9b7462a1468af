"""Socket activation: ``--listen systemd:domain=INET:index=0`` (or ``:name=N``).

systemd (or ``systemd-socket-activate``) passes listening sockets as fds 3..
with ``LISTEN_PID``, ``LISTEN_FDS`` and, when names are known,
``LISTEN_FDNAMES``. Twisted 26's ``systemd:`` endpoint parser reads these once,
when ``twisted.internet.endpoints`` is first imported, removes ``LISTEN_FDS``
and ``LISTEN_PID`` from the environment, and finds *no* descriptor at all when
``LISTEN_FDNAMES`` is missing (``systemd-socket-activate`` without
``--fdname``, supervisors other than systemd): ``index=0`` then raises a bare
``IndexError``. This module is the one workaround: it reads the variables
itself, as early as ``import tvmrpc`` (before anything imports Twisted's
endpoints), names unnamed descriptors ``unknown`` the way
``sd_listen_fds_with_names(3)`` does, and adopts the socket with Twisted's
public ``AdoptedStreamServerEndpoint``. tests/test_systemd_activation.py pins
the Twisted behaviour this relies on.

Invariants:
- Importing this module touches only ``os.environ`` (no Twisted, no I/O): the
  worker processes import ``tvmrpc`` too and must stay Twisted-free.
- Descriptors are taken only when ``LISTEN_PID`` is this process; the
  ``LISTEN_*`` variables are then removed so children do not inherit them.
- ``server_endpoint`` never raises: a description that cannot be served
  gives an endpoint whose ``listen()`` fails with a one-line
  :class:`ActivationError` that says what to do.
- Descriptions that do not start with ``systemd:`` go to Twisted's
  ``serverFromString`` unchanged.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..endpointstr import split_colons

LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
UNNAMED = "unknown"
FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


class ActivationError(Exception):
    """A ``systemd:`` endpoint that names no inherited socket."""


@dataclass(frozen=True)
class Inherited:
    """The sockets passed to this process: fds and their names (same length)."""

    descriptors: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.descriptors:
            return "no sockets were passed (LISTEN_FDS is unset or not for this process)"
        pairs = ", ".join(f"{i}: fd {fd} {name!r}" for i, (fd, name) in enumerate(self))
        return f"passed sockets are {pairs}"

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(zip(self.descriptors, self.names, strict=True))


@dataclass(frozen=True)
class SystemdSpec:
    """A parsed ``systemd:domain=D:index=I`` / ``systemd:domain=D:name=N`` string."""

    family: int
    index: int | None = None
    name: str | None = None


def inherited_from(environ: MutableMapping[str, str], pid: int, *, unset: bool) -> Inherited:
    """The sockets ``environ`` passes to ``pid``; missing names become ``unknown``."""
    if environ.get("LISTEN_PID") != str(pid):
        return Inherited()
    try:
        count = max(int(environ.get("LISTEN_FDS", "")), 0)
    except ValueError:
        count = 0
    given = environ.get("LISTEN_FDNAMES", "").split(":")
    names = [(given[i] if i < len(given) else "") or UNNAMED for i in range(count)]
    if unset:
        for name in LISTEN_VARIABLES:
            environ.pop(name, None)
    return Inherited(tuple(range(LISTEN_FDS_START, LISTEN_FDS_START + count)), tuple(names))


def parse_systemd(description: str) -> SystemdSpec:
    """Parse a ``systemd:`` endpoint string; raise :class:`ActivationError` if malformed."""
    _, _, rest = description.partition(":")
    fields: dict[str, str] = {}
    for part in _split(rest):
        key, sep, value = part.partition("=")
        if not sep:
            raise ActivationError(f"{description}: expected key=value, got {part!r}")
        fields[key] = value
    unknown = set(fields) - {"domain", "index", "name"}
    if unknown:
        raise ActivationError(f"{description}: unknown option(s) {', '.join(sorted(unknown))}")
    family = FAMILIES.get(fields.get("domain", ""))
    if family is None:
        raise ActivationError(f"{description}: domain= must be INET, INET6 or UNIX")
    if ("index" in fields) == ("name" in fields):
        raise ActivationError(f"{description}: give exactly one of index=N or name=NAME")
    if "index" in fields:
        if not fields["index"].isdigit():
            raise ActivationError(f"{description}: index= wants a number, got {fields['index']!r}")
        return SystemdSpec(family, index=int(fields["index"]))
    return SystemdSpec(family, name=fields["name"])


def choose(spec: SystemdSpec, inherited: Inherited) -> int:
    """The fd ``spec`` names among ``inherited``; raise :class:`ActivationError` if none."""
    if spec.index is not None:
        if spec.index < len(inherited.descriptors):
            return inherited.descriptors[spec.index]
        wanted = f"index={spec.index}"
    else:
        for fd, name in inherited:
            if name == spec.name:
                return fd
        wanted = f"name={spec.name}"
    raise ActivationError(
        f"no inherited socket for {wanted}: {inherited.describe()}; start the daemon from its "
        "systemd .socket unit (or systemd-socket-activate), or use --listen tcp:PORT"
    )


def _split(text: str) -> list[str]:
    """The non-empty ``:``-separated fields of ``text`` (Twisted's endpoint grammar)."""
    return [p for p in split_colons(text) if p]


#: What systemd passed to this process, read once at import (see the module docstring).
INHERITED = inherited_from(os.environ, os.getpid(), unset=True)


def check(description: str, inherited: Inherited | None = None) -> tuple[int, int]:
    """(fd, family) a ``systemd:`` description names; raise :class:`ActivationError` if none.

    For start-up checks at option parsing time: the message is the one line
    the operator sees.
    """
    spec = parse_systemd(description)
    fd = choose(spec, INHERITED if inherited is None else inherited)
    return fd, socket_family(fd) or spec.family


def server_endpoint(reactor: Any, description: str, inherited: Inherited | None = None) -> Any:
    """An ``IStreamServerEndpoint`` for ``description`` (``systemd:`` handled here)."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

    if not description.startswith("systemd:"):
        return serverFromString(reactor, description)
    try:
        fd, family = check(description, inherited)
    except ActivationError as exc:
        return _Unavailable(exc)
    return AdoptedStreamServerEndpoint(reactor, fd, family)


def socket_family(fd: int) -> int | None:
    """The address family of the socket ``fd`` (systemd's ``ListenStream=9190`` is INET6)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.family
    finally:
        sock.detach()


class _Unavailable:
    """An endpoint whose ``listen`` fails with the reason (see ``server_endpoint``)."""

    def __init__(self, error: ActivationError) -> None:
        self.error = error

    def listen(self, factory: Any) -> Any:
        from twisted.internet import defer

        return defer.fail(self.error)
