"""systemd's notify protocol (``Type=notify``), spoken over a datagram socket.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract socket
name written with a leading ``@``); the service sends newline-separated
``KEY=VALUE`` assignments in one datagram: ``READY=1`` once it serves,
``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` when it shuts down and
``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds when the unit
sets ``WatchdogSec=``. No C library is needed: it is one ``sendto``.

Invariants:
- Without ``NOTIFY_SOCKET`` every method is a no-op (a daemon started by hand
  or by a test behaves exactly as before).
- Nothing blocks the reactor: the socket is non-blocking and a datagram the
  manager cannot take at once is dropped with one log line, never retried.
- ``READY=1`` is sent at most once per process, and only once the reactor
  runs (accepts connections, handles SIGTERM); ``STOPPING=1`` at most once.
- The watchdog pings only when ``WATCHDOG_USEC`` is set and ``WATCHDOG_PID``
  is unset or names this process, every half of ``WATCHDOG_USEC``.
- The notify variables are removed from ``os.environ`` when read, so worker
  processes started later do not talk to systemd as if they were the daemon.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class NotifyConfigError(ValueError):
    """``NOTIFY_SOCKET`` or ``WATCHDOG_USEC`` cannot be understood."""


# -- pure logic --------------------------------------------------------------------


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value (``@name`` is abstract)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise NotifyConfigError(f"NOTIFY_SOCKET must be a path or start with '@', got {value!r}")


def message(**fields: str | int) -> bytes:
    """One datagram: ``KEY=VALUE`` lines (``status`` becomes ``STATUS``); no newlines in values."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key.upper()}={text}")
    return "\n".join(lines).encode("utf-8")


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not asked."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        raise NotifyConfigError(f"WATCHDOG_USEC must be microseconds, got {usec!r}") from None
    if value <= 0:
        return None
    return value / 2e6


# -- the notifier --------------------------------------------------------------------


@attrs.define
class Notifier:
    """Sends notify datagrams to ``address`` (None: a no-op notifier)."""

    reactor: Any
    address: str | bytes | None = None
    watchdog_every: float | None = None
    _socket: socket.socket | None = attrs.field(default=None, init=False)
    _ready: bool = attrs.field(default=False, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _watchdog: LoopingCall | None = attrs.field(default=None, init=False)
    _last_status: str | None = attrs.field(default=None, init=False)

    @classmethod
    def from_environment(
        cls, reactor: Any, environ: MutableMapping[str, str] | None = None
    ) -> Notifier:
        """Read (and remove) the notify variables systemd passed to this process."""
        env = os.environ if environ is None else environ
        try:
            raw = env.get("NOTIFY_SOCKET")
            address = socket_address(raw) if raw else None
            every = watchdog_interval(env, os.getpid())
        except NotifyConfigError as exc:
            log.warn("not talking to systemd: {err}", err=str(exc))
            address, every = None, None
        for name in NOTIFY_VARIABLES:
            env.pop(name, None)
        return cls(reactor, address, every)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram; False when disabled or the manager could not take it."""
        if self.address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        try:
            self._socket.sendto(message(**fields), self.address)
        except OSError as exc:
            log.warn("systemd notify to {address!r} failed: {err}", address=self.address, err=exc)
            return False
        return True

    def ready(self, status: str) -> None:
        """``READY=1`` (once) with a status line, once the reactor runs.

        twistd starts services before ``reactor.run()``: a port may be bound
        before the reactor accepts on it or handles SIGTERM, so READY waits.
        """
        if not getattr(self.reactor, "running", True):
            self.reactor.callWhenRunning(self.ready, status)
            return
        if self._ready:
            self.status(status)
            return
        self._ready = True
        self._last_status = status
        self.send(ready=1, status=status)

    def status(self, text: str) -> None:
        """A ``STATUS=`` line, sent only when it changed."""
        if text != self._last_status:
            self._last_status = text
            self.send(status=text)

    def stopping(self, status: str = "stopping") -> None:
        """``STOPPING=1`` (once) with a status line."""
        if self._stopping:
            return
        self._stopping = True
        self._last_status = status
        self.send(stopping=1, status=status)

    def ping(self) -> None:
        self.send(watchdog=1)

    def start_watchdog(self) -> None:
        """Ping every ``watchdog_every`` seconds from the reactor (when asked to)."""
        if self.address is None or self.watchdog_every is None or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.ping)
        self._watchdog.clock = self.reactor
        self._watchdog.start(self.watchdog_every, now=True)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None


class NotifyService(service.Service):
    """A daemon's link to systemd: watchdog while running, ``STOPPING=1`` when stopped.

    Add it to a daemon's service tree; call :meth:`ready` / :meth:`status` on
    state changes. :meth:`passing` wraps a callback so that a Deferred's
    result flows on unchanged (``listener.bound`` has other consumers).
    """

    name = "systemd notify"

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    @classmethod
    def from_environment(cls, reactor: Any) -> NotifyService:
        return cls(Notifier.from_environment(reactor))

    def ready(self, status: str) -> None:
        self.notifier.ready(status)

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def startService(self) -> None:
        service.Service.startService(self)
        self.notifier.start_watchdog()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.notifier.stopping()
        self.notifier.stop_watchdog()

    @staticmethod
    def passing(callback: Callable[[Any], None]) -> Callable[[Any], Any]:
        """``callback(result)``, returning ``result`` so a Deferred chain is unchanged."""

        def call(result: Any) -> Any:
            callback(result)
            return result

        return call


def listening_status(port: Any) -> str:
    """``listening on HOST:PORT`` (or ``unix:PATH``) for an ``IListeningPort``."""
    address = port.getHost()
    if getattr(address, "port", None) is not None:
        return f"listening on {address.host}:{address.port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"listening on unix:{name}" if name is not None else f"listening on {address}"


def ready_once_listening(
    reactor: Any, listener: Any, parent: service.MultiService
) -> NotifyService:
    """A :class:`NotifyService` under ``parent`` that says READY=1 once ``listener`` is bound.

    ``listener`` is a :class:`tvmrpc.listening.ListeningService`; its ``bound``
    result reaches its other consumers unchanged.
    """
    notify = NotifyService.from_environment(reactor)
    notify.setServiceParent(parent)
    listener.bound.addCallback(notify.passing(lambda port: notify.ready(listening_status(port))))
    return notify
