"""Scheduling rules of our tracker seen on the stock wire: fair share across client hosts.

Requests and PUTs are sent exactly as stock clients and servers send them
(``tvm.rpc.base``), from two client hosts (127.0.0.1 and 127.0.0.2).
"""

from __future__ import annotations

import json

import pytest
from tvm.rpc import base

from tests.support import running, start_stock_tracker, start_tracker, stock_tracker_socket
from tests.test_tracker_interop import _readable, call, query, summary, wait_until

pytestmark = pytest.mark.stock

KEY = "fair"


def _serve_order(tracker_port: int, requests: list[tuple[str, str]], assignments: int) -> list[str]:
    """Queue ``requests`` (name, client host) in order, PUT ``assignments`` boards one by
    one and return the names served, in order."""
    waiting = {}
    for n, (name, host) in enumerate(requests, start=1):
        sock = stock_tracker_socket(tracker_port, source=host)
        base.sendjson(sock, [base.TrackerCode.REQUEST, KEY, name, 1])
        waiting[name] = sock
        if n == len(requests) or n % 10 == 0:
            wait_until(
                lambda n=n: summary(tracker_port)["queue_info"][KEY]["pending"] == n,
                f"{n} requests queued",
            )
    board = stock_tracker_socket(tracker_port)
    order = []
    try:
        for i in range(assignments):
            assert call(board, [base.TrackerCode.PUT, KEY, [9000 + i, f"{KEY}:{i}"], None]) == 0
            ready = wait_until(lambda: [u for u, s in waiting.items() if _readable(s)], "an answer")
            assert len(ready) == 1
            name = ready[0]
            assert base.recvjson(waiting.pop(name))[1][2] == f"{KEY}:{i}"
            order.append(name)
    finally:
        board.close()
        for sock in waiting.values():
            sock.close()
    return order


def _bulk_then_one(bulk: int) -> list[tuple[str, str]]:
    return [(f"bulk{i}", "127.0.0.1") for i in range(bulk)] + [("dev", "127.0.0.2")]


def test_fair_share_serves_the_second_host_within_two_assignments(log_dir):
    with running(start_tracker(log_dir, "--fair-share")) as tracker:
        order = _serve_order(tracker.port, _bulk_then_one(50), assignments=3)
    print(f"fair share: order of the first three assignments {order}")
    assert "dev" in order[:2]
    assert order == ["bulk0", "dev", "bulk1"]


def test_without_fair_share_stock_order_exactly(log_dir):
    with running(start_tracker(log_dir)) as tracker:
        order = _serve_order(tracker.port, _bulk_then_one(5), assignments=6)
    assert order == ["bulk0", "bulk1", "bulk2", "bulk3", "bulk4", "dev"]


def _query_json(port: int) -> dict:
    result = query("--port", str(port), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_query_json_gives_expected_waits_from_hold_times(log_dir):
    with running(start_tracker(log_dir)) as tracker:
        port = tracker.port
        board = stock_tracker_socket(port)
        clients = []
        try:
            assert call(board, [base.TrackerCode.PUT, "wait", [9000, "wait:0"], None]) == 0
            first = stock_tracker_socket(port)
            assert call(first, [base.TrackerCode.REQUEST, "wait", "a", 1])[0] == 0
            second = stock_tracker_socket(port)
            base.sendjson(second, [base.TrackerCode.REQUEST, "wait", "b", 1])
            clients += [first, second]
            wait_until(lambda: summary(port)["queue_info"]["wait"]["pending"] == 1, "b queued")
            unknown = _query_json(port)
            assert unknown["tvmrpc"]["expected_wait_seconds"] == {"wait": None}  # no hold seen
            # the board is free again: its first hold ends and b is served at once
            assert call(board, [base.TrackerCode.PUT, "wait", [9000, "wait:1"], None]) == 0
            assert base.recvjson(second)[1][2] == "wait:1"
            third = stock_tracker_socket(port)
            base.sendjson(third, [base.TrackerCode.REQUEST, "wait", "c", 1])
            clients.append(third)
            wait_until(lambda: summary(port)["queue_info"]["wait"]["pending"] == 1, "c queued")
            estimate = _query_json(port)["tvmrpc"]["expected_wait_seconds"]["wait"]
            print(f"expected wait for a new request behind one queued and one busy: {estimate} s")
            assert isinstance(estimate, float)
            assert estimate > 0
        finally:
            board.close()
            for sock in clients:
                sock.close()


def test_stock_tracker_answers_our_extended_summary_as_a_plain_one(log_dir):
    with running(start_stock_tracker(log_dir)) as stock:
        summary_json = _query_json(stock.port)
    assert set(summary_json) == {"queue_info", "server_info"}
