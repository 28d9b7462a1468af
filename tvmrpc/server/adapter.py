"""The device runtime adapter: the daemon's only view of workers.

:class:`IDeviceRuntime` is what the daemon needs from a device; every method
returns a Deferred and nothing blocks. :class:`ZygoteRuntime` implements it
with the worker zygote (``python -m tvmrpc.server.worker``): one process with
the runtime loaded that forks a worker per session, talking to the daemon
over a UNIX socketpair (fd 3 in the zygote) that carries JSON lines and the
session sockets (SCM_RIGHTS).

Invariants:
- ``ready()`` fires once the zygote is warm (and again after a restart);
  ``str_type_index`` is then what the runtime writes for a raw string.
- The runtime never restarts its zygote by itself: it tells
  ``warm_observers`` when the zygote is warm and ``lost_observers`` (with one
  line naming cause and fix) when it could not start or died; whoever
  supervises it calls :meth:`ZygoteRuntime.start` again.
- :meth:`ZygoteRuntime.check` fires with ``None`` when a fresh worker passed
  the health check, else with one line saying why (also on timeout).
- ``serve()`` fires with the worker's exit code once its session is over,
  whatever ended it (client closed, crash, :meth:`abort`).
- :meth:`abort` kills the worker's whole process group.
- After ``stop()`` no zygote or worker is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..codec import RAW_STR_TYPE_INDEX_FFI

log = Logger(namespace="tvmrpc.server.worker")


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
        argv = [self.python, "-m", "tvmrpc.server.worker", "--control-fd", "3"]
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
    """The daemon's end of the control socketpair."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, runtime: ZygoteRuntime) -> None:
        self.runtime = runtime

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warn("bad control line from zygote: {line!r}", line=line[:200])
            return
        self.runtime._event(message)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.runtime._control_lost(self)


class _ZygoteProcess(protocol.ProcessProtocol):
    """Forwards the zygote's output to our log and tells the runtime when it exits."""

    def __init__(self, runtime: ZygoteRuntime) -> None:
        self.runtime = runtime
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.info("worker: {line}", line=line)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
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


@implementer(IDeviceRuntime)
class ZygoteRuntime:
    """:class:`IDeviceRuntime` backed by a forking zygote with the runtime loaded."""

    #: The zygote removes a session's directory when it reaps the worker.
    removes_session_dirs = True

    check_timeout = 30.0

    def __init__(self, reactor: Any, config: WorkerConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.str_type_index = RAW_STR_TYPE_INDEX_FFI
        self._process: _ZygoteProcess | None = None
        self._transport: Any = None
        self._control: _Control | None = None
        self._ready = False
        self._waiting: list[defer.Deferred[None]] = []
        self._sessions: dict[int, _Session] = {}
        self._next_id = 0
        self._stopping = False
        self._failure: str | None = None
        self._checks: dict[int, defer.Deferred[str | None]] = {}
        self.zygote_pid: int | None = None
        #: Times the zygote died and was restarted (read by tvmrpc.status).
        self.restarts = 0
        self.warm_observers: list[Callable[[], None]] = []
        self.lost_observers: list[Callable[[str], None]] = []

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Spawn the zygote (again); ``ready()`` fires when it is warm."""
        if self._stopping or self._process is not None:
            return
        self._failure = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = _ZygoteProcess(self)
        env = self.config.env if self.config.env is not None else dict(os.environ)
        try:
            self._transport = self.reactor.spawnProcess(
                proc,
                self.config.python,
                self.config.argv(),
                env=env,
                childFDs={0: "w", 1: "r", 2: "r", 3: theirs.fileno()},
            )
        finally:
            theirs.close()
        self._process = proc
        control = _Control(self)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, _OneProtocol(control))
        ours.close()
        self._control = control

    def ready(self) -> defer.Deferred[None]:
        if self._ready:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def is_ready(self) -> bool:
        return self._ready

    def serve(self, sock: socket.socket, session_dir: str) -> defer.Deferred[int]:
        if not self._ready or self._control is None:
            return defer.fail(WorkerError("no warm worker"))
        self._next_id += 1
        session = _Session(self._next_id, sock, defer.Deferred(), session_dir)
        self._sessions[session.id] = session
        transport = self._control.transport
        transport.sendFileDescriptor(sock.fileno())
        transport.write(
            json.dumps({"cmd": "serve", "id": session.id, "dir": session_dir}).encode() + b"\n"
        )
        return session.done

    def check(self) -> defer.Deferred[str | None]:
        """Run the health check in a fresh worker: ``None`` if it passed, else why not."""
        if not self._ready or self._control is None:
            return defer.succeed("health check: the worker zygote is not running")
        self._next_id += 1
        check_id = self._next_id
        d: defer.Deferred[str | None] = defer.Deferred()
        self._checks[check_id] = d
        timer = self.reactor.callLater(
            self.check_timeout,
            self._check_done,
            check_id,
            f"health check: no answer within {self.check_timeout:g}s",
        )
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        self._control.transport.write(json.dumps({"cmd": "check", "id": check_id}).encode() + b"\n")
        return d

    def abandon(self, reason: str) -> None:
        if self._transport is None or self._ready:
            return
        self._failure = reason
        with contextlib.suppress(Exception):  # already gone
            self._transport.signalProcess("KILL")

    def _check_done(self, check_id: int, error: str | None) -> None:
        d = self._checks.pop(check_id, None)
        if d is not None:
            d.callback(error)

    def abort(self, session: defer.Deferred[int]) -> None:
        for entry in self._sessions.values():
            if entry.done is session:
                entry.aborted = True
                if entry.pid is not None:
                    _kill_group(entry.pid)
                return

    def stop(self) -> defer.Deferred[None]:
        self._stopping = True
        for entry in list(self._sessions.values()):
            if entry.pid is not None:
                _kill_group(entry.pid)
        if self._process is None:
            return defer.succeed(None)
        ended = self._process.ended
        if self._transport is not None:
            with contextlib.suppress(Exception):  # already gone
                self._transport.signalProcess("TERM")
        return ended

    # -- events from the zygote -------------------------------------------------

    def _event(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            self.zygote_pid = message.get("pid")
            self.str_type_index = int(message.get("str_type_index", RAW_STR_TYPE_INDEX_FFI))
            self._ready = True
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
        elif event == "started":
            entry = self._sessions.get(message["id"])
            if entry is not None:
                entry.pid = message["pid"]
                log.info("worker {pid} serving session {id}", pid=entry.pid, id=entry.id)
                if entry.aborted:
                    _kill_group(entry.pid)
        elif event in ("finished", "exited"):
            entry = self._sessions.pop(message["id"], None)
            if entry is not None:
                entry.done.callback(int(message.get("code", 0)))
        elif event == "spare-failed":
            log.error(
                "worker {pid} failed before its session (exit {code}); see its output above",
                pid=message.get("pid"),
                code=message.get("code"),
            )
        elif event == "checked":
            error = (
                None if message.get("ok") else str(message.get("error") or "health check failed")
            )
            self._check_done(int(message.get("id", -1)), error)
        elif event == "failed":
            self._failure = str(message.get("error"))

    def _control_lost(self, control: _Control) -> None:
        if control is self._control:
            self._control = None
            self._ready = False

    def _zygote_ended(self, proc: _ZygoteProcess, how: str) -> None:
        if proc is not self._process:
            return
        self._process = None
        self._transport = None
        self._ready = False
        for check_id in list(self._checks):
            self._check_done(check_id, f"health check: the worker zygote died ({how})")
        # Workers forked by the dead zygote can no longer be reaped by it: end them.
        for entry in list(self._sessions.values()):
            if entry.pid is not None:
                _kill_group(entry.pid)
            shutil.rmtree(entry.session_dir, ignore_errors=True)  # nobody else will now
            del self._sessions[entry.id]
            entry.done.callback(-signal.SIGKILL)
        if not self._stopping:
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


def _kill_group(pid: int) -> None:  # same as worker.kill_group; the daemon imports no worker
    """SIGKILL a worker's process group (it called setsid), or the worker alone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
