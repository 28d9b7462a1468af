"""Session directories and workers are cleaned up whatever ends a session (timeout, SIGTERM)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from tvm import rpc

from tests.server_support import (
    alive,
    init_module_dir,
    mlp_library,  # noqa: F401 - fixture
    server_env,
    start_server,
    time_out_a_session,
)
from tests.support import running

pytestmark = pytest.mark.stock


def _start(log_dir, tmp_path, key, *extra):
    path, module = init_module_dir(tmp_path / "init")
    return start_server(log_dir, key, "--init", module, *extra, env=server_env(path))


def test_timed_out_session_loses_its_directory_and_next_gets_a_fresh_one(log_dir, tmp_path):
    with running(_start(log_dir, tmp_path, "dirs")) as server:
        session = rpc.connect("127.0.0.1", server.port, key="dirs", session_timeout=1)
        first_dir = session.get_function("tvm.rpc.server.workpath")(".")
        session.upload(bytearray(b"left behind?"), "f")
        assert os.path.isfile(os.path.join(first_dir, "f"))
        mark = server.mark()
        with pytest.raises(Exception, match="RPCSessionTimeoutError"):
            session.get_function("tvmrpc_test.sleep")(60)
        server.wait_for(r"session ended", start=mark)
        assert not os.path.exists(first_dir)
        session = rpc.connect("127.0.0.1", server.port, key="dirs", session_timeout=60)
        second_dir = session.get_function("tvm.rpc.server.workpath")(".")
        assert second_dir != first_dir
        assert session.listdir(".") == ""


def test_sigterm_aborts_a_busy_session_after_grace(log_dir, tmp_path):
    server = _start(log_dir, tmp_path, "busy", "--grace", "1")
    with running(server):
        zygote = int(server.wait_for(r"worker zygote (\d+) warm").group(1))
        session = rpc.connect("127.0.0.1", server.port, key="busy")
        worker = session.get_function("tvmrpc_test.pid")()
        session_dir = session.get_function("tvm.rpc.server.workpath")(".")
        sleep = session.get_function("tvmrpc_test.sleep")
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: _call(sleep, 120, outcome), daemon=True)
        thread.start()
        children = _children(zygote)  # the session's worker and the spare forked ahead
        assert worker in children
        os.kill(server.proc.pid, signal.SIGTERM)  # the daemon alone, as systemd's KillMode=mixed
        server.wait_for(r"grace period over")
        server.wait_for(r"tvm-server stopped")
        server.proc.wait(30)
        thread.join(30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], Exception), outcome
        assert not alive(zygote)
        assert not [pid for pid in children if alive(pid)]
        assert not os.path.exists(session_dir)


def test_killed_zygote_is_restarted_and_leaves_no_orphan(log_dir, tmp_path):
    with running(_start(log_dir, tmp_path, "phoenix")) as server:
        assert _round_trip(server.port, "phoenix")
        zygote = int(server.wait_for(r"worker zygote (\d+) warm").group(1))
        children = _children(zygote)
        assert children, "the zygote keeps a spare worker forked ahead"
        mark = server.mark()
        os.kill(zygote, signal.SIGKILL)
        server.wait_for(r"worker zygote (\d+) warm", start=mark)
        assert not alive(zygote)
        assert _round_trip(server.port, "phoenix")
        # A spare forked by the dead zygote notices and exits (nobody else would reap it).
        for pid in children:
            _wait_gone(pid)


def _round_trip(port: int, key: str) -> bool:
    session = rpc.connect("127.0.0.1", port, key=key, session_timeout=60)
    session.upload(bytearray(b"ok"), "ok")
    return bytes(session.download("ok")) == b"ok"


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait for ``pid`` to exit (pidfd: an event, not a poll); fail after ``timeout``."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if alive(pid):
            assert select.select([fd], [], [], timeout)[0], f"process {pid} still runs"
    finally:
        os.close(fd)


def _call(fn, arg, outcome: list[object]) -> None:
    try:
        outcome.append(fn(arg))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        outcome.append(exc)


def test_load_library_is_mapped_in_every_worker(log_dir, tmp_path, mlp_library):  # noqa: F811
    library = tmp_path / "extra.so"
    library.write_bytes(mlp_library.read_bytes())
    with running(_start(log_dir, tmp_path, "lib", "--load-library", str(library))) as server:
        for _ in range(2):  # a fresh worker each session, each with the library loaded
            session = rpc.connect("127.0.0.1", server.port, key="lib")
            pid = session.get_function("tvmrpc_test.pid")()
            assert str(library) in Path(f"/proc/{pid}/maps").read_text()
            del session


def test_session_timeout_through_a_proxy_comes_from_the_forwarded_key(log_dir, tmp_path):
    from tests.proxy_support import start_proxy

    with running(start_proxy(log_dir)) as proxy:
        args = ["--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port)]
        path, module = init_module_dir(tmp_path / "init")
        server = start_server(
            log_dir, "far", "--init", module, *args, env=server_env(path), listen=False
        )
        with running(server):
            server.wait_for(r"waiting at proxy")
            time_out_a_session(server, proxy.port, "far")
