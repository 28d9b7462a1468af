"""The seed's topology across real network boundaries (network namespaces).

A (developer machine) reaches only B; B runs our tracker and our proxy; the
boards C and D run our servers ``--through-proxy`` to B and cannot be reached
from A. A stock client in A asks the tracker for each key and runs a
compiled MLP; then the B-D cable is cut and restored, and the tracker is
killed and restarted. See tests/netns.py for the wiring and docs/topology.md.

The tests share one topology (module fixture) and run in file order; each
leaves the lab as it found it (all servers registered) or fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.netns import NetnsUnavailable, Topology
from tests.support import Process
from tvmrpc.demo import daemons, tracker_state
from tvmrpc.harness import Group, module_argv
from tvmrpc.mlp import build_mlp

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TRACKER_PORT = 9190
PROXY_PORT = 9090
#: Each namespace is a fresh network stack, so fixed ports cannot clash.
KEYS = {"board-c": 1, "board-d": 2}  # servers per key
START = 60.0  # seconds for a daemon to come up or register
#: A cut cable is only noticed by TCP keepalive (DESIGN.md: dead peers): the proxy and
#: the servers drop a silent peer after this many seconds (default about 60)...
DEAD_PEER_FLAGS = ["--dead-peer-timeout", "8"]
#: ...and the test allows for that, reconnect backoff and re-registration.
DEAD_PEER = 60.0


class Lab:
    """Our daemons in the topology, and a stock client's view from A."""

    def __init__(self, topo: Topology, log_dir: Path, library: Path) -> None:
        self.topo = topo
        self.log_dir = log_dir
        self.library = library
        self.group = Group(log_dir)
        self.tracker: Process | None = None
        self.tracker_address = (topo.B_A_ADDR, TRACKER_PORT)  # as A sees it

    def spawn(self, ns: Any, name: str, argv: list[str]) -> Process:
        return self.group.start(name, ns.argv(*argv))

    def start_tracker(self, name: str = "tracker") -> None:
        self.tracker = self.spawn(self.topo.b, name, daemons.tracker_argv("0.0.0.0", TRACKER_PORT))
        self.tracker.wait_for(r"tvm-tracker listening on", START)

    def start(self) -> None:
        topo = self.topo
        self.start_tracker()
        proxy = self.spawn(
            topo.b,
            "proxy",
            daemons.proxy_argv(
                "0.0.0.0",
                ("127.0.0.1", TRACKER_PORT),
                custom_addr=topo.B_A_ADDR,
                port=PROXY_PORT,
            )
            + DEAD_PEER_FLAGS,
        )
        proxy.wait_for(r"tvm-proxy listening on", START)
        self.spawn(
            topo.c,
            "server-c",
            daemons.proxied_server_argv((topo.B_C_ADDR, PROXY_PORT), "board-c") + DEAD_PEER_FLAGS,
        )
        for n in (1, 2):
            self.spawn(
                topo.d,
                f"server-d{n}",
                daemons.proxied_server_argv((topo.B_D_ADDR, PROXY_PORT), "board-d")
                + DEAD_PEER_FLAGS,
            )
        self.wait_state(
            lambda s: all(self.free(s, k) == n for k, n in KEYS.items()),
            START,
            "every board registered through the proxy",
        )

    def stop(self) -> None:
        self.group.stop()

    # -- looking from A -------------------------------------------------------------

    @staticmethod
    def free(state: dict[str, Any], key: str) -> int:
        return tracker_state.queue(state, key)[0]

    @staticmethod
    def pending(state: dict[str, Any], key: str) -> int:
        return tracker_state.queue(state, key)[1]

    def wait_state(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """Poll the tracker's SUMMARY from A (every ~0.2 s) until ``predicate`` holds."""
        return tracker_state.wait_until(
            self.tracker_address, predicate, timeout, what, connect=self.topo.a.connect
        )

    def client(self, key: str, name: str, *extra: str) -> Process:
        """A stock client in A: request ``key``, upload the MLP, run, check (one JSON line)."""
        host, port = self.tracker_address
        return self.spawn(
            self.topo.a,
            name,
            [
                sys.executable,
                "-m",
                "tvmrpc.demo.session",
                "--tracker",
                f"{host}:{port}",
                "--key",
                key,
                "--library",
                str(self.library),
                *extra,
            ],
        )

    @staticmethod
    def outcome(proc: Process, timeout: float) -> dict[str, Any]:
        line = proc.wait_for(r'^\{"key"', timeout).string
        result = json.loads(line)
        assert result["ok"], result
        return result

    def served(self, key: str, name: str, timeout: float = START) -> dict[str, Any]:
        return self.outcome(self.client(key, name), timeout)

    def query(self, *args: str) -> str:
        host, port = self.tracker_address
        proc = self.spawn(
            self.topo.a,
            f"query{len(self.group.procs)}",
            module_argv("tvmrpc.cli", "query", "--host", host, "--port", str(port), *args),
        )
        code = proc.proc.wait(START)
        proc.stop()  # also waits until all its output has been read
        assert code == 0, proc.output
        return proc.output


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with netns.created_or_skip() as topology:
        yield topology


@pytest.fixture(scope="module")
def lab(topo: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if importlib.util.find_spec("tvmrpc.server.service") is None:
        pytest.skip("our server (tvmrpc.server.service, twistd tvm-server) has not landed yet")
    base = tmp_path_factory.mktemp("topology")
    library = build_mlp(base / "model")
    lab = Lab(topo, base, library)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def test_without_root_it_skips_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match="need root"):
        Topology(tag="tvmrpc-t0-never").create()


def test_a_cannot_reach_the_boards_but_b_can(topo: Topology) -> None:
    for board, address in ((topo.c, topo.C_ADDR), (topo.d, topo.D_ADDR)):
        listener = board.listen()
        port = listener.getsockname()[1]
        try:
            topo.b.connect((address, port), 5).close()
            with pytest.raises(OSError, match=r"timed out|unreachable|No route"):  # B drops it
                topo.a.connect((address, port), 1.0).close()
        finally:
            listener.close()


def test_stock_client_in_a_runs_the_mlp_on_each_board(lab: Lab) -> None:
    for key in KEYS:
        lab.served(key, f"client-{key}")
    lab.wait_state(
        lambda s: all(lab.free(s, k) == n for k, n in KEYS.items()),
        START,
        "servers back at the proxy after their sessions",
    )


def test_query_from_a_shows_the_proxy_and_the_queue(lab: Lab, topo: Topology) -> None:
    table = lab.query()
    assert f"Tracker address {topo.B_A_ADDR}:{TRACKER_PORT}" in table
    assert re.search(
        rf"{re.escape(topo.B_A_ADDR)}:{PROXY_PORT}\s+server:proxy\[board-c,board-d\]", table
    ), table
    assert "Queue Status" in table
    state = json.loads(lab.query("--json"))
    assert {k: (v["free"], v["pending"]) for k, v in state["queue_info"].items()} == {
        "board-c": (1, 0),
        "board-d": (2, 0),
    }
    (info,) = state["server_info"]
    assert info == {"key": "server:proxy[board-c,board-d]", "addr": [topo.B_A_ADDR, PROXY_PORT]}


def test_cut_cable_to_d_then_restore(lab: Lab, topo: Topology) -> None:
    topo.set_link(topo.b, "to-d", up=False)
    try:
        lab.served("board-c", "client-c-while-d-cut")
        lab.wait_state(
            lambda s: lab.free(s, "board-d") == 0 and lab.free(s, "board-c") == 1,
            DEAD_PEER,
            "D's resources gone from the queue, C's still there",
        )
        # One try only: a dead resource handed to it fails it instead of being retried.
        waiting = lab.client("board-d", "client-d-waiting", "--max-retry", "1")
        state = lab.wait_state(
            lambda s: lab.pending(s, "board-d") == 1,
            START,
            "the request for board-d queued at the tracker",
        )
        assert lab.free(state, "board-d") == 0
        table = lab.query()
        assert re.search(r"^board-d\s+\d+\s+0\s+1\s*$", table, re.M), table
    finally:
        topo.set_link(topo.b, "to-d", up=True)
    lab.outcome(waiting, DEAD_PEER)  # served by D once it is back, within its request
    lab.wait_state(
        lambda s: all(lab.free(s, k) == n for k, n in KEYS.items()),
        DEAD_PEER,
        "both D servers registered again",
    )
    lab.served("board-d", "client-d-after")


def test_tracker_killed_and_restarted(lab: Lab) -> None:
    assert lab.tracker is not None
    lab.tracker.signal(signal.SIGKILL)
    lab.tracker.proc.wait(10)
    lab.start_tracker("tracker-restarted")
    lab.wait_state(
        lambda s: all(lab.free(s, k) == n for k, n in KEYS.items()),
        START,
        "everything registered at the restarted tracker",
    )
    for key in KEYS:
        lab.served(key, f"client-{key}-after-restart")
