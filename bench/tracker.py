"""Tracker benchmark: the stock tracker and ours, driven by the stock client's wire code.

Both trackers run as subprocesses in the same run; every figure is measured
the same way against each and printed side by side with the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tvm.rpc import base
from tvm.rpc.client import TrackerSession

from bench.report import Table
from tvmrpc.harness import running, start_stock_tracker, start_tracker, stock_tracker_socket

CODE = base.TrackerCode


def connect(port: int) -> socket.socket:
    """A tracker connection made exactly as the stock client makes it (blocking)."""
    return stock_tracker_socket(port, timeout=None)


def call(sock: socket.socket, value):
    base.sendjson(sock, value)  # stock: length and JSON in two writes
    return base.recvjson(sock)


def timed(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def summary_latency(port: int, n: int) -> float:
    session = TrackerSession(("127.0.0.1", port))
    try:
        return p50_ms(timed(session.summary, n))
    finally:
        session.close()


def request_latency(port: int, n: int) -> float:
    """PUT a resource, then time the stock client's REQUEST until it is assigned."""
    putter, client = connect(port), connect(port)
    samples = []
    for i in range(n):
        assert call(putter, [CODE.PUT, "bench", [9000, f"bench:{i}"], None]) == 0
        start = time.perf_counter()
        reply = call(client, [CODE.REQUEST, "bench", "bench", 1])
        samples.append(time.perf_counter() - start)
        assert reply[0] == 0
    putter.close()
    client.close()
    return p50_ms(samples)


def put_rate(port: int, n: int) -> float:
    sock = connect(port)
    start = time.perf_counter()
    for i in range(n):
        assert call(sock, [CODE.PUT, "putrate", [9000, f"putrate:{i}"], None]) == 0
    elapsed = time.perf_counter() - start
    sock.close()
    return n / elapsed


def pipelined_put_rate(port: int, n: int) -> float:
    """PUT/s with ``n`` PUT frames written at once on one connection, replies read after.

    What the tracker itself sustains: the round-trip rate above is bound by
    the Python client's own send/receive per call.
    """
    sock = connect(port)
    frames = []
    for i in range(n):
        data = json.dumps([CODE.PUT, "pipelined", [9000, f"pipelined:{i}"], None]).encode()
        frames.append(struct.pack("<i", len(data)) + data)
    blob = b"".join(frames)
    start = time.perf_counter()
    sender = threading.Thread(target=sock.sendall, args=(blob,))
    sender.start()  # the tracker's flow control may stop reading until replies are read
    for _ in range(n):
        assert base.recvjson(sock) == 0
    elapsed = time.perf_counter() - start
    sender.join()
    sock.close()
    return n / elapsed


def _summary_loop(port: int, seconds: float, out) -> None:
    sock = connect(port)
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        call(sock, [CODE.SUMMARY])
        count += 1
    sock.close()
    out.put(count)


def throughput(port: int, clients: int, seconds: float) -> float:
    """SUMMARY calls per second from ``clients`` stock-wire client processes."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_summary_loop, args=(port, seconds, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    total = sum(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def loaded_summary(port: int, resources: int, requests: int, n: int) -> float:
    """SUMMARY p50 with many free resources and queued requests held open."""
    putter = connect(port)
    # Pipelined: a sequential stock-wire PUT costs ~88 ms against stock, too slow for 10k.
    frames = []
    for i in range(resources):
        data = json.dumps([CODE.PUT, f"load{i % 100}", [9000, f"load{i % 100}:{i}"], None])
        frames.append(struct.pack("<i", len(data)) + data.encode())
    putter.sendall(b"".join(frames))
    assert all(base.recvjson(putter) == 0 for _ in range(resources))
    waiters = []
    for i in range(requests):
        sock = connect(port)
        base.sendjson(sock, [CODE.REQUEST, f"nobody{i % 10}", "bench", 1])
        waiters.append(sock)
    session = TrackerSession(("127.0.0.1", port))
    deadline = time.monotonic() + 60
    while sum(q["pending"] for q in session.summary()["queue_info"].values()) < requests:
        # Requests were sent without waiting for replies; let the tracker take them all in.
        assert time.monotonic() < deadline, "tracker did not queue every request"
    result = p50_ms(timed(session.summary, n))
    session.close()
    for sock in waiters:
        sock.close()
    putter.close()
    return result


def main(flags: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tracker")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument(
        "--status",
        action="store_true",
        help="run our tracker with --status (its /metrics, JSON and page served) to measure "
        "what observability costs",
    )
    args, _ = parser.parse_known_args(flags)
    n = 20 if args.quick else 100
    seconds = 2.0 if args.quick else 5.0
    resources, requests = (1000, 100) if args.quick else (10000, 1000)
    pipelined = 2000 if args.quick else 20000

    suffix = ", ours with --status" if args.status else ""
    table = Table("tracker (stock client wire, loopback)" + suffix)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        extra = ("--status", "tcp:0:interface=127.0.0.1") if args.status else ()
        # Every bench connection comes from 127.0.0.1: lift the per-peer cap (default 512).
        ours_tracker = start_tracker(logs, "--max-connections-per-peer", "0", *extra)
        with running(start_stock_tracker(logs)) as stock, running(ours_tracker) as ours:
            ports = {"stock": stock.port, "ours": ours.port}
            measure = [
                ("SUMMARY p50 (ms)", lambda p: summary_latency(p, n), "lower"),
                ("REQUEST->assign p50 (ms)", lambda p: request_latency(p, n), "lower"),
                ("PUT/s, round trips (1 connection)", lambda p: put_rate(p, n * 5), "higher"),
                (
                    f"PUT/s, {pipelined} pipelined (1 connection)",
                    lambda p: pipelined_put_rate(p, pipelined),
                    "higher",
                ),
                ("SUMMARY/s, 1 client", lambda p: throughput(p, 1, seconds), "higher"),
                ("SUMMARY/s, 8 clients", lambda p: throughput(p, 8, seconds), "higher"),
                (
                    f"SUMMARY p50 at {resources} free / {requests} queued (ms)",
                    lambda p: loaded_summary(p, resources, requests, n),
                    "lower",
                ),
            ]
            print(table.header(), flush=True)  # then each row as it is measured
            for label, fn, better in measure:
                table.add(label, fn(ports["stock"]), fn(ports["ours"]), better)
                print(table.rows[-1].line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
