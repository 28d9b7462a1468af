"""Pure parts of tvmrpc.status: counters, the UPDATE_INFO extension, outcomes, the tracker view."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from tvmrpc.status.extension import LastSession, build_extension, read_extension
from tvmrpc.status.options import StatusOptions
from tvmrpc.status.page import PAGE
from tvmrpc.status.peeraddr import ASK, tell, told
from tvmrpc.status.server import classify
from tvmrpc.status.stats import OTHER_KEY, Histogram, KeyedCounts
from tvmrpc.status.tcpinfo import tcp_bytes
from tvmrpc.status.tracker import RECENT, TrackerStatus, Utilisation
from tvmrpc.tracker.scheduler import Scheduler


def test_keyed_counts_are_capped():
    counts = KeyedCounts(max_keys=2)
    for key in ("a", "b", "c", "d", "a"):
        counts.add(key)
    assert counts.values == {"a": 2, "b": 1, OTHER_KEY: 2}


def test_histogram_exports_cumulative_buckets():
    hist = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 7):
        hist.observe(seconds)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert hist.count == 4
    assert hist.total == pytest.approx(7.65)


def test_extension_round_trip_and_tolerance():
    last = LastSession("crashed", 1.5, 10, 20, "10.0.0.5:4000")
    ext = read_extension({"tvmrpc": build_extension(last, {"ok": 3, "crashed": 1})})
    assert ext.last_session == last
    assert ext.total == 4
    for bad in (None, [], {"tvmrpc": 5}, {"tvmrpc": {"sessions": "x", "last_session": 1}}):
        parsed = read_extension(bad)
        assert parsed is None or (parsed.last_session is None and parsed.total == 0)
    odd = read_extension({"tvmrpc": {"last_session": {"outcome": "exploded"}}})
    assert odd.last_session is None


def test_extension_stays_small():
    last = LastSession("ok", 1.0, 1 << 40, 1 << 40, "x" * 10_000)
    import json

    assert len(json.dumps(build_extension(last, {"ok": 1 << 40}))) < 1024


@pytest.mark.parametrize(
    ("result", "timed_out", "outcome"),
    [
        (0, False, "ok"),
        (1, False, "client_gone"),
        (3, False, "crashed"),
        (-9, False, "crashed"),
        (-9, True, "timeout"),
        (None, False, "crashed"),
    ],
)
def test_outcomes(result, timed_out, outcome):
    assert classify(result, timed_out) == outcome


def test_peer_address_only_for_those_who_ask():
    assert tell("client:k -timeout=5", "server:k", "1.2.3.4:5") == "client:k -timeout=5"
    told_key = tell("client:k -timeout=5", f"server:k {ASK}", "1.2.3.4:5")
    assert told(told_key) == "1.2.3.4:5"
    assert told("client:k -timeout=5") is None


def test_status_option_refuses_what_is_not_an_endpoint():
    class Options(StatusOptions):
        pass

    options = Options()
    options.parseOptions(["--status", "tcp:9180:interface=127.0.0.1"])
    assert options["status"] == "tcp:9180:interface=127.0.0.1"
    assert Options()["status"] is None
    with pytest.raises(usage.UsageError, match="Twisted endpoint"):
        Options().parseOptions(["--status", "9180"])


def test_page_is_self_contained_and_inserts_text_only():
    assert "innerHTML" not in PAGE
    assert "<link" not in PAGE
    assert "src=" not in PAGE
    assert "http" not in PAGE.replace("http://www.w3.org/2000/svg", "")


def test_tcp_bytes_are_the_kernel_counts():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
        with sender, receiver:
            sender.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += receiver.recv(1000)
            receiver.sendall(b"!")  # its segment acknowledges the 1000 bytes
            assert sender.recv(1) == b"!"
            assert tcp_bytes(receiver) == (1000, 1)
            assert tcp_bytes(sender)[0] == 1
            assert tcp_bytes(sender)[1] in (1000, 1001)  # Linux counts the SYN it sent
    left, right = socket.socketpair()
    with left, right:
        assert tcp_bytes(left) is None


class Conn:
    """A stand-in for a tracker connection (the observer reads ``peer_host`` only)."""

    def __init__(self, host: str) -> None:
        self.peer_host = host


def test_tracker_view_follows_a_session():
    clock = Clock()
    scheduler = Scheduler()
    view = TrackerStatus(clock, scheduler)
    board, client = Conn("10.0.0.2"), Conn("10.0.0.9")
    view.connected(board)
    view.connected(client)
    view.info_updated(board, {"key": "server:k", "addr": ["10.0.0.2", 9090]})
    assert view.snapshot()["boards"][0]["state"] == "withdrawn"
    view.put(board, "k", "k:1", "10.0.0.2", 9090)
    scheduler.put("k", "10.0.0.2", 9090, "k:1", board)
    assert view.snapshot()["boards"][0]["state"] == "free"

    clock.advance(100)
    request, assignments = scheduler.request("k", "alice", 2, client)
    view.requested(request)
    for assignment in assignments:
        view.assigned(assignment)
    clock.advance(3)
    doc = view.snapshot()
    (entry,) = doc["boards"]
    assert entry["state"] == "busy"
    assert entry["holder"] == {
        "address": "10.0.0.9",
        "user": "alice",
        "since": 100,
        "queue_wait": 0,
    }

    # A second request queues; its age grows with the clock.
    second, assignments = scheduler.request("k", "bob", 5, client)
    assert not assignments
    view.requested(second)
    clock.advance(4)
    (waiting,) = view.snapshot()["queues"]["k"]["waiting"]
    assert waiting["age"] == 4
    assert waiting["priority"] == 5

    # The server reports its session, then PUTs again: the hold ends with its outcome.
    view.info_updated(
        board,
        {
            "key": "server:k",
            "addr": ["10.0.0.2", 9090],
            "tvmrpc": build_extension(LastSession("crashed", 6.5, 5, 6, "x"), {"crashed": 1}),
        },
    )
    view.put(board, "k", "k:2", "10.0.0.2", 9090)
    for assignment in scheduler.put("k", "10.0.0.2", 9090, "k:2", board):
        view.assigned(assignment)
    (record,) = view.snapshot()["sessions"]
    assert record["hold"] == 7
    assert record["outcome"] == "crashed"
    assert record["bytes_in"] == 5
    assert record["ended_by"] == "released"
    assert view.queue_waits.values["k"].total == 4  # bob waited 4 s

    # The same report is not attributed twice; a disconnect ends the hold and evicts.
    clock.advance(1)
    view.disconnected(board)
    latest = view.snapshot()["sessions"][0]
    assert latest["ended_by"] == "board gone"
    assert latest["outcome"] is None
    assert view.snapshot()["boards"] == []
    assert view.evictions == 1


def test_tracker_view_is_bounded():
    clock = Clock()
    view = TrackerStatus(clock)
    board, client = Conn("b"), Conn("c")
    scheduler = Scheduler()
    for i in range(RECENT + 50):
        view.put(board, "k", f"k:{i}", "b", 1)
        scheduler.put("k", "b", 1, f"k:{i}", board)
        request, assignments = scheduler.request("k", "u", 0, client)
        view.requested(request)
        for assignment in assignments:
            view.assigned(assignment)
    assert len(view.sessions) == RECENT
    for _ in range(1000):
        view.sample()
    assert len(view.samples) == view.samples.maxlen


def test_utilisation_is_time_weighted():
    util = Utilisation(0.0)
    util.change("k", 0.0, boards=2)
    util.change("k", 2.0, busy=1)
    util.change("k", 7.0, busy=-1)
    assert util.sample(10.0, reset=False)["keys"] == {"k": [0.25, 2.0]}  # 5 of 20 board-seconds
    assert util.sample(10.0, reset=True)["keys"]["k"][0] == 0.25
    util.change("k", 12.0, busy=2)
    assert util.sample(20.0, reset=True)["keys"] == {"k": [0.8, 2.0]}  # 16 of 20
    util.change("k", 20.0, busy=-2, boards=-2)
    util.sample(30.0, reset=True)
    assert util.keys == {}


def test_hostile_keys_users_and_priorities_stay_small_and_valid():
    import json

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    clock = Clock()
    scheduler = Scheduler()
    view = TrackerStatus(clock, scheduler)
    board, client = Conn("b"), Conn("c")
    long_a, long_b = "k" * 300 + "a", "k" * 300 + "b"  # the same once clipped
    for key in (long_a, long_b):
        request, _ = scheduler.request(key, "u" * 100_000, float("nan"), client)
        view.requested(request)
    view.put(board, long_a, long_a + ":1", "b", 1)
    for assignment in scheduler.put(long_a, "b", 1, long_a + ":1", board):
        view.assigned(assignment)
    view.put(board, long_a, long_a + ":2", "b", 1)  # ends the hold: a record
    text = json.dumps(view.snapshot(), allow_nan=False)  # strict JSON: no NaN
    assert len(text) < 10_000
    registry = CollectorRegistry(auto_describe=False)
    registry.register(view)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    queued = next(f for f in families if f.name == "tvmrpc_tracker_queued")
    labels = [tuple(sorted(s.labels.items())) for s in queued.samples]
    assert len(labels) == len(set(labels))  # no duplicate series for Prometheus to reject
    assert sum(s.value for s in queued.samples) == 1


def test_daemons_load_prometheus_and_twisted_web_only_with_status():
    import subprocess
    import sys

    from tests.support import subprocess_env

    code = (
        "import sys, tvmrpc.tracker.service, tvmrpc.server.service, tvmrpc.proxy.service;"
        "print('prometheus_client' in sys.modules, 'twisted.web.server' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == ["False", "False"]


def test_our_report_drives_the_trackers_quarantine_rules():
    from tvmrpc.tracker.boards import BoardRules, BoardState

    rules = BoardRules(quarantine_after=2)
    totals = {"ok": 0, "crashed": 0}
    for outcome in ("crashed", "ok", "crashed", "crashed"):
        totals[outcome] += 1
        report = build_extension(LastSession(outcome, 1.0, 1, 1, "c"), totals)
        assert rules.report("b:1", report) == [outcome]
        assert rules.report("b:1", report) == []  # the same report re-sent counts once
    assert rules.state("k", "b:1") is BoardState.QUARANTINED


def test_admin_token_file_needs_status(tmp_path):
    from tvmrpc.tracker.service import Options

    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    with pytest.raises(usage.UsageError, match="needs --status"):
        Options().parseOptions(["--admin-token-file", str(token)])
    options = Options()
    options.parseOptions(["--admin-token-file", str(token), "--status", "tcp:0"])
    assert options["admin-token"] == "0123456789abcdef0123"
