"""Proxy benchmark: the stock proxy and ours side by side, with a direct baseline.

- raw forwarding: a fake server and client (plain sockets speaking the
  handshake) paired by key push N MiB each way; direct = one loopback socket,
  measured with the same sender and receiver, in turns with both proxies;
- a stock client's 64 MiB upload/download to a stock server through ours,
  through stock, and direct;
- pairing latency: a fake server and client, each writing its handshake in
  the stock client's three writes, until both have their answer;
- session setup (connect, one call, close) through each proxy;
- RSS growth of the proxy while a reader that stopped reading is sent N MiB.

Both proxies run as subprocesses in the same run; figures are MB/s (10^6).
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.report import Table
from tvmrpc.harness import (
    raw_pair,
    running,
    start_proxied_server,
    start_proxy,
    start_stock_proxy,
    start_stock_server,
)

MiB = 1 << 20
CHUNK = 4 * MiB


# -- raw forwarding ------------------------------------------------------------


def transfer(sender: socket.socket, receiver: socket.socket, total: int) -> float:
    """Seconds to move ``total`` bytes from ``sender`` to ``receiver`` (all read)."""
    block = memoryview(bytes(CHUNK))
    buf = bytearray(CHUNK)

    def send() -> None:
        left = total
        while left:
            n = min(left, CHUNK)
            sender.sendall(block[:n])
            left -= n

    start = time.perf_counter()
    thread = threading.Thread(target=send)
    thread.start()
    got = 0
    while got < total:
        n = receiver.recv_into(buf)
        if not n:
            raise RuntimeError(f"stream ended after {got} of {total} bytes")
        got += n
    elapsed = time.perf_counter() - start
    thread.join()
    return elapsed


def direct_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def raw_forwarding(
    pairs: dict[str, Callable[[], tuple[socket.socket, socket.socket]]],
    total: int,
    repeat: int,
    cpu_of: dict[str, Callable[[], float]],
) -> tuple[dict[str, tuple[float, float]], dict[str, float], dict[str, list[list[float]]]]:
    """Best MB/s (server->client, client->server) of each way to pair, the CPU
    seconds per GiB of each ``cpu_of`` process, and every round's MB/s per way
    (``[down, up]`` lists, in round order).

    The candidates take turns within each of ``repeat`` rounds (direct, stock,
    ours, direct, ...), each on a fresh pair, so that a load that drifts during
    the run weighs on all of them alike and "% of direct" compares like with like.
    """
    down: dict[str, list[float]] = {name: [] for name in pairs}
    up: dict[str, list[float]] = {name: [] for name in pairs}
    spent = dict.fromkeys(cpu_of, 0.0)
    for _ in range(repeat):
        for name, pair in pairs.items():
            before = cpu_of[name]() if name in cpu_of else 0.0
            server, client = pair()
            with server, client:
                down[name].append(total / transfer(server, client, total) / 1e6)
                up[name].append(total / transfer(client, server, total) / 1e6)
            if name in cpu_of:
                spent[name] += cpu_of[name]() - before
    best = {name: (max(down[name]), max(up[name])) for name in pairs}
    gib = 2 * repeat * total / (1 << 30)
    rounds = {name: [down[name], up[name]] for name in pairs}
    return best, {name: seconds / gib for name, seconds in spent.items()}, rounds


# -- stock client through a proxy ------------------------------------------------


def stock_transfer(host: str, port: int, key: str, size: int, repeat: int) -> tuple[float, float]:
    """Best MB/s of a stock client's upload and download of ``size`` bytes."""
    import numpy as np
    import tvm
    from tvm import rpc

    data = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    session = rpc.connect(host, port, key=key, session_timeout=120)
    dev = session.cpu()
    ups, downs = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        remote = tvm.runtime.tensor(data, dev)
        ups.append(size / (time.perf_counter() - start) / 1e6)
        start = time.perf_counter()
        back = remote.numpy()
        downs.append(size / (time.perf_counter() - start) / 1e6)
        assert back[-1] == data[-1]
        del remote, back
    del dev, session
    return max(ups), max(downs)


def session_setup(port: int, key: str, n: int) -> float:
    """p50 ms of connect + one call + close through a proxy (the server comes back each time)."""
    from tvm import rpc

    samples = []
    for _ in range(n):
        start = time.perf_counter()
        session = rpc.connect("127.0.0.1", port, key=key, session_timeout=60)
        session.get_function("testing.echo")(1)
        del session
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def pairing_latency(port: int, n: int) -> float:
    """p50 ms for a fake server and client (stock three-write handshakes) to be paired."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        server, client = raw_pair(port, f"lat{i}")
        samples.append(time.perf_counter() - start)
        server.close()
        client.close()
    return statistics.median(samples) * 1e3


# -- memory to a stalled reader -----------------------------------------------------


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (the stock proxy runs in a child process)."""
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def stalled_growth(pid: int, port: int, total: int) -> float:
    """MiB the proxy's RSS grows while ``total`` bytes go to a reader that does not read."""
    server, client = raw_pair(port, "stall")
    with server, client:
        base = tree_rss(pid)
        peak = base
        client.setblocking(False)
        block = memoryview(bytes(CHUNK))
        sent = 0
        while sent < total:
            _, writable, _ = select.select([], [client], [], 3.0)
            if not writable:
                break  # held back
            sent += client.send(block[: min(CHUNK, total - sent)])
            peak = max(peak, tree_rss(pid))
        peak = max(peak, tree_rss(pid))
        client.setblocking(True)
        buf = bytearray(CHUNK)
        left = sent

        def drain() -> None:
            nonlocal left
            while left > 0:
                n = server.recv_into(buf)
                if not n:
                    break
                left -= n

        drain()
    return (peak - base) / MiB


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its children (stock's proxy forks its worker)."""
    top = psutil.Process(pid)
    total = 0.0
    for proc in (top, *top.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def main(flags: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench proxy")
    parser.add_argument("--quick", action="store_true", help="smaller transfers, fewer samples")
    parser.add_argument(
        "--no-splice", action="store_true", help="run ours with --no-splice (userspace path)"
    )
    args, _ = parser.parse_known_args(flags)
    raw_total = (128 if args.quick else 512) * MiB
    repeat = 1 if args.quick else 3
    stall_total = (256 if args.quick else 1024) * MiB
    sessions = 10 if args.quick else 30

    table = Table("proxy (loopback, ours " + ("userspace" if args.no_splice else "splice") + ")")
    vs_direct: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        extra = ["--no-splice"] if args.no_splice else []
        # per-pairing log lines cost ~0.5 ms
        ours_proxy = start_proxy(logs, *extra, verbose=False)
        with running(start_stock_proxy(logs)) as stock, running(ours_proxy) as ours:
            ports = {"stock": stock.port, "ours": ours.port}
            mb = raw_total // MiB
            print(f"raw forwarding, {mb} MiB each way ...", flush=True)
            pairs = {
                "direct": direct_pair,
                "stock": lambda: raw_pair(stock.port, "raw"),
                "ours": lambda: raw_pair(ours.port, "raw"),
            }
            # CPU the proxy spends per GiB it forwards (both directions)
            cpu_of = {
                "stock": lambda: tree_cpu(stock.proc.pid),
                "ours": lambda: tree_cpu(ours.proc.pid),
            }
            fwd, cpu, rounds = raw_forwarding(pairs, raw_total, repeat, cpu_of)
            direct = fwd["direct"]
            for i, way in enumerate(("server->client", "client->server")):
                table.add(f"raw {way} {mb} MiB (MB/s)", fwd["stock"][i], fwd["ours"][i], "higher")
                ours_by_round = zip(rounds["ours"][i], rounds["direct"][i], strict=True)
                per_round = " ".join(f"{o / d:.0%}" for o, d in ours_by_round)
                vs_direct.append(
                    f"raw {way}: direct {direct[i]:.0f} MB/s; ours "
                    f"{fwd['ours'][i] / direct[i]:.0%} of direct, stock "
                    f"{fwd['stock'][i] / direct[i]:.0%} (ours/direct by round: {per_round})"
                )
            table.add("proxy CPU per GiB forwarded (s)", cpu["stock"], cpu["ours"], "lower")
            print("pairing latency ...", flush=True)
            lat = {name: pairing_latency(p, sessions) for name, p in ports.items()}
            table.add("pairing, both handshakes p50 (ms)", lat["stock"], lat["ours"], "lower")

            size = 64 * MiB
            with (
                running(start_proxied_server(logs, ours, "bench", wait=False)),
                running(start_stock_server(logs, "bench")) as direct_server,
            ):
                # the stock proxy logs nothing per server: wait on the server's own log
                stock_server = start_proxied_server(
                    logs, stock, "bench", name="server-at-stock", wait=False
                )
                with running(stock_server):
                    stock_server.wait_for(
                        r"RPCProxy|Connection established|connected|INFO", timeout=60
                    )
                    print("stock client 64 MiB upload/download ...", flush=True)
                    # interleaved rounds, best of each: the machine's load drifts
                    targets = {**ports, "direct": direct_server.port}
                    rounds = {name: [] for name in targets}
                    for _ in range(repeat + 1):
                        for name, p in targets.items():
                            rounds[name].append(stock_transfer("127.0.0.1", p, "bench", size, 1))
                    via = {
                        name: (max(r[0] for r in got), max(r[1] for r in got))
                        for name, got in rounds.items()
                    }
                    d = via["direct"]
                    for i, way in enumerate(("upload", "download")):
                        table.add(
                            f"stock client 64 MiB {way} (MB/s)",
                            via["stock"][i],
                            via["ours"][i],
                            "higher",
                        )
                        vs_direct.append(
                            f"stock client {way}: direct {d[i]:.1f} MB/s; ours "
                            f"{via['ours'][i] / d[i]:.0%} of direct, stock "
                            f"{via['stock'][i] / d[i]:.0%}"
                        )
                    print("session setup ...", flush=True)
                    samples: dict[str, list[float]] = {name: [] for name in ports}
                    for _ in range(sessions // 5):
                        for name, p in ports.items():
                            samples[name].append(session_setup(p, "bench", 5))
                    setup = {name: statistics.median(v) for name, v in samples.items()}
                    table.add("session setup p50 (ms)", setup["stock"], setup["ours"], "lower")

            print(f"stalled reader, {stall_total // MiB} MiB ...", flush=True)
            growth = {
                name: stalled_growth(proc.proc.pid, proc.port, stall_total)
                for name, proc in (("stock", stock), ("ours", ours))
            }
            table.add(
                f"RSS growth, {stall_total // MiB} MiB to stalled reader (MiB)",
                growth["stock"],
                max(growth["ours"], 0.1),
                "lower",
            )
    print(table.render(), flush=True)
    print("\n".join(vs_direct), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
