"""Helpers for the server tests: start ``twistd tvm-server``, an init module, raw handshakes."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from tests.support import subprocess_env
from tvmrpc.codec import RPC_MAGIC
from tvmrpc.harness.starters import start_server

__all__ = ["start_server"]  # shared with the bench through tvmrpc.harness

BLOCKED = ("numpy", "cloudpickle", "tornado")

#: An ``--init`` module: functions a test calls to make a session slow or crash.
INIT_MODULE = """
import os, sys, time
import tvm_ffi

@tvm_ffi.register_global_func("tvmrpc_test.sleep", override=True)
def _sleep(seconds):
    time.sleep(seconds)
    return 0

@tvm_ffi.register_global_func("tvmrpc_test.crash", override=True)
def _crash():
    os._exit(3)

@tvm_ffi.register_global_func("tvmrpc_test.segfault", override=True)
def _segfault():
    import signal
    os.kill(os.getpid(), signal.SIGSEGV)

@tvm_ffi.register_global_func("tvmrpc_test.fork_sleepers", override=True)
def _fork_sleepers(count):
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(3600)
            finally:
                os._exit(0)
        pids.append(pid)
    return ",".join(map(str, pids))

@tvm_ffi.register_global_func("tvmrpc_test.pid", override=True)
def _pid():
    return os.getpid()

@tvm_ffi.register_global_func("tvmrpc_test.heavy_modules", override=True)
def _heavy_modules():
    heavy = ("numpy", "cloudpickle", "tornado", "tvm")
    return ",".join(sorted(m for m in heavy if sys.modules.get(m) is not None))

@tvm_ffi.register_global_func("tvmrpc_test.try_import", override=True)
def _try_import(name):
    try:
        __import__(name)
    except ImportError as exc:
        return str(exc)
    return ""
"""


@pytest.fixture(scope="session")
def mlp_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference relax MLP, compiled once per test run."""
    from tvmrpc.mlp import build_mlp

    return build_mlp(tmp_path_factory.mktemp("mlp"))


def blocker_dir(path: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes numpy, cloudpickle and tornado unimportable."""
    path.mkdir(parents=True, exist_ok=True)
    for name in BLOCKED:
        (path / f"{name}.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    return path


def init_module_dir(path: Path, name: str = "tvmrpc_test_init") -> tuple[Path, str]:
    """Write :data:`INIT_MODULE` as ``name`` under ``path``; return (dir, module name)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.py").write_text(INIT_MODULE)
    return path, name


def server_env(*first_on_path: Path) -> dict[str, str]:
    """Child environment with ``first_on_path`` ahead of everything on PYTHONPATH."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first_on_path), env["PYTHONPATH"]])
    return env


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def raw_connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def handshake_bytes(key: str | bytes, magic: int = RPC_MAGIC, length: int | None = None) -> bytes:
    data = key.encode() if isinstance(key, str) else key
    return struct.pack("<ii", magic, len(data) if length is None else length) + data


def answer(sock: socket.socket) -> bytes:
    """What the peer sent before closing (``b""`` on EOF or reset)."""
    try:
        return sock.recv(64)
    except ConnectionResetError:
        return b""


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed (EOF or reset) without sending anything."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def time_out_a_session(server, port: int, key: str) -> int:
    """A stock client's session through ``port`` outlives ``session_timeout=1``: the client
    gets RPCSessionTimeoutError and ``server`` logs the timeout. Returns the log mark taken
    before the session's call (the client's session is closed on return)."""
    from tvm import rpc

    session = rpc.connect("127.0.0.1", port, key=key, session_timeout=1)
    mark = server.mark()
    with pytest.raises(Exception, match="RPCSessionTimeoutError"):
        session.get_function("tvmrpc_test.sleep")(60)
    server.wait_for(r"session timeout after 1(\.0)?s", start=mark)
    return mark
