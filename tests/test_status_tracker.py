"""The tracker's and our server's status endpoints against a real lab.

Our tracker and our server (with ``--status``) and a stock server; stock
clients hold boards, queue, upload and download, crash a worker. Then
``/metrics`` is read with prometheus_client's own parser and
``/api/v1/status`` is checked against what happened.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.server_support import init_module_dir, server_env, start_server
from tests.status_support import STATUS_FLAG, get, metrics, status, status_port, value
from tests.support import (
    Daemon,
    running,
    start_stock_server,
    start_tracker,
    stock_tracker_socket,
)
from tests.test_tracker_interop import wait_until

pytestmark = pytest.mark.stock

BLOB = 4 << 20  # bytes uploaded and downloaded per session


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("status-lab")
    logs = root / "logs"
    logs.mkdir()
    path, module = init_module_dir(root / "init")
    tracker = start_tracker(logs, *STATUS_FLAG)
    with running(tracker):
        status_port(tracker)
        addr = f"127.0.0.1:{tracker.port}"
        server = start_server(
            logs, "obs", "--tracker", addr, "--init", module, *STATUS_FLAG, env=server_env(path)
        )
        with running(server):
            status_port(server)
            stock = start_stock_server(logs, "stock-obs", tracker=("127.0.0.1", tracker.port))
            with running(stock):
                tracker.wait_for(r"server:stock-obs registered")
                tracker.wait_for(r"server:obs registered")
                yield tracker, server


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def board(doc: dict, key: str) -> dict:
    (found,) = [b for b in doc["boards"] if b["key"] == key]
    return found


def test_session_queue_and_bytes_are_seen(lab):
    tracker, server = lab
    before_t, before_s = metrics(tracker.status_port), metrics(server.status_port)
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    session = client.request("obs", priority=1, session_timeout=60)

    # A busy board shows its holder.
    doc = status(tracker.status_port)
    held = board(doc, "obs")
    assert held["state"] == "busy"
    assert held["holder"]["address"] == "127.0.0.1"
    assert held["holder"]["since"] <= doc["now"]
    assert board(doc, "stock-obs")["state"] == "free"
    assert status(server.status_port)["state"] == "busy"

    # A second request queues; PING on the same connection proves it was taken in.
    waiter = stock_tracker_socket(tracker.port)
    base.sendjson(waiter, [base.TrackerCode.REQUEST, "obs", "waiter", 7])
    base.sendjson(waiter, [base.TrackerCode.PING])
    assert base.recvjson(waiter) == base.TrackerCode.SUCCESS
    queued = status(tracker.status_port)["queues"]["obs"]
    (entry,) = queued["waiting"]
    assert entry["priority"] == 7
    assert entry["user"] == "waiter"
    assert entry["age"] > 0
    seen_age = entry["age"]

    session.upload(bytearray(BLOB), "blob")
    assert len(session.download("blob")) == BLOB
    del session
    gc.collect()  # a stock session ends when it is collected

    # The board is PUT again; the queued request gets it and really uses it.
    reply = base.recvjson(waiter)
    assert reply[0] == base.TrackerCode.SUCCESS
    host, port, matchkey = reply[1]
    mark = tracker.mark()
    second = rpc.connect(host, port, key=matchkey)
    second.upload(bytearray(BLOB), "blob")
    del second
    gc.collect()
    tracker.wait_for(r"session on obs board .* released, outcome ok", start=mark)
    waiter.close()

    after_t, after_s = metrics(tracker.status_port), metrics(server.status_port)
    assert delta(before_t, after_t, "tvmrpc_tracker_requests_total", key="obs") == 2
    assert delta(before_t, after_t, "tvmrpc_tracker_assignments_total", key="obs") == 2
    assert delta(before_t, after_t, "tvmrpc_tracker_queue_wait_seconds_count", key="obs") == 2
    wait_sum = delta(before_t, after_t, "tvmrpc_tracker_queue_wait_seconds_sum", key="obs")
    assert wait_sum >= seen_age  # the waiter waited at least as long as the page showed
    assert delta(before_t, after_t, "tvmrpc_tracker_sessions_total", key="obs") == 2
    assert value(after_t, "tvmrpc_tracker_queued", key="obs") == 0

    assert delta(before_s, after_s, "tvmrpc_server_sessions_total", outcome="ok") == 2
    assert delta(before_s, after_s, "tvmrpc_server_session_seconds_count") == 2
    bytes_in = delta(before_s, after_s, "tvmrpc_server_bytes_in_total")
    bytes_out = delta(before_s, after_s, "tvmrpc_server_bytes_out_total")
    print(
        f"server counted {bytes_in:.0f} bytes in, {bytes_out:.0f} out for 2x{BLOB} up, {BLOB} down"
    )
    assert 2 * BLOB <= bytes_in <= 2 * BLOB * 1.01
    assert BLOB <= bytes_out <= BLOB * 1.01

    # The server's records name the real client; the tracker's carry the server's bytes.
    records = status(server.status_port)["sessions"]
    assert records[0]["client"].startswith("127.0.0.1:")
    assert records[0]["outcome"] == "ok"
    recent = status(tracker.status_port)["sessions"]
    latest = next(r for r in recent if r["key"] == "obs")
    assert latest["user"] == "waiter"
    assert latest["ended_by"] == "released"
    assert latest["outcome"] == "ok"
    assert BLOB <= latest["bytes_in"] <= BLOB * 1.01
    assert latest["hold"] > 0
    assert latest["queue_wait"] >= seen_age


def test_crashed_session_shows_as_crashed(lab):
    tracker, server = lab
    before = metrics(server.status_port)
    mark = tracker.mark()
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    session = client.request("obs", session_timeout=60)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the stock client's error varies
        session.get_function("tvmrpc_test.crash")()
    del session
    gc.collect()  # a stock session ends when it is collected
    tracker.wait_for(r"session on obs board .* outcome crashed", start=mark)
    after = metrics(server.status_port)
    assert (
        value(after, "tvmrpc_server_sessions_total", outcome="crashed")
        - value(before, "tvmrpc_server_sessions_total", outcome="crashed")
        == 1
    )
    latest = next(r for r in status(tracker.status_port)["sessions"] if r["key"] == "obs")
    assert latest["outcome"] == "crashed"
    server_doc = status(server.status_port)
    assert server_doc["sessions"][0]["outcome"] == "crashed"
    assert server_doc["sessions"][0]["exit"] == 3
    assert server_doc["ready"] is True


def test_stock_server_hold_is_recorded(lab):
    tracker, _ = lab
    mark = tracker.mark()
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    session = client.request("stock-obs", session_timeout=60)
    assert board(status(tracker.status_port), "stock-obs")["state"] == "busy"
    session.upload(bytearray(1024), "small")
    del session
    gc.collect()  # a stock session ends when it is collected
    tracker.wait_for(r"session on stock-obs board .* released", start=mark)
    latest = next(r for r in status(tracker.status_port)["sessions"] if r["key"] == "stock-obs")
    assert latest["hold"] > 0
    assert latest["outcome"] is None  # stock servers do not report outcomes
    samples = metrics(tracker.status_port)
    assert value(samples, "tvmrpc_tracker_registrations_total") >= 2
    assert value(samples, "tvmrpc_tracker_free", key="stock-obs") == 1


def test_endpoints_answer_with_their_types(lab):
    tracker, server = lab
    kind, page = get(tracker.status_port, "/")
    assert kind.startswith("text/html")
    assert b"api/v1/status" in page
    assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")  # nothing external
    kind, body = get(tracker.status_port, "/metrics")
    assert kind.startswith("text/plain")
    assert b"tvmrpc_tracker_connections_total" in body
    assert json.loads(get(server.status_port, "/api/v1/status")[1])["daemon"] == "server"


def test_bad_frames_and_evictions_are_counted(lab):
    tracker, _ = lab
    before = metrics(tracker.status_port)
    bad = stock_tracker_socket(tracker.port)
    bad.sendall(b"\x05\x00\x00\x00nope!")
    assert bad.recv(16) == b""  # closed by the tracker
    bad.close()
    board_conn = stock_tracker_socket(tracker.port)
    base.sendjson(
        board_conn, [base.TrackerCode.UPDATE_INFO, {"key": "server:gone", "addr": [None, 1]}]
    )
    assert base.recvjson(board_conn) == base.TrackerCode.SUCCESS
    assert board(status(tracker.status_port), "gone")["state"] == "withdrawn"
    mark = tracker.mark()
    board_conn.close()
    tracker.wait_for(r"server:gone at \S+ disconnected", start=mark)
    after = metrics(tracker.status_port)
    assert (
        value(after, "tvmrpc_tracker_bad_frames_total")
        - value(before, "tvmrpc_tracker_bad_frames_total")
        == 1
    )
    assert (
        value(after, "tvmrpc_tracker_evictions_total")
        - value(before, "tvmrpc_tracker_evictions_total")
        == 1
    )
    assert not [b for b in status(tracker.status_port)["boards"] if b["key"] == "gone"]


def test_timeout_is_an_outcome(lab):
    tracker, server = lab
    before = metrics(server.status_port)
    mark = server.mark()
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    session = client.request("obs", session_timeout=1)
    assert status(server.status_port)["current"]["timeout"] == 1
    with pytest.raises(Exception, match="RPCSessionTimeoutError"):
        session.get_function("tvmrpc_test.sleep")(60)
    server.wait_for(r"session of \S+ on obs: timeout", start=mark)
    after = metrics(server.status_port)
    assert delta(before, after, "tvmrpc_server_sessions_total", outcome="timeout") == 1
    assert status(server.status_port)["sessions"][0]["outcome"] == "timeout"


def test_zygote_restart_and_readiness(tmp_path):
    server = start_server(tmp_path, "z", *STATUS_FLAG)
    with running(server):
        port = status_port(server)
        assert value(metrics(port), "tvmrpc_server_ready") == 1
        zygote = int(server.wait_for(r"worker zygote (\d+) warm").group(1))
        mark = server.mark()
        os.kill(zygote, signal.SIGKILL)
        server.wait_for(r"worker zygote gone", start=mark)
        server.wait_for(r"worker zygote \d+ warm", start=mark)
        # ready again means warm and health-checked (not merely warm)
        server.wait_for(r"board ready: health check passed", start=mark)
        samples = metrics(port)
        assert value(samples, "tvmrpc_server_zygote_restarts_total") == 1
        assert value(samples, "tvmrpc_server_ready") == 1


def test_status_endpoint_that_cannot_listen_exits_1(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        tracker = Daemon(
            "tvm-tracker",
            [
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--status",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            tmp_path / "tracker.log",
        )
        with running(tracker):
            tracker.wait_for(r"cannot serve on --status tcp:\d+\S*: .*give a free endpoint")
            assert tracker.proc.wait(30) == 1


def test_stock_tracker_carries_our_servers_report(tmp_path):
    from tests.support import start_stock_tracker

    with running(start_stock_tracker(tmp_path)) as stock:
        server = start_server(tmp_path, "rep", "--tracker", f"127.0.0.1:{stock.port}")
        with running(server):
            server.wait_for(r"registered with tracker")
            client = rpc.connect_tracker("127.0.0.1", stock.port)
            for _ in range(2):
                mark = server.mark()
                session = client.request("rep", session_timeout=60)
                session.upload(bytearray(1 << 20), "blob")
                del session
                gc.collect()  # a stock session ends when it is collected
                server.wait_for(r"session of \S+ on rep: ok", start=mark)
            # The report rides on the UPDATE_INFO sent just before the next PUT: once a
            # request is served again, the stock tracker has stored it.
            third = client.request("rep", session_timeout=60)
            (info,) = [i for i in client.summary()["server_info"] if i["key"] == "server:rep"]
            del third
            gc.collect()
            assert info["tvmrpc"]["sessions"] == 2
            assert info["tvmrpc"]["outcomes"]["ok"] == 2
            assert info["tvmrpc"]["last_session"]["outcome"] == "ok"
            assert (1 << 20) <= info["tvmrpc"]["last_session"]["bytes_in"] <= (1 << 20) * 1.01


def test_admin_api_on_the_status_endpoint_drains_and_resumes(tmp_path):
    import subprocess
    import sys

    from tests.support import subprocess_env

    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    tracker = start_tracker(tmp_path, *STATUS_FLAG, "--admin-token-file", str(token))
    with running(tracker):
        port = status_port(tracker)
        server = start_server(tmp_path, "adm", "--tracker", f"127.0.0.1:{tracker.port}")
        with running(server):
            tracker.wait_for(r"server:adm registered")
            # registered (UPDATE_INFO) comes before the PUT that offers the board
            entry = wait_until(
                lambda: next(
                    (b for b in status(port)["boards"] if b["key"] == "adm" and b["free"]), None
                ),
                "the board on offer",
            )
            assert entry["state"] == "free"

            def labctl(action: str) -> None:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tvmrpc.cli",
                        action,
                        "--tracker-status",
                        f"http://127.0.0.1:{port}",
                        "--token-file",
                        str(token),
                        entry["address"],
                    ],
                    env=subprocess_env(),
                    check=True,
                    timeout=60,
                    capture_output=True,
                )

            labctl("drain")
            (drained,) = [b for b in status(port)["boards"] if b["key"] == "adm"]
            assert drained["state"] == "maintenance"
            waiter = stock_tracker_socket(tracker.port)
            base.sendjson(waiter, [base.TrackerCode.REQUEST, "adm", "patient", 0])
            base.sendjson(waiter, [base.TrackerCode.PING])
            assert base.recvjson(waiter) == base.TrackerCode.SUCCESS
            assert len(status(port)["queues"]["adm"]["waiting"]) == 1
            assert value(metrics(port), "tvmrpc_tracker_maintenance", key="adm") == 1
            labctl("resume")
            reply = base.recvjson(waiter)  # served at once on resume
            assert reply[0] == base.TrackerCode.SUCCESS
            (held,) = [b for b in status(port)["boards"] if b["key"] == "adm"]
            assert held["state"] == "busy"
            waiter.close()
