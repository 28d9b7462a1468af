"""Tracker at scale: N boards, each on its own connection, stock tracker and ours.

Helper processes each hold thousands of board connections, registered the
way a stock server registers (magic, ``UPDATE_INFO`` with a ``server:`` key,
``PUT``); then, with every board in place, this measures:

- SUMMARY p50 from the stock client (the reply lists every board);
- the tracker's RSS at that size;
- REQUEST round-trip p50 and REQUEST/s from 8 client processes, each on its
  own connection with the stock client's wire code.

Stock and ours run one after the other (never both loaded at once), each
against the same helpers' code. Our tracker runs with
``--max-connections-per-peer 0`` (every board comes from 127.0.0.1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil
from tvm.rpc import base
from tvm.rpc.client import TrackerSession

from bench.report import Table
from tvmrpc.harness import Daemon, Process, running, start_stock_tracker

CODE = base.TrackerCode
KEY = "scale"
HELPERS = 4
CLIENTS = 8
#: Targets from issue 13 (our tracker).
SUMMARY_TARGET_MS = 20.0
RSS_TARGET_MIB = 64.0
#: Our tracker's listen backlog here. Each helper connects its boards as fast as
#: connect() returns; with Twisted's default of 50 the accept queue overflows and
#: the kernel drops SYNs, each costing its board a 1 s (then 3 s) retransmit:
#: registering 10,000 boards took 115 s instead of 8. Operators see the same
#: after a restart (docs/tracker.md: "At scale").
BACKLOG = 4096


def start_ours(logs: Path) -> Daemon:
    """Our tracker on a kernel-chosen port with a backlog for N boards connecting at once."""
    daemon = Daemon(
        "tvm-tracker",
        [
            "--listen",
            f"tcp:0:interface=127.0.0.1:backlog={BACKLOG}",
            # Every board comes from 127.0.0.1: lift the per-peer cap (default 512).
            "--max-connections-per-peer",
            "0",
        ],
        logs / "tracker.log",
    )
    daemon.wait_listening()
    return daemon


def raise_nofile() -> None:
    """Lift the soft open-files limit to the hard one (inherited by children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def frame(value) -> bytes:
    data = json.dumps(value).encode()
    return struct.pack("<i", len(data)) + data


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    return base.recvall(sock, n)


def _boards(port: int, first: int, count: int, lock, ready, done) -> None:
    """Hold ``count`` board connections, registered as stock servers register."""
    raise_nofile()
    socks = []
    magic = struct.pack("<i", base.RPC_TRACKER_MAGIC)
    # Stock's tracker reads the magic as a message of its own: send it, and
    # the registration only once the magic came back (as a stock server does).
    with lock:  # one helper connects at a time: stock's tracker listens with a backlog of 1
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(magic)
            socks.append(sock)
    for i, sock in enumerate(socks, first):
        assert struct.unpack("<i", _recv_exact(sock, 4))[0] == base.RPC_TRACKER_MAGIC
        info = {"key": f"server:{KEY}", "addr": [None, 10000 + i % 50000]}
        sock.sendall(
            frame([CODE.UPDATE_INFO, info])
            + frame([CODE.PUT, KEY, [10000 + i % 50000, f"{KEY}:{i}"], None])
        )
    for sock in socks:  # replies read after every board wrote its registration
        for _ in range(2):
            assert base.recvjson(sock) == 0
    ready.put(count)
    done.wait()
    for sock in socks:
        sock.close()


def _client(port: int, count: int, seconds: float, start, out) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
    assert struct.unpack("<i", _recv_exact(sock, 4))[0] == base.RPC_TRACKER_MAGIC
    samples = []
    start.wait()
    deadline = time.perf_counter() + seconds
    while len(samples) < count and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        base.sendjson(sock, [CODE.REQUEST, KEY, "bench", 1])
        reply = base.recvjson(sock)
        samples.append(time.perf_counter() - t0)
        assert reply[0] == CODE.SUCCESS, reply
    sock.close()
    out.put(samples)


def _next(queue, procs, timeout: float = 300):
    """The next item from ``queue``; an error at once if one of ``procs`` died."""
    import queue as queues

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except queues.Empty as empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a bench helper process failed (exit {dead[0].exitcode})"
                ) from empty
    raise RuntimeError("bench helpers timed out")


def measure(
    proc: Process, port: int, boards: int, requests: int, n: int, seconds: float
) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    ready, done, lock = ctx.Queue(), ctx.Event(), ctx.Lock()
    each = boards // HELPERS
    helpers = [
        ctx.Process(target=_boards, args=(port, h * each, each, lock, ready, done))
        for h in range(HELPERS)
    ]
    t0 = time.perf_counter()
    for helper in helpers:
        helper.start()
    try:
        registered = sum(_next(ready, helpers) for _ in helpers)
        register_s = time.perf_counter() - t0
        tracker = psutil.Process(proc.proc.pid)
        rss_registered = tracker.memory_info().rss / (1 << 20)
        session = TrackerSession(("127.0.0.1", port))
        summary = session.summary()
        assert summary["queue_info"][KEY]["free"] == registered, summary["queue_info"]
        assert len(summary["server_info"]) >= registered
        samples = []
        for _ in range(n):
            t1 = time.perf_counter()
            session.summary()
            samples.append(time.perf_counter() - t1)
        session.close()
        rss = tracker.memory_info().rss / (1 << 20)
        start, out = ctx.Event(), ctx.Queue()
        per_client = requests // CLIENTS
        clients = [
            ctx.Process(target=_client, args=(port, per_client, seconds, start, out))
            for _ in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        t2 = time.perf_counter()
        start.set()
        got = [_next(out, clients) for _ in clients]
        wall = time.perf_counter() - t2
        for client in clients:
            client.join()
    finally:
        done.set()
        for helper in helpers:
            helper.join(timeout=60)
    flat = [s for chunk in got for s in chunk]
    return {
        "register": register_s,
        "summary": statistics.median(samples) * 1e3,
        "rss": rss,
        "rss_registered": rss_registered,
        "request": statistics.median(flat) * 1e3,
        "rate": len(flat) / wall,
    }


def main(flags: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale")
    parser.add_argument("--quick", action="store_true", help="1,000 boards instead of 10,000")
    parser.add_argument("--boards", type=int, help="number of boards (default 10000)")
    parser.add_argument(
        "--stock-boards",
        type=int,
        default=None,
        help="boards for the stock tracker (default 200, 50 with --quick: it takes ~0.2 s "
        "per board to register, as its listen backlog is 1 and each reply is two writes; "
        "0 skips it)",
    )
    args, _ = parser.parse_known_args(flags)
    boards = args.boards or (1000 if args.quick else 10000)
    requests = min(boards, 400 if args.quick else 8000)
    n = 20 if args.quick else 50
    seconds = 1.0 if args.quick else 3.0  # REQUEST clients stop at this or ``requests``
    raise_nofile()
    stock_boards = args.stock_boards if args.stock_boards is not None else 50 if args.quick else 200
    small = min(stock_boards, boards)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        logs = Path(tmp)
        if small:
            with running(start_stock_tracker(logs)) as stock:
                figures["stock"] = measure(stock, stock.port, small, small, n, seconds)
        for size in sorted({small, boards} - {0}):
            with running(start_ours(logs)) as ours:
                figures[size] = measure(ours, ours.port, size, min(size, requests), n, seconds)
    if small:
        stock, ours = figures["stock"], figures[small]
        table = Table(
            f"tracker at scale, side by side ({small} boards on {small} connections from "
            f"{HELPERS} processes; {CLIENTS} client processes)"
        )
        table.add("register every board (s)", stock["register"], ours["register"], "lower")
        table.add("SUMMARY p50 (ms)", stock["summary"], ours["summary"], "lower")
        table.add("tracker RSS (MiB)", stock["rss"], ours["rss"], "lower")
        table.add(
            f"REQUEST p50, {CLIENTS} clients (ms)", stock["request"], ours["request"], "lower"
        )
        table.add(f"REQUEST/s, {CLIENTS} clients", stock["rate"], ours["rate"], "higher")
        print(table.render(), flush=True)
    big = figures[boards]
    print(
        f"== our tracker at {boards} boards on {boards} connections "
        f"({CLIENTS} client processes) ==",
        flush=True,
    )
    for label, value, target, unit in (
        ("register every board", big["register"], None, "s"),
        ("SUMMARY p50", big["summary"], SUMMARY_TARGET_MS, "ms"),
        ("tracker RSS, boards registered", big["rss_registered"], None, "MiB"),
        ("tracker RSS, after SUMMARY", big["rss"], RSS_TARGET_MIB, "MiB"),
        (f"REQUEST p50, {CLIENTS} clients", big["request"], None, "ms"),
        (f"REQUEST/s, {CLIENTS} clients", big["rate"], None, "/s"),
    ):
        verdict = ""
        if target is not None and boards >= 10000:
            met = "met" if value <= target else "NOT met"
            verdict = f"   target <= {target:g} {unit}: {met}"
        print(f"{label + ' (' + unit + ')':<48} {value:>12.3f}{verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
