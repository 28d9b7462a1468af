"""The fork server (zygote): one process with the runtime loaded forks a worker per session.

A spare worker is forked one session ahead: it has loaded ``--load-library``
libraries and imported ``--init`` modules, and waits for its socket. It is
not forked while a session runs: the fork and the spare's start-up would
compete with that session for the CPU (on a 2-core board this cost a short
session about a millisecond). The zygote has no threads, so forking it is
safe and fast. The messages it exchanges with the daemon are in
:mod:`.control`.

Invariants:
- Each worker (session, spare or health check) leads its own process
  group; when it is reaped its whole group is killed: nothing a kernel
  forked outlives its session.
- A session's directory is removed by the zygote once its worker is reaped
  (before ``exited`` is sent), so the daemon's reactor never walks it.
- A command the zygote cannot obey (malformed, unknown, a socket missing or
  extra) is answered ``refused`` with one line naming it, its descriptors
  are closed, and the zygote carries on.
- The first spare is forked after the first passed health check, the next
  one when a session ends; a spare that dies before its session is
  reported (``spare-failed``) and replaced after ``respawn_delay``.
- When the daemon goes away (command channel closed, events unwritable) or
  on SIGTERM the zygote kills the workers it still has and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import select
import shutil
import signal
import socket
import sys
import time
from typing import Any, NoReturn

from . import control
from .health import MAX_VERDICT, run_check, verdict
from .processes import fork_worker, kill_group
from .runtime import NotReadyError, WorkerOptions, load_runtime_or_explain, probe_str_type_index
from .session import hand_over, spare_main


@dataclasses.dataclass
class Spare:
    """A forked worker waiting for its session: record channel, ``done`` pipe."""

    pid: int
    channel: socket.socket
    done: int


class Zygote:
    """The fork server loop (see the module docstring)."""

    respawn_delay = 1.0

    def __init__(
        self,
        events: socket.socket,
        commands: socket.socket,
        tvm_ffi: Any,
        options: WorkerOptions,
    ) -> None:
        self.events = events
        self.commands = commands
        self.tvm_ffi = tvm_ffi
        self.options = options
        self.children: dict[int, int] = {}  # pid -> session id
        self.done_pipes: dict[int, tuple[int, int]] = {}  # read fd -> (session id, pid)
        self.checks: dict[int, tuple[int, int]] = {}  # pid -> (check id, verdict pipe)
        self.session_dirs: dict[int, str] = {}  # pid -> its session directory
        self.spare: Spare | None = None
        self.spare_due: float | None = None  # the first spare follows a passed health check

    def send(self, event: control.Event) -> None:
        try:
            self.events.sendall(control.encode_event(event))
        except OSError:
            self.shutdown(0)  # the daemon is gone: nobody to serve

    def run(self) -> NoReturn:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown(0))
        self.send(control.Ready(os.getpid(), probe_str_type_index(self.tvm_ffi)))
        while True:
            timeout = None
            if self.spare is None and self.spare_due is not None:
                timeout = max(0.0, self.spare_due - time.monotonic())
                if timeout == 0.0:
                    self.fork_spare()
                    continue
            watched: list[int] = [self.commands.fileno(), wake_r, *self.done_pipes]
            readable, _, _ = select.select(watched, [], [], timeout)
            if wake_r in readable:
                os.read(wake_r, 4096)
                self.reap()
            for fd in readable:
                if fd in self.done_pipes:
                    self.finished(fd)
            if self.commands.fileno() in readable and not self.receive():
                self.shutdown(0)

    # -- commands ----------------------------------------------------------------

    def receive(self) -> bool:
        """Obey one command record (False: the daemon closed the channel)."""
        data, fds, flags, _ = socket.recv_fds(self.commands, control.MAX_RECORD, control.MAX_FDS)
        if not data and not fds:
            return False
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
        try:
            command = control.parse_command(data, fds, truncated)
        except control.ControlError as exc:
            self.refuse(exc)
            return True
        if isinstance(command, control.Serve):
            self.serve(command.id, command.dir, command.fd)
        elif isinstance(command, control.Check):
            self.check(command.id)
        return True

    def refuse(self, exc: control.ControlError) -> None:
        for fd in exc.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        print(f"zygote: refused a control message: {exc}", file=sys.stderr, flush=True)
        self.send(control.Refused(exc.id, str(exc)))

    def serve(self, session_id: int, root: str, fd: int) -> None:
        if self.spare is None:
            self.fork_spare()
        spare, self.spare = self.spare, None
        assert spare is not None
        try:
            hand_over(spare.channel, root, fd)
        except OSError:
            pass  # the spare died; its exit is reported as this session's end
        finally:
            os.close(fd)
            spare.channel.close()
        self.children[spare.pid] = session_id
        self.session_dirs[spare.pid] = root
        self.done_pipes[spare.done] = (session_id, spare.pid)
        self.send(control.Started(session_id, spare.pid))
        # The next spare is forked once this session ends, not while it runs: a
        # fork and a worker's start-up compete with the session for the CPU.
        self.spare_due = None

    def check(self, check_id: int) -> None:
        """Fork a health-check worker; its verdict comes back through a pipe when reaped."""
        verdict_r, verdict_w = os.pipe()

        def reset() -> None:
            self._child_reset()
            os.close(verdict_r)

        pid = fork_worker(reset, lambda: run_check(self.tvm_ffi, self.options, verdict_w))
        os.close(verdict_w)
        os.set_blocking(verdict_r, False)
        self.checks[pid] = (check_id, verdict_r)

    # -- workers -----------------------------------------------------------------

    def _child_reset(self) -> None:
        """In a forked child: default signal handling, none of the zygote's descriptors."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        self.events.close()
        self.commands.close()
        for fd in self.done_pipes:
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, verdict_r in self.checks.values():
            with contextlib.suppress(OSError):
                os.close(verdict_r)

    def fork_spare(self) -> None:
        """Fork the next worker; it loads libraries and init modules, then waits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        done_r, done_w = os.pipe()

        def reset() -> None:
            self._child_reset()
            ours.close()
            os.close(done_r)

        pid = fork_worker(reset, lambda: spare_main(self.tvm_ffi, theirs, done_w, self.options))
        theirs.close()
        os.close(done_w)
        self.spare = Spare(pid, ours, done_r)
        self.spare_due = None

    def spare_after_session(self) -> None:
        """A session ended: fork the next spare now (unless one is there or due)."""
        if self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic()

    def finished(self, fd: int) -> None:
        session_id, pid = self.done_pipes.pop(fd)
        data = os.read(fd, 16)
        os.close(fd)
        self.spare_after_session()
        if data:
            self.send(control.Finished(session_id, pid))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            kill_group(pid)  # whatever the worker forked dies with it
            if pid in self.checks:
                self.checked(pid, code)
                continue
            if self.spare is not None and pid == self.spare.pid:
                self.spare.channel.close()
                os.close(self.spare.done)
                self.spare = None
                self.spare_due = time.monotonic() + self.respawn_delay
                self.send(control.SpareFailed(pid, code))
                continue
            session_dir = self.session_dirs.pop(pid, None)
            if session_dir is not None:  # here, not in the daemon's reactor thread
                shutil.rmtree(session_dir, ignore_errors=True)
            session_id = self.children.pop(pid, None)
            if session_id is not None:
                self.spare_after_session()
                self.send(control.Exited(session_id, pid, code))

    def checked(self, pid: int, code: int) -> None:
        check_id, verdict_r = self.checks.pop(pid)
        try:
            written = os.read(verdict_r, MAX_VERDICT).decode("utf-8", "replace")
        except OSError:
            written = ""
        os.close(verdict_r)
        if code == 0 and self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic()
        self.send(control.Checked(check_id, code == 0, verdict(code, written)))

    def shutdown(self, code: int) -> NoReturn:
        pids = [*self.children, *self.checks] + ([self.spare.pid] if self.spare else [])
        for pid in pids:
            kill_group(pid)
        os._exit(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tvmrpc.server.worker")
    parser.add_argument("--control-fd", type=int, default=3, help="events to the daemon")
    parser.add_argument("--command-fd", type=int, default=4, help="commands from the daemon")
    parser.add_argument("--runtime-library", default=None)
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--init", action="append", default=[])
    parser.add_argument("--memory-limit", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    events = socket.socket(fileno=args.control_fd)
    try:
        commands = _command_channel(args.command_fd)
        tvm_ffi = load_runtime_or_explain(args.runtime_library)
    except NotReadyError as exc:  # tell the daemon why in one line, then exit
        with contextlib.suppress(OSError):
            events.sendall(control.encode_event(control.Failed(str(exc))))
        return 2
    options = WorkerOptions(tuple(args.load_library), tuple(args.init), args.memory_limit)
    Zygote(events, commands, tvm_ffi, options).run()


def _command_channel(fd: int) -> socket.socket:
    """The daemon's ``SOCK_SEQPACKET`` command socket at ``fd`` (one line if it is not there)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        sock = None
        problem = f"({exc.strerror})"
    else:
        problem = "(not a SOCK_SEQPACKET socket)"
    if sock is None or sock.type != socket.SOCK_SEQPACKET:
        raise NotReadyError(
            f"no command channel at fd {fd} {problem}: the daemon and this worker come "
            "from different tvmrpc versions; run both from one install"
        )
    return sock
