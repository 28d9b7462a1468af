"""The daemons' log observer: twistd's log flags, plus ``--silent`` and SIGHUP.

twistd builds its log observer from ``--logfile``/``--nodaemon``/``--syslog``
and keeps the log file to itself, so nothing could reopen it after logrotate
moved it. Its public hook is ``--logger FQPN`` (a factory called once, before
the application starts): at option-parsing time :func:`configure` points that
hook at :func:`observer`, which builds the same observer twistd would and
keeps the :class:`~twisted.python.logfile.LogFile` it opened.

Invariants:
- Where the log goes is what twistd's flags say: ``--logfile PATH`` (default
  ``twistd.log`` when daemonized), stdout with ``-n`` and no ``--logfile``,
  syslog with ``--syslog``; a ``--logger`` given on the command line is still
  used (wrapped). SIGUSR1 still rotates the file as twistd does.
- SIGHUP never ends the daemon: it reopens the log file at its path (what
  logrotate's ``postrotate`` expects) and logs that it did; with no file it
  logs that there is nothing to reopen.
- ``--silent`` passes only events at warn level and above.
- One daemon per process: the settings live in this module from parsing until
  twistd calls :func:`observer`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, cast

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from twisted.python import logfile
from twisted.python.log import ILogObserver as ILegacyLogObserver
from twisted.python.reflect import namedAny

log = Logger()

_settings: dict[str, Any] = {}
#: The log file :func:`observer` opened, if it opened one.
current_file: logfile.LogFile | None = None


def configure(twistd_options: Any, silent: bool) -> None:
    """Remember twistd's log flags and make twistd build its observer with :func:`observer`."""
    _settings.clear()
    _settings.update(
        silent=silent,
        logfile=twistd_options.get("logfile") or "",
        nodaemon=bool(twistd_options.get("nodaemon")),
        syslog=bool(twistd_options.get("syslog")),
        prefix=twistd_options.get("prefix") or "twisted",
        user_logger=twistd_options.get("logger"),
    )
    twistd_options["logger"] = f"{__name__}.observer"


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: the observer for this daemon, SIGHUP installed."""
    global current_file
    current_file = None
    user_logger = _settings.get("user_logger")
    if user_logger:
        factory = namedAny(user_logger) if isinstance(user_logger, str) else user_logger
        base = factory()
        if not ILogObserver.providedBy(base):
            base = LegacyLogObserverWrapper(base)
    elif _settings.get("syslog"):
        from twisted.python.syslog import SyslogObserver

        # A legacy observer is any callable; Twisted types the parameter as the interface.
        emit = cast(ILegacyLogObserver, SyslogObserver(_settings["prefix"]).emit)
        base = LegacyLogObserverWrapper(emit)
    else:
        base = textFileLogObserver(_open_output())
    signal.signal(signal.SIGHUP, _on_sighup)
    if _settings.get("silent"):
        return FilteringLogObserver(base, [LogLevelFilterPredicate(LogLevel.warn)])
    return base


def _open_output() -> Any:
    """The file twistd would log to (same rules as twistd's own UnixAppLogger)."""
    global current_file
    name = _settings.get("logfile", "")
    if name == "-" or (not name and _settings.get("nodaemon")):
        if name == "-" and not _settings.get("nodaemon"):
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    current_file = logfile.LogFile.fromFullPath(os.path.abspath(name or "twistd.log"))
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda signum, frame: _in_reactor(current_file.rotate))
    return current_file


def _in_reactor(call: Any) -> None:
    from twisted.internet import reactor

    IReactorThreads(reactor).callFromThread(call)


def _on_sighup(signum: int, frame: Any) -> None:
    _in_reactor(reopen)


def reopen() -> None:
    """Reopen the log file at its path (after logrotate moved it) and say so."""
    if current_file is None:
        log.info("SIGHUP: no log file to reopen (logging to stdout or syslog); still serving")
        return
    current_file.reopen()
    log.info("SIGHUP: reopened log file {path}; still serving", path=current_file.path)
