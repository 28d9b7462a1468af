"""Helpers for integration tests: start real daemons and wait for what they log.

Daemons are subprocesses (ours under ``twistd -n``, stock ones via
``python -m tvm.exec...``). A reader thread collects each line of their
output; tests wait for a line matching a pattern instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tvmrpc.demo.daemons import twistd_argv  # one way to run our daemons, shared with demo

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
DEFAULT_TIMEOUT = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TVM_NUM_THREADS", "1")
    if extra:
        env.update(extra)
    return env


class Process:
    """A child process whose merged stdout/stderr lines can be awaited."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the reader
        self._log.write(f"$ {' '.join(self.argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else subprocess_env(),
            cwd=cwd,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()
        self._log.close()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = DEFAULT_TIMEOUT, start: int = 0
    ) -> re.Match[str]:
        """Block until a line (from index ``start``) matches; fail on exit or timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"{self.argv[0]} exited ({self.proc.returncode}) before "
                        f"{regex.pattern!r}; output:\n{self.output[-4000:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {regex.pattern!r}; output:\n{self.output[-4000:]}"
                    )
                self._cond.wait(remaining)

    def mark(self) -> int:
        """The index of the next line, to wait only for what comes after now."""
        with self._cond:
            return len(self.lines)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
        # Leave no stragglers in the group (workers, zygotes).
        self.signal(signal.SIGKILL)
        self._reader.join(timeout)
        return self.proc.returncode


class Daemon(Process):
    """One of our daemons under ``twistd -n``; ``port`` is where it listens."""

    def __init__(self, plugin: str, args: Sequence[str], log_path: Path, **kwargs) -> None:
        super().__init__(twistd_argv(plugin, *args), log_path, **kwargs)
        self.plugin = plugin
        self.host = "127.0.0.1"
        self.port: int | None = None

    def wait_listening(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        match = self.wait_for(LISTENING, timeout)
        self.port = int(match.group(2))
        return self.port


@contextlib.contextmanager
def running(proc: Process) -> Iterator[Process]:
    """Stop ``proc`` however the block ends."""
    try:
        yield proc
    finally:
        proc.stop()


def start_tracker(log_dir: Path, *extra: str, name: str = "tracker") -> Daemon:
    """Start our tracker on a kernel-chosen loopback port and wait until it listens."""
    daemon = Daemon(
        "tvm-tracker",
        ["--listen", "tcp:0:interface=127.0.0.1", *extra],
        log_dir / f"{name}.log",
    )
    daemon.wait_listening()
    return daemon


def start_stock_tracker(log_dir: Path, name: str = "stock-tracker") -> Process:
    """Start the stock tracker (``python -m tvm.exec.rpc_tracker``) on a free port."""
    port = free_port()
    proc = Process(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        log_dir / f"{name}.log",
    )
    proc.wait_for(rf"bind to 127\.0\.0\.1:{port}")
    proc.host, proc.port = "127.0.0.1", port  # type: ignore[attr-defined]
    return proc


def start_stock_server(
    log_dir: Path,
    key: str,
    tracker: tuple[str, int] | None = None,
    name: str | None = None,
    extra: Sequence[str] = (),
) -> Process:
    """Start a stock ``tvm.exec.rpc_server`` on a free port, optionally tracker-registered."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "tvm.exec.rpc_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
        "--key",
        key,
        *extra,
    ]
    if tracker is not None:
        argv += ["--tracker", f"{tracker[0]}:{tracker[1]}"]
    proc = Process(argv, log_dir / f"{name or 'stock-server-' + key}.log")
    proc.wait_for(rf"bind to 127\.0\.0\.1:{port}")
    proc.host, proc.port = "127.0.0.1", port  # type: ignore[attr-defined]
    return proc


def stock_tracker_socket(
    port: int, host: str = "127.0.0.1", source: str | None = None
) -> socket.socket:
    """A raw tracker connection opened the way the stock client opens it (stock ``base``).

    ``source`` binds the client's end to that loopback address, so one test
    can play several client hosts (127.0.0.1, 127.0.0.2, ...).
    """
    import struct

    from tvm.rpc import base

    source_address = (source, 0) if source is not None else None
    sock = socket.create_connection((host, port), timeout=30, source_address=source_address)
    sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
    assert struct.unpack("<i", base.recvall(sock, 4))[0] == base.RPC_TRACKER_MAGIC
    return sock
