"""Helpers for the systemd tests: a NOTIFY_SOCKET listener and systemd-socket-activate.

The listener is what systemd is to a ``Type=notify`` service: an AF_UNIX
datagram socket whose path (or ``@abstract`` name) goes into the daemon's
``NOTIFY_SOCKET``. Tests wait for datagrams with a receive timeout, never by
sleeping.
"""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support import DEFAULT_TIMEOUT, Process, subprocess_env

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is missing: apt-get install systemd (.ci/run does)",
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is missing: apt-get install systemd (.ci/run does)",
)


def fields(datagram: bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines of one notify datagram."""
    result = {}
    for line in datagram.decode().splitlines():
        key, _, value = line.partition("=")
        result[key] = value
    return result


class NotifyListener:
    """The manager's end of ``NOTIFY_SOCKET``; ``messages`` holds every datagram's fields."""

    def __init__(self, directory: Path | None = None, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"tvmrpc-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            assert directory is not None
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[dict[str, str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next datagram's fields, or None if none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = fields(data)
        self.messages.append(message)
        return message

    def pending(self) -> list[dict[str, str]]:
        """Every datagram already queued, without waiting."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except BlockingIOError:
                    break
                got.append(fields(data))
        finally:
            self.sock.setblocking(True)
        self.messages.extend(got)
        return got

    def wait_for(
        self, key: str, value: str = "1", timeout: float = DEFAULT_TIMEOUT, prefix: bool = False
    ) -> dict[str, str]:
        """Block until a datagram sets ``key=value`` (or a value starting so with ``prefix``)."""

        def matches(message: dict[str, str]) -> bool:
            got = message.get(key)
            return got is not None and (got.startswith(value) if prefix else got == value)

        for message in self.messages:
            if matches(message):
                return message
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and matches(message):
                return message
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def activated(
    argv: Sequence[str],
    log_path: Path,
    port: int,
    fdname: str | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """``argv`` under ``systemd-socket-activate -l 127.0.0.1:PORT [--fdname N]``.

    systemd-socket-activate passes only the variables given with ``-E``, so
    every variable of ``env`` (default: the tests' child environment) is
    passed that way. It execs ``argv`` in place on the first connection.
    """
    assert SOCKET_ACTIVATE is not None
    child_env = env if env is not None else subprocess_env()
    command = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}"]
    if fdname is not None:
        command.append(f"--fdname={fdname}")
    for name, value in sorted(child_env.items()):
        if name.startswith("LISTEN_"):
            continue
        command += ["-E", f"{name}={value}"]
    proc = Process([*command, *argv], log_path, env=child_env)
    proc.wait_for(rf"Listening on 127\.0\.0\.1:{port}")
    proc.host, proc.port = "127.0.0.1", port
    return proc


def stock_env(**extra: str) -> dict[str, str]:
    """The tests' child environment plus ``extra`` (notify variables, twistd args)."""
    env = subprocess_env()
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    env.update(extra)
    return env
