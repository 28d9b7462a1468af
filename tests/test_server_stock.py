"""Our server (``twistd -n tvm-server``) with stock clients: direct, via trackers, via a proxy."""

from __future__ import annotations

import gc
import threading

import pytest
from tvm import rpc

from tests.proxy_support import start_proxy
from tests.server_support import (
    blocker_dir,
    init_module_dir,
    mlp_library,  # noqa: F401 - fixture
    server_env,
    start_server,
)
from tests.support import running, start_stock_tracker, start_tracker
from tvmrpc.mlp import run_mlp

pytestmark = pytest.mark.stock


def test_worker_without_numpy_serves_mlp_and_files(log_dir, tmp_path, mlp_library):  # noqa: F811
    """numpy, cloudpickle and tornado unimportable in daemon and worker: the MLP still runs."""
    init_dir, init = init_module_dir(tmp_path / "init")
    env = server_env(blocker_dir(tmp_path / "blocked"), init_dir)
    with running(start_server(log_dir, "board", "--init", init, env=env)) as server:
        session = rpc.connect("127.0.0.1", server.port, key="board", session_timeout=60)
        assert run_mlp(session, mlp_library).ok
        # The worker really cannot import them, and never loaded them (nor tvm itself).
        try_import = session.get_function("tvmrpc_test.try_import")
        for name in ("numpy", "cloudpickle", "tornado"):
            assert "is blocked" in try_import(name)
        del try_import  # a remote function keeps its session open
        assert session.get_function("tvmrpc_test.heavy_modules")() == ""
        session.upload(bytearray(b"x" * 1024), "blob.bin")
        assert bytes(session.download("blob.bin")) == b"x" * 1024
        assert set(session.listdir(".").split(",")) == {"blob.bin", mlp_library.name}
        session.remove("blob.bin")
        assert session.listdir(".").split(",") == [mlp_library.name]
        for bad in ("../escape.bin", "/tmp/escape.bin", "a/../../escape.bin"):
            with pytest.raises(Exception, match=r"session directory|session-relative"):
                session.upload(bytearray(b"x"), bad)
            with pytest.raises(Exception, match=r"session directory|session-relative"):
                session.download(bad)
        with pytest.raises(Exception, match=r"session directory|session-relative"):
            session.load_module("../" + mlp_library.name)
        del session
        server.wait_for(r"session ended .*worker exit 0")


def test_second_standalone_client_waits_its_turn(log_dir):
    with running(start_server(log_dir, "one")) as server:
        first = rpc.connect("127.0.0.1", server.port, key="one")
        mark = server.mark()
        done = threading.Event()
        result: list[object] = []

        def second() -> None:
            session = rpc.connect("127.0.0.1", server.port, key="one")
            session.upload(bytearray(b"2"), "two")
            result.append(bytes(session.download("two")))
            done.set()

        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        server.wait_for(r"waits its turn", start=mark)
        assert not done.is_set()  # held back while the first session runs
        first.upload(bytearray(b"1"), "one")
        assert bytes(first.download("one")) == b"1"
        del first
        server.wait_for(r"session ended", start=mark)
        thread.join(30)
        assert result == [b"2"]


def test_mlp_through_our_tracker(log_dir, mlp_library):  # noqa: F811
    with running(start_tracker(log_dir)) as tracker:
        tracker_arg = f"127.0.0.1:{tracker.port}"
        with running(start_server(log_dir, "ours", "--tracker", tracker_arg)) as server:
            server.wait_for(r"registered with tracker")
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            session = client.request("ours", session_timeout=60)
            assert run_mlp(session, mlp_library).ok
            del session
            for _ in range(3):  # re-registered after each session
                session = client.request("ours", session_timeout=60)
                session.upload(bytearray(b"k"), "k")
                del session
            summary = client.summary()
            assert any(info["key"] == "server:ours" for info in summary["server_info"])


def test_mlp_through_the_stock_tracker(log_dir, mlp_library):  # noqa: F811
    with running(start_stock_tracker(log_dir)) as tracker:
        tracker_arg = f"127.0.0.1:{tracker.port}"
        with running(start_server(log_dir, "stockt", "--tracker", tracker_arg)) as server:
            server.wait_for(r"registered with tracker")
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            session = client.request("stockt", session_timeout=60)
            assert run_mlp(session, mlp_library).ok
            del session
            session = client.request("stockt", session_timeout=60)
            assert run_mlp(session, mlp_library).ok


def test_tracker_restart_re_registers(log_dir):
    tracker = start_tracker(log_dir, name="tracker-1")
    port = tracker.port
    try:
        tracker_arg = f"127.0.0.1:{port}"
        with running(start_server(log_dir, "again", "--tracker", tracker_arg)) as server:
            server.wait_for(r"registered with tracker")
            mark = server.mark()
            tracker.stop()
            server.wait_for(r"tracker connection lost", start=mark)
            mark = server.mark()
            tracker = _restart_tracker(log_dir, port)
            server.wait_for(r"registered with tracker", start=mark)
            client = rpc.connect_tracker("127.0.0.1", port)
            session = client.request("again", session_timeout=60)
            session.upload(bytearray(b"back"), "back")
            assert bytes(session.download("back")) == b"back"
    finally:
        tracker.stop()


def _restart_tracker(log_dir, port: int):
    from tests.support import Daemon

    daemon = Daemon(
        "tvm-tracker", ["--listen", f"tcp:{port}:interface=127.0.0.1"], log_dir / "tracker-2.log"
    )
    daemon.wait_listening()
    return daemon


def test_mlp_through_our_proxy_and_duplicate_key_is_retried(log_dir, mlp_library):  # noqa: F811
    """A second server with the same key waits (warn, backoff) instead of exiting (issue 14.4)."""
    with running(start_proxy(log_dir)) as proxy:
        args = ["--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port)]
        mark = proxy.mark()
        first = start_server(log_dir, "behind", *args, listen=False)
        with running(first):
            proxy.wait_for(r"waits as server behind\b", start=mark)
            session = rpc.connect("127.0.0.1", proxy.port, key="behind", session_timeout=60)
            assert run_mlp(session, mlp_library).ok
            del session
            first.wait_for(r"session ended")
            first.wait_for(r"waiting at proxy")
            duplicate = start_server(log_dir, "behind", *args, listen=False, name="duplicate")
            with running(duplicate):
                duplicate.wait_for(r"#warn\].*already in use.*retrying in")
                session = rpc.connect("127.0.0.1", proxy.port, key="behind", session_timeout=60)
                session.upload(bytearray(b"p"), "p")
                assert bytes(session.download("p")) == b"p"
                del session
                gc.collect()  # a stock client's session closes when collected
                first.stop()
                session = rpc.connect("127.0.0.1", proxy.port, key="behind", session_timeout=60)
                session.upload(bytearray(b"q"), "q")
                assert bytes(session.download("q")) == b"q"
                del session
                gc.collect()
                duplicate.wait_for(r"session ended")
                assert duplicate.proc.poll() is None
