"""Our tracker (``twistd -n tvm-tracker``) with stock TVM servers, clients and query."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.support import (
    Daemon,
    free_port,
    run_module,
    running,
    start_stock_server,
    start_tracker,
    stock_tracker_socket,
    subprocess_env,
)
from tvmrpc.mlp import build_mlp, run_mlp

pytestmark = pytest.mark.stock


def call(sock: socket.socket, value):
    base.sendjson(sock, value)
    return base.recvjson(sock)


def summary(port: int) -> dict:
    with stock_tracker_socket(port) as sock:
        reply = call(sock, [base.TrackerCode.SUMMARY])
    assert reply[0] == 0
    return reply[1]


def wait_until(predicate, what: str, timeout: float = 30.0):
    """Poll tracker state (not a sleep as synchronisation: state has no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvmrpc.cli", "query", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )


@pytest.fixture
def tracker(log_dir):
    with running(start_tracker(log_dir, "--verbose")) as daemon:
        yield daemon


def test_stock_server_and_client_run_a_compiled_model(tracker, log_dir, tmp_path):
    library = build_mlp(tmp_path / "model")
    with running(start_stock_server(log_dir, "mlpkey", tracker=("127.0.0.1", tracker.port))):
        tracker.wait_for(r"server:mlpkey registered from 127\.0\.0\.1")
        client = rpc.connect_tracker("127.0.0.1", tracker.port)
        session = client.request("mlpkey", priority=2, session_timeout=60)
        assert session.get_function("testing.echo")("hello") == "hello"
        result = run_mlp(session, library)
        assert result.ok, (result.output, result.expected)


def test_query_is_byte_identical_to_stock(tracker, log_dir):
    port = tracker.port
    servers = [
        start_stock_server(log_dir, key, tracker=("127.0.0.1", port), name=f"s{i}")
        for i, key in enumerate(["rasp3b", "rk3399", "rk3399"])
    ]
    try:
        wait_until(
            lambda: (
                summary(port)["queue_info"].get("rk3399", {}).get("free") == 2
                and summary(port)["queue_info"].get("rasp3b", {}).get("free") == 1
            ),
            "three stock servers registered",
        )
        stock = run_module(
            "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1", "--port", str(port)
        ).stdout
        ours = query("--host", "127.0.0.1", "--port", str(port))
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == stock
        assert "server:rk3399" in ours.stdout
        as_json = json.loads(query("--host", "127.0.0.1", "--port", str(port), "--json").stdout)
        assert as_json["queue_info"]["rk3399"] == {"free": 2, "pending": 0}
        assert len(as_json["server_info"]) == 3
    finally:
        for server in servers:
            server.stop()


def test_query_errors_are_one_line(log_dir):
    port = free_port()
    refused = query("--port", str(port))
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1
    assert f"cannot query tracker at 127.0.0.1:{port}" in refused.stderr
    with running(start_stock_server(log_dir, "notatracker")) as server:
        wrong = query("--port", str(server.port), "--timeout", "5")
    assert wrong.returncode == 1
    assert "cannot query tracker" in wrong.stderr


def test_priority_then_fifo_with_stock_wire(tracker):
    port = tracker.port
    clients = []
    for user, priority in [("low", 1), ("high-a", 5), ("mid", 3), ("high-b", 5)]:
        sock = stock_tracker_socket(port)
        base.sendjson(sock, [base.TrackerCode.REQUEST, "prio", user, priority])
        clients.append((user, sock))
        wait_until(
            lambda n=len(clients): summary(port)["queue_info"]["prio"]["pending"] == n,
            f"{len(clients)} requests queued",
        )
    server = stock_tracker_socket(port)
    order = []
    remaining = dict(clients)
    for i in range(4):
        assert call(server, [base.TrackerCode.PUT, "prio", [9000 + i, f"prio:{i}"], None]) == 0
        ready = wait_until(lambda: [u for u, s in remaining.items() if _readable(s)], "an answer")
        assert len(ready) == 1
        user = ready[0]
        reply = base.recvjson(remaining.pop(user))
        assert reply == [0, ["127.0.0.1", 9000 + i, f"prio:{i}"]]
        order.append(user)
    assert order == ["high-a", "high-b", "mid", "low"]
    for _, sock in clients:
        sock.close()
    server.close()


def _readable(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def test_gone_clients_and_servers_leave_the_queue(tracker, log_dir):
    """The two stock weaknesses: dead requests stay pending; PUTs without UPDATE_INFO stay."""
    port = tracker.port
    waiting = stock_tracker_socket(port)
    base.sendjson(waiting, [base.TrackerCode.REQUEST, "gone", "u", 1])
    wait_until(lambda: summary(port)["queue_info"]["gone"]["pending"] == 1, "queued request")
    waiting.close()
    # Stock keeps the key with pending 1; ours drops the request and then the idle key.
    wait_until(lambda: "gone" not in summary(port)["queue_info"], "request and key dropped")

    putter = stock_tracker_socket(port)
    assert call(putter, [base.TrackerCode.PUT, "gone", [1234, "gone:1"], None]) == 0
    assert summary(port)["queue_info"]["gone"]["free"] == 1
    putter.close()
    wait_until(lambda: "gone" not in summary(port)["queue_info"], "resource and key dropped")

    server = start_stock_server(log_dir, "killed", tracker=("127.0.0.1", port))
    wait_until(lambda: summary(port)["queue_info"].get("killed", {}).get("free") == 1, "server")
    server.stop()
    wait_until(lambda: "killed" not in summary(port)["queue_info"], "server and key gone")
    assert all(info["key"] != "server:killed" for info in summary(port)["server_info"])


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("<i", 0x12345),
        struct.pack("<ii", base.RPC_TRACKER_MAGIC, -1),
        struct.pack("<ii", base.RPC_TRACKER_MAGIC, 64 << 20),
        struct.pack("<ii", base.RPC_TRACKER_MAGIC, 5) + b"[99] ",
        struct.pack("<ii", base.RPC_TRACKER_MAGIC, 4) + b"\xff\xff\xff\xff",
    ],
    ids=["magic", "negative", "huge", "unknown-code", "not-utf8"],
)
def test_bad_input_harms_nobody_else(tracker, log_dir, garbage):
    port = tracker.port
    with running(start_stock_server(log_dir, "steady", tracker=("127.0.0.1", port))):
        wait_until(lambda: summary(port)["queue_info"].get("steady", {}).get("free") == 1, "reg")
        queued = stock_tracker_socket(port)
        base.sendjson(queued, [base.TrackerCode.REQUEST, "nobody-serves-this", "u", 1])
        mark = tracker.mark()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as bad:
            bad.sendall(garbage)
            assert bad.recv(64) in (b"", struct.pack("<i", base.RPC_TRACKER_MAGIC))
            bad.settimeout(30)
            while bad.recv(64):
                pass  # the tracker closes it
        tracker.wait_for(r"closing tracker connection from 127\.0\.0\.1", start=mark)
        state = summary(port)
        assert state["queue_info"]["steady"] == {"free": 1, "pending": 0}
        assert state["queue_info"]["nobody-serves-this"]["pending"] == 1
        session = rpc.connect_tracker("127.0.0.1", port).request("steady", session_timeout=30)
        assert session.get_function("testing.echo")(42) == 42
        queued.close()


def test_stop_key(log_dir):
    tracker = start_tracker(log_dir, "--stop-key", "letmego", name="stoppable")
    with running(tracker):
        with stock_tracker_socket(tracker.port) as sock:
            assert call(sock, [base.TrackerCode.STOP, "nope"]) == -1
            assert call(sock, [base.TrackerCode.STOP, "letmego"]) == 0
        assert tracker.proc.wait(30) == 0


def test_port_range_takes_next_free_port(log_dir):
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 20)]
    first = Daemon("tvm-tracker", args, log_dir / "first.log")
    with running(first):
        assert first.wait_listening() == port
        second = Daemon("tvm-tracker", args, log_dir / "second.log")
        with running(second):
            assert port < second.wait_listening() < port + 20


def test_many_concurrent_stock_clients_all_served(tracker, log_dir):
    """Eight stock clients queue on one stock server; each gets a session in turn."""
    port = tracker.port
    errors: list[BaseException] = []
    with running(start_stock_server(log_dir, "shared", tracker=("127.0.0.1", port))):
        wait_until(lambda: summary(port)["queue_info"].get("shared", {}).get("free") == 1, "reg")

        def one(i: int) -> None:
            try:
                session = rpc.connect_tracker("127.0.0.1", port).request(
                    "shared", priority=i % 3, session_timeout=60
                )
                assert session.get_function("testing.echo")(i) == i
                del session
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)


def test_busy_listen_endpoint_exits_nonzero(log_dir):
    """A daemon that cannot listen must not linger looking healthy to systemd."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(
            "tvm-tracker", ["--listen", f"tcp:{port}:interface=127.0.0.1"], log_dir / "busy.log"
        )
        with running(daemon):
            daemon.wait_for(r"tvm-tracker cannot listen on")
            assert daemon.proc.wait(30) == 1
