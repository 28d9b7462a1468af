"""A daemon as a subprocess: started in its own session, awaited by its log, stopped as a group.

One way to run a daemon for the demo, the tests and the bench: ours under
``twistd -n`` (:func:`twistd_argv`), stock ones via ``python -m tvm.exec...``,
or any command (``ip netns exec``, ``systemd-socket-activate``, ``tail``).

Invariants:
- Every process leads its own session (and so its own process group): a
  Ctrl-C at the terminal reaches the harness alone, which then stops what it
  started; :meth:`Process.stop` signals the whole group, so the workers and
  zygotes a daemon started go with it.
- With ``die_with_parent`` (the default) the kernel sends the process SIGTERM
  when the thread that started it dies (``PR_SET_PDEATHSIG``): a killed test
  run or bench leaves no daemon behind. The demo's ``--keep`` turns it off.
- stdout and stderr go straight into ``log_path`` (appended, after a
  ``$ argv`` line); nothing sits in a pipe, so the log is complete even if the
  harness dies, and a kept daemon goes on logging there. Two live processes
  never share a log: the second gets ``NAME-2.log`` (its ``log_path`` says so).
- Waits have deadlines and never sleep: they wake on a write to the log or
  the process's exit (:mod:`tvmrpc.harness.logwatch`). A process that exits
  while awaited fails the wait at once, quoting the end of its log.
- :meth:`Process.stop` is SIGTERM to the group, SIGKILL if it lingers past the
  timeout, then SIGKILL to the group for stragglers; calling it again is harmless.
- A :class:`Group` stops its processes in the reverse of their start order.
- :data:`LIVE` holds every process started and not yet stopped, so a test
  runner can stop what a test left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .commands import DEFAULT_TIMEOUT, child_env, twistd_argv
from .logwatch import LineReader, Wakeup, open_pidfd

#: Every one of our daemons logs this once its socket is bound.
LISTENING = re.compile(r"listening on (\S+):(\d+)")
#: ...and this when it cannot bind (it may then linger instead of exiting).
CANNOT_LISTEN = re.compile(r"cannot listen on .*|Couldn't listen on .*|CannotListenError.*")
PR_SET_PDEATHSIG = 1

P = TypeVar("P", bound="Process")


class DaemonError(RuntimeError):
    """A daemon exited, or did not log what was awaited, in time; the message says which."""


_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _unused_log_path(path: Path) -> Path:
    """``path``, or ``NAME-2.log``, ``NAME-3.log``... while a live process logs there."""
    taken = {proc.log_path for proc in LIVE}
    candidate, number = path, 1
    while candidate in taken:
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


class Process:
    """A started child whose log can be awaited line by line."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.log_path = _unused_log_path(Path(log_path))
        self.name = name or Path(self.argv[0]).name
        self.host: str | None = None
        self.port: int | None = None
        self.ended: str | None = None  # how it ended, once stopped
        self._lines: list[str] = []
        self._reader = LineReader(self.log_path)
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self._reader.read()  # the command line is not the daemon's output
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else child_env(),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        self._pidfd = open_pidfd(self.proc.pid)
        LIVE.add(self)

    # -- what it logged ------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def lines(self) -> list[str]:
        """Every line it has logged so far (a new list each time)."""
        self._catch_up()
        return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        """The index of the next line: wait only for what is logged after now."""
        self._catch_up()
        return len(self._lines)

    def tail(self, count: int = 8) -> str:
        return "\n".join("    " + line for line in self.lines[-count:])

    def _catch_up(self) -> bool:
        """Read what was appended; True when the process has exited (all of it read)."""
        exited = self.proc.poll() is not None
        self._lines.extend(self._reader.read(final=exited))
        return exited

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = DEFAULT_TIMEOUT,
        start: int = 0,
        failure: re.Pattern[str] | None = None,
    ) -> re.Match[str]:
        """The first match in a line from index ``start`` on.

        DaemonError when the process exits first, when ``timeout`` passes, or
        at once when a line matches ``failure`` before ``pattern`` does.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = start
        with Wakeup(self.log_path, self._pidfd) as wakeup:
            while True:
                exited = self._catch_up()
                while index < len(self._lines):
                    line = self._lines[index]
                    index += 1
                    match = regex.search(line)
                    if match:
                        return match
                    bad = failure.search(line) if failure is not None else None
                    if bad:
                        raise DaemonError(f"{self.name} {bad.group(0)} (see {self.log_path})")
                if exited:
                    raise DaemonError(
                        f"{self.name} exited with status {self.proc.returncode} before logging "
                        f"{regex.pattern!r}; last lines of {self.log_path}:\n{self.tail(20)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DaemonError(
                        f"{self.name} did not log {regex.pattern!r} within {timeout:g} s; "
                        f"last lines of {self.log_path}:\n{self.tail(20)}"
                    )
                wakeup.wait(remaining)

    def wait_listening(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for our daemons' ``... listening on HOST:PORT``; remember and return the port."""
        match = self.wait_for(LISTENING, timeout, failure=CANNOT_LISTEN)
        self.host, self.port = match.group(1), int(match.group(2))
        return self.port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` once known (after :meth:`wait_listening`, or set by a starter)."""
        if self.host is None or self.port is None:
            raise DaemonError(f"{self.name}: its address is not known yet")
        return self.host, self.port

    # -- its life ------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to its whole process group (gone already: nothing happens)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the group, SIGKILL it if it lingers; the exit status (``ended`` says how)."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                code = self.proc.returncode
                # twistd re-raises SIGTERM on itself after a clean shutdown to report it.
                clean = code in (0, -signal.SIGTERM)
                self.ended = "stopped on SIGTERM" if clean else f"exit status {code}"
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
                self.ended = f"killed: still running {timeout:g} s after SIGTERM"
        elif self.ended is None:
            self.ended = f"had already exited with status {self.proc.returncode}"
        self.signal(signal.SIGKILL)  # stragglers left in the group (workers, zygotes)
        self._catch_up()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        LIVE.discard(self)
        return self.proc.returncode


class Daemon(Process):
    """One of our daemons under ``twistd -n``: ``Daemon("tvm-tracker", [...], log)``."""

    def __init__(
        self,
        plugin: str,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        argv = twistd_argv(plugin, *args)
        super().__init__(argv, log_path, env, cwd, name=plugin, die_with_parent=die_with_parent)
        self.plugin = plugin
        self.host = "127.0.0.1"
        self.web_port: int | None = None  # the proxy's --web-port, where a starter read it


class Group:
    """Processes started together, logging to one directory, stopped newest first."""

    def __init__(self, log_dir: Path, die_with_parent: bool = True) -> None:
        self.log_dir = log_dir
        self.die_with_parent = die_with_parent
        self.procs: list[Process] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        """``argv`` started as ``name``, logging to ``LOG_DIR/NAME.log``."""
        proc = Process(
            argv, self.log_dir / f"{name}.log", env, name=name, die_with_parent=self.die_with_parent
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> list[Process]:
        """Stop them all, the last started first; return them in that order (``ended`` set)."""
        stopped = list(reversed(self.procs))
        for proc in stopped:
            proc.stop()
        return stopped


#: Started and not yet stopped (see the module's invariants).
LIVE: set[Process] = set()


@contextlib.contextmanager
def running(proc: P) -> Iterator[P]:
    """Stop ``proc`` however the block ends."""
    try:
        yield proc
    finally:
        proc.stop()
