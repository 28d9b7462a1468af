"""The demo's daemons: how each is started, and a handle to wait on its log.

This is the one place that says which implementation plays each role. The
daemons write to a log file (not a pipe), so ``--keep`` can leave them
running after the demo exits; readiness is a line awaited in that file.

Invariants:
- Every daemon runs in its own session (process group), so stopping it also
  stops the workers it started.
- A daemon is only ever waited on with a deadline; a daemon that exits while
  being waited on fails the wait at once, naming its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tvmrpc

#: Where this checkout (or installed package) lives: put first on children's path.
PACKAGE_ROOT = Path(tvmrpc.__file__).resolve().parent.parent
#: Every one of our daemons logs this once its socket is bound.
LISTENING = re.compile(r"listening on (\S+):(\d+)")
#: ...and this when it cannot bind (it may then linger instead of exiting).
CANNOT_LISTEN = re.compile(r"cannot listen on .*|Couldn't listen on .*|CannotListenError.*")
POLL_SECONDS = 0.05


class DaemonError(RuntimeError):
    """A daemon exited or did not log what was awaited in time."""


def twistd_argv(plugin: str, *args: str) -> list[str]:
    """``twistd -n --pidfile= PLUGIN ARGS`` run by this interpreter."""
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        plugin,
        *args,
    ]


def child_env() -> dict[str, str]:
    """Environment for the daemons: this tvmrpc first on the path, unbuffered output."""
    env = dict(os.environ)
    paths = [str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TVM_NUM_THREADS", "1")
    return env


def tracker_argv(host: str, port: int = 0) -> list[str]:
    """Our tracker; port 0 lets the kernel pick."""
    return twistd_argv("tvm-tracker", "--listen", f"tcp:{port}:interface={host}")


def proxy_argv(
    host: str, tracker: tuple[str, int], custom_addr: str | None = None, port: int = 0
) -> list[str]:
    """Our proxy, registering the servers that wait at it with ``tracker``.

    ``custom_addr`` is the address the tracker hands clients (default ``host``):
    it must be one the clients can reach.
    """
    return twistd_argv(
        "tvm-proxy",
        "--listen",
        f"tcp:{port}:interface={host}",
        "--host",
        host,
        "--tracker",
        f"{tracker[0]}:{tracker[1]}",
        "--custom-addr",
        custom_addr or host,
    )


def server_argv(host: str, key: str, tracker: tuple[str, int]) -> list[str]:
    """Our server, listening on ``host`` and registered with ``tracker`` directly."""
    return twistd_argv(
        "tvm-server",
        "--listen",
        f"tcp:0:interface={host}",
        "--host",
        host,
        "--key",
        key,
        "--tracker",
        f"{tracker[0]}:{tracker[1]}",
    )


def proxied_server_argv(proxy: tuple[str, int], key: str) -> list[str]:
    """Our server, connecting out to the proxy (``--through-proxy``)."""
    return twistd_argv(
        "tvm-server",
        "--through-proxy",
        "--host",
        proxy[0],
        "--port",
        str(proxy[1]),
        "--key",
        key,
    )


class Daemon:
    """A started daemon whose log file can be awaited line by line."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                start_new_session=True,
            )
        self.host: str | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def mark(self) -> int:
        """The number of lines so far: wait only for what is logged after now."""
        return len(self.lines())

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        start: int = 0,
        failure: re.Pattern[str] | None = None,
    ) -> re.Match:
        """The first match in a line from ``start`` on; DaemonError on exit or timeout.

        A line matching ``failure`` first fails the wait at once, quoting it.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines()[start:]:
                match = regex.search(line)
                if match:
                    return match
                bad = failure.search(line) if failure is not None else None
                if bad:
                    raise DaemonError(f"{self.name} {bad.group(0)} (see {self.log_path})")
            code = self.proc.poll()
            if code is not None:
                raise DaemonError(
                    f"{self.name} exited with status {code}; last lines of {self.log_path}:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} did not log {regex.pattern!r} within {timeout:g} s; "
                    f"see {self.log_path}"
                )
            time.sleep(POLL_SECONDS)

    def wait_listening(self, timeout: float) -> tuple[str, int]:
        """Wait for ``... listening on HOST:PORT`` and remember the address."""
        match = self.wait_for(LISTENING, timeout, failure=CANNOT_LISTEN)
        self.host, self.port = match.group(1), int(match.group(2))
        return self.host, self.port

    def tail(self, count: int = 8) -> str:
        return "\n".join("    " + line for line in self.lines()[-count:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM the process group, SIGKILL it if it lingers; say how it ended."""
        how = None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout)
                how = f"killed: still running {timeout:g} s after SIGTERM"
        else:
            how = f"had already exited with status {self.proc.returncode}"
        self._signal(signal.SIGKILL)  # workers left in the group, if any
        if how is not None:
            return how
        code = self.proc.returncode
        # twistd re-raises SIGTERM on itself after a clean shutdown to report it.
        return "stopped on SIGTERM" if code in (0, -signal.SIGTERM) else f"exit status {code}"

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)
