"""The device runtime adapter: the daemon's only view of workers.

:class:`IDeviceRuntime` is what the daemon needs from a device; every method
returns a Deferred and nothing blocks. :class:`ZygoteRuntime` implements it
with the worker zygote (``python -m tvmrpc.server.worker``): one process with
the runtime loaded that forks a worker per session. Two socketpairs join
them (messages in :mod:`.worker.control`): the zygote's events arrive as
JSON lines on a stream (fd 3 in the zygote), read by the reactor; commands
go out as ``SOCK_SEQPACKET`` records (fd 4), a session's socket attached to
its own ``serve`` record (SCM_RIGHTS, one non-blocking ``sendmsg``).

Invariants:
- ``ready()`` fires once the zygote is warm (and again after a restart);
  ``str_type_index`` is then what the runtime writes for a raw string.
- The zygote's life is an explicit :class:`~.zygote_phase.ZygotePhase`; an
  event that cannot happen in the current phase raises (a malformed or
  impossible message from the zygote is one warning line, not a crash).
- The runtime never restarts its zygote by itself: it tells
  ``warm_observers`` when the zygote is warm and ``lost_observers`` (with one
  line naming cause and fix) when it could not start or died; whoever
  supervises it calls :meth:`ZygoteRuntime.start` again.
- :meth:`ZygoteRuntime.check` fires with ``None`` when a fresh worker passed
  the health check, else with one line saying why (also on timeout).
- ``serve()`` fires with the worker's exit code once its session is over,
  whatever ended it (client closed, crash, :meth:`abort`); it fails with
  :class:`WorkerError` when the zygote cannot take or refuses the session.
- :meth:`abort` kills the worker's whole process group.
- After ``stop()`` no zygote or worker is left, and nothing restarts one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..codec import RAW_STR_TYPE_INDEX_FFI
from .worker import control
from .worker.processes import kill_group
from .zygote_phase import ZygotePhase, ZygotePhaseError

log = Logger()

#: The zygote's descriptor numbers for the events and commands channels.
CONTROL_FD = 3
COMMAND_FD = 4


class WorkerError(Exception):
    """The worker zygote failed to start or went away."""


class IDeviceRuntime(Interface):
    """Runs RPC sessions on the device, one worker process per session."""

    is_ready = Attribute("True while a session can start at once.")
    str_type_index = Attribute("Type index of a raw string in this runtime's exception packets.")
    warm_observers = Attribute("Callables called with no argument each time the runtime is warm.")
    lost_observers = Attribute("Callables called with one line (cause and fix) when it is lost.")

    def start() -> None:
        """Start (or restart) the runtime; ``warm_observers`` hear when it is warm."""

    def check() -> defer.Deferred[str | None]:
        """Health check in a fresh worker: fires ``None`` if it passed, else why not."""

    def abandon(reason: str) -> None:  # noqa: N805
        """Kill a runtime that does not get warm; ``lost_observers`` hear ``reason``."""

    def ready() -> defer.Deferred[None]:
        """Fires when a session can start at once (a worker is warm)."""

    def serve(sock: socket.socket, session_dir: str) -> defer.Deferred[int]:  # noqa: N805
        """Serve one session on ``sock`` in ``session_dir``; fires with the exit code."""

    def abort(session: defer.Deferred[int]) -> None:  # noqa: N805
        """Kill the worker behind a ``serve`` Deferred and everything it started."""

    def stop() -> defer.Deferred[None]:
        """Stop every worker; fires when none is left."""


@attrs.frozen
class WorkerConfig:
    """How workers are started: runtime, libraries and init modules."""

    runtime_library: str | None = None
    load_libraries: tuple[str, ...] = ()
    init_modules: tuple[str, ...] = ()
    python: str = sys.executable
    env: dict[str, str] | None = None
    memory_limit: int = 0

    def argv(self) -> list[str]:
        argv = [self.python, "-m", "tvmrpc.server.worker"]
        argv += ["--control-fd", str(CONTROL_FD), "--command-fd", str(COMMAND_FD)]
        if self.memory_limit:
            argv += ["--memory-limit", str(self.memory_limit)]
        if self.runtime_library:
            argv += ["--runtime-library", self.runtime_library]
        for library in self.load_libraries:
            argv += ["--load-library", library]
        for module in self.init_modules:
            argv += ["--init", module]
        return argv


class _Control(LineOnlyReceiver):
    """The daemon's end of the events channel (the zygote's lines; we never write here)."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, runtime: ZygoteRuntime) -> None:
        self.runtime = runtime

    def lineReceived(self, line: bytes) -> None:
        try:
            self.runtime._event(control.parse_event(line))
        except (control.ControlError, ZygotePhaseError) as exc:
            log.warn("ignored a message from the worker zygote: {exc}", exc=exc)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.runtime._control_lost(self)


class _ZygoteProcess(protocol.ProcessProtocol):
    """Forwards the zygote's output to our log and tells the runtime when it exits."""

    #: A line longer than this is logged in pieces (a runaway print cannot grow us).
    MAX_LINE = 64 * 1024

    def __init__(self, runtime: ZygoteRuntime) -> None:
        self.runtime = runtime
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: The unfinished last line of stdout (1) and stderr (2).
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    def outReceived(self, data: bytes) -> None:
        self._lines(1, data)

    def errReceived(self, data: bytes) -> None:
        self._lines(2, data)

    def _lines(self, fd: int, data: bytes) -> None:
        """Log whole lines, skipping blank ones; reads split lines anywhere."""
        *lines, rest = (self._partial[fd] + data).split(b"\n")
        if len(rest) > self.MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                log.info("worker: {line}", line=text)

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            self._lines(fd, b"\n")
        self._process_ended(reason)

    def _process_ended(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        signum = getattr(reason.value, "signal", None)
        self.ended.callback(None)
        self.runtime._zygote_ended(self, f"signal {signum}" if signum else f"exit {code}")


@attrs.define
class _Session:
    id: int
    sock: socket.socket
    done: defer.Deferred[int]
    session_dir: str = ""
    pid: int | None = None
    aborted: bool = False


@attrs.define
class _Zygote:
    """One running zygote: its process, its channels."""

    process: _ZygoteProcess
    transport: IProcessTransport
    control: _Control
    commands: socket.socket  # ours of the SOCK_SEQPACKET pair, non-blocking


@implementer(IDeviceRuntime)
@attrs.define(eq=False)
class ZygoteRuntime:
    """:class:`IDeviceRuntime` backed by a forking zygote with the runtime loaded.

    Its life is a :class:`~.zygote_phase.ZygotePhase` (``phase``); the
    running zygote's process and channels are one :class:`_Zygote` or none.
    """

    #: The zygote removes a session's directory when it reaps the worker.
    removes_session_dirs: ClassVar[bool] = True

    reactor: Any
    config: WorkerConfig
    check_timeout: float = 30.0
    str_type_index: int = RAW_STR_TYPE_INDEX_FFI
    zygote_pid: int | None = None
    #: Times the zygote died and was restarted (read by tvmrpc.status).
    restarts: int = 0
    warm_observers: list[Callable[[], None]] = attrs.field(factory=list)
    lost_observers: list[Callable[[str], None]] = attrs.field(factory=list)
    phase: ZygotePhase = attrs.field(factory=ZygotePhase)
    _zygote: _Zygote | None = attrs.field(default=None, init=False)
    _waiting: list[defer.Deferred[None]] = attrs.field(factory=list, init=False)
    _sessions: dict[int, _Session] = attrs.field(factory=dict, init=False)
    _checks: dict[int, defer.Deferred[str | None]] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=0, init=False)
    _failure: str | None = attrs.field(default=None, init=False)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Spawn the zygote (again); ``ready()`` fires when it is warm."""
        if not self.phase.spawn():
            return  # stopped: nothing restarts
        self._failure = None
        events_ours, events_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        commands, commands_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        commands.setblocking(False)
        proc = _ZygoteProcess(self)
        env = self.config.env if self.config.env is not None else dict(os.environ)
        try:
            transport = self.reactor.spawnProcess(
                proc,
                self.config.python,
                self.config.argv(),
                env=env,
                childFDs={
                    0: "w",
                    1: "r",
                    2: "r",
                    CONTROL_FD: events_theirs.fileno(),
                    COMMAND_FD: commands_theirs.fileno(),
                },
            )
        except BaseException:
            events_ours.close()
            commands.close()
            self.phase.ended()  # no zygote after all: start() may be called again
            raise
        finally:
            events_theirs.close()
            commands_theirs.close()
        control = _Control(self)
        self.reactor.adoptStreamConnection(
            events_ours.fileno(), socket.AF_UNIX, _OneProtocol(control)
        )
        events_ours.close()
        self._zygote = _Zygote(proc, transport, control, commands)

    def ready(self) -> defer.Deferred[None]:
        if self.phase.warm:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def is_ready(self) -> bool:
        return self.phase.warm

    def serve(self, sock: socket.socket, session_dir: str) -> defer.Deferred[int]:
        if not self.phase.warm or self._zygote is None:
            return defer.fail(WorkerError("no warm worker"))
        self._next_id += 1
        session = _Session(self._next_id, sock, defer.Deferred(), session_dir)
        try:
            self._command(control.Serve(session.id, session_dir, sock.fileno()))
        except OSError as exc:
            shutil.rmtree(session_dir, ignore_errors=True)  # the zygote never saw it
            return defer.fail(WorkerError(f"cannot hand the session to the worker zygote: {exc}"))
        self._sessions[session.id] = session
        return session.done

    def check(self) -> defer.Deferred[str | None]:
        """Run the health check in a fresh worker: ``None`` if it passed, else why not."""
        if not self.phase.warm or self._zygote is None:
            return defer.succeed("health check: the worker zygote is not running")
        self._next_id += 1
        check_id = self._next_id
        try:
            self._command(control.Check(check_id))
        except OSError as exc:
            return defer.succeed(f"health check: cannot reach the worker zygote ({exc})")
        d: defer.Deferred[str | None] = defer.Deferred()
        self._checks[check_id] = d
        timer = self.reactor.callLater(
            self.check_timeout,
            self._check_done,
            check_id,
            f"health check: no answer within {self.check_timeout:g}s",
        )

        def cancel_timer(result: str | None) -> str | None:
            if timer.active():
                timer.cancel()
            return result

        return d.addCallback(cancel_timer)

    def abandon(self, reason: str) -> None:
        if self._zygote is None or not self.phase.abandon():
            return
        self._failure = reason
        with contextlib.suppress(Exception):  # already gone
            self._zygote.transport.signalProcess("KILL")

    def abort(self, session: defer.Deferred[int]) -> None:
        for entry in self._sessions.values():
            if entry.done is session:
                entry.aborted = True
                if entry.pid is not None:
                    kill_group(entry.pid)
                return

    def stop(self) -> defer.Deferred[None]:
        for entry in list(self._sessions.values()):
            if entry.pid is not None:
                kill_group(entry.pid)
        if not self.phase.stop() or self._zygote is None:
            return defer.succeed(None)
        with contextlib.suppress(Exception):  # already gone
            self._zygote.transport.signalProcess("TERM")
        return self._zygote.process.ended

    # -- internals ---------------------------------------------------------------

    def _command(self, command: control.Command) -> None:
        """Send one command record, with its descriptors, in one ``sendmsg`` (never blocks)."""
        assert self._zygote is not None
        record, fds = control.encode_command(command)
        socket.send_fds(self._zygote.commands, [record], fds)

    def _check_done(self, check_id: int, error: str | None) -> None:
        d = self._checks.pop(check_id, None)
        if d is not None:
            d.callback(error)

    # -- events from the zygote -------------------------------------------------

    def _event(self, event: control.Event) -> None:
        """One parsed event line (see :mod:`.worker.control`)."""
        if isinstance(event, control.Ready):
            self._warm(event)
        elif isinstance(event, control.Started):
            entry = self._sessions.get(event.id)
            if entry is not None:
                entry.pid = event.pid
                log.debug("worker {pid} serving session {id}", pid=entry.pid, id=entry.id)
                if entry.aborted:
                    kill_group(entry.pid)
        elif isinstance(event, (control.Finished, control.Exited)):
            entry = self._sessions.pop(event.id, None)
            if entry is not None:
                entry.done.callback(event.code if isinstance(event, control.Exited) else 0)
        elif isinstance(event, control.SpareFailed):
            log.error(
                "worker {pid} failed before its session (exit {code}); see its output above",
                pid=event.pid,
                code=event.code,
            )
        elif isinstance(event, control.Checked):
            self._check_done(event.id, None if event.ok else event.error or "health check failed")
        elif isinstance(event, control.Refused):
            self._refused(event)
        elif isinstance(event, control.Failed):
            self._failure = event.error

    def _warm(self, event: control.Ready) -> None:
        if not self.phase.became_warm():
            return  # stopping meanwhile
        self.zygote_pid = event.pid
        self.str_type_index = event.str_type_index
        log.info(
            "worker zygote {pid} warm (raw string type index {index})",
            pid=self.zygote_pid,
            index=self.str_type_index,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        for observer in list(self.warm_observers):
            observer()

    def _refused(self, event: control.Refused) -> None:
        log.warn("worker zygote refused a command: {error}", error=event.error)
        if event.id is None:
            return
        entry = self._sessions.pop(event.id, None)
        if entry is not None:
            shutil.rmtree(entry.session_dir, ignore_errors=True)  # no worker will reap it
            entry.done.errback(WorkerError(event.error))
        self._check_done(event.id, f"health check: {event.error}")

    def _control_lost(self, control: _Control) -> None:
        if self._zygote is not None and control is self._zygote.control:
            self.phase.control_lost()

    def _zygote_ended(self, proc: _ZygoteProcess, how: str) -> None:
        if self._zygote is None or proc is not self._zygote.process:
            return
        self._zygote.commands.close()
        self._zygote = None
        lost = self.phase.ended()
        for check_id in list(self._checks):
            self._check_done(check_id, f"health check: the worker zygote died ({how})")
        # Workers forked by the dead zygote can no longer be reaped by it: end them.
        for entry in list(self._sessions.values()):
            if entry.pid is not None:
                kill_group(entry.pid)
            shutil.rmtree(entry.session_dir, ignore_errors=True)  # nobody else will now
            del self._sessions[entry.id]
            entry.done.callback(-signal.SIGKILL)
        if lost:
            self.restarts += 1  # the supervisor restarts it with backoff
            log.info("worker zygote gone ({how}); the supervisor restarts it", how=how)
            reason = self._failure or f"worker zygote died ({how}); see its output above"
            for observer in list(self.lost_observers):
                observer(reason)


class _OneProtocol(protocol.Factory):
    """A factory that hands out one prebuilt protocol (for adoptStreamConnection)."""

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.proto
