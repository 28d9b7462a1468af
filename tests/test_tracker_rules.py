"""Drains, quarantine, fair share and wait estimates: plain calls on pure code."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tvmrpc.tracker.boards import BoardRules, BoardState
from tvmrpc.tracker.estimates import WaitEstimator
from tvmrpc.tracker.scheduler import Scheduler, board_name

SERVER = object()


def owners(assignments):
    return [a.request.owner for a in assignments]


def test_quarantine_after_consecutive_failures_only():
    rules = BoardRules(quarantine_after=3)
    assert rules.record("b:1", "crashed") is False
    assert rules.record("b:1", "timeout") is False  # slow client code: not the board's fault
    assert rules.record("b:1", "crashed") is False
    assert rules.record("b:1", "ok") is False  # a good session resets the streak
    assert [rules.record("b:1", "crashed") for _ in range(3)] == [False, False, True]
    assert rules.state("k", "b:1") is BoardState.QUARANTINED
    assert rules.failures("b:1") == ["crashed"] * 5
    assert rules.record("b:1", "health_ok") is False
    assert rules.available("k", "b:1")


def test_drain_by_board_and_by_key_until_resumed():
    rules = BoardRules()
    rules.drain(board="b:1")
    rules.drain(key="jetson")
    assert rules.state("rk", "b:1") is BoardState.DRAINED
    assert rules.state("jetson", "b:2") is BoardState.DRAINED
    assert rules.available("rk", "b:2")
    rules.record("b:1", "health_ok")  # a health check does not end an operator's drain
    assert not rules.available("rk", "b:1")
    rules.resume(board="b:1")
    rules.resume(key="jetson")
    assert rules.available("rk", "b:1")
    assert rules.available("jetson", "b:2")


def test_drained_board_is_skipped_and_not_counted_free_then_resumed():
    s = Scheduler()
    s.rules.drain(board=board_name("10.0.0.1", 9090))
    s.put("rk", "10.0.0.1", 9090, "rk:1", SERVER)
    s.put("rk", "10.0.0.2", 9090, "rk:2", SERVER)
    assert s.queue_info()["rk"] == {"free": 1, "pending": 0}
    _, first = s.request("rk", "u", 1, "c1")
    assert [a.resource.matchkey for a in first] == ["rk:2"]
    _, second = s.request("rk", "u", 1, "c2")
    assert second == []
    s.rules.resume(board="10.0.0.1:9090")
    assert [(a.request.owner, a.resource.matchkey) for a in s.rematch("rk")] == [("c2", "rk:1")]


def test_fair_share_serves_the_small_host_within_two_assignments():
    s = Scheduler(fair_share=True)
    for i in range(50):
        s.request("rk", "u", 1, f"bulk{i}", host="127.0.0.1")
    s.request("rk", "u", 1, "dev", host="127.0.0.2")
    served = []
    for i in range(3):
        served += owners(s.put("rk", "b", 1, f"rk:{i}", SERVER))
    assert "dev" in served[:2]
    assert served == ["bulk0", "dev", "bulk1"]


def test_fair_share_keeps_priority_first():
    s = Scheduler(fair_share=True)
    s.request("rk", "u", 1, "low", host="a")
    s.request("rk", "u", 5, "high1", host="a")
    s.request("rk", "u", 5, "high2", host="a")
    s.request("rk", "u", 5, "other", host="b")
    served = []
    for i in range(4):
        served += owners(s.put("rk", "b", 1, f"rk:{i}", SERVER))
    assert served == ["high1", "other", "high2", "low"]


def test_without_fair_share_stock_order_exactly():
    s = Scheduler()
    for i in range(3):
        s.request("rk", "u", 1, f"bulk{i}", host="127.0.0.1")
    s.request("rk", "u", 1, "dev", host="127.0.0.2")
    served = []
    for i in range(4):
        served += owners(s.put("rk", "b", 1, f"rk:{i}", SERVER))
    assert served == ["bulk0", "bulk1", "bulk2", "dev"]


def test_wait_estimate_from_hold_times():
    w = WaitEstimator(window=3)
    assert w.expected_wait("rk", queued=2, free=0, busy=2) is None  # nothing seen yet
    for seconds in (100.0, 10.0, 20.0, 30.0):  # the ring keeps the last three
        w.record("rk", seconds)
    assert w.mean_hold("rk") == 20.0
    assert w.expected_wait("rk", queued=0, free=1, busy=1) == 0.0
    # 4 queued + 2 busy boards half done = 5 holds of 20 s over 2 boards
    assert w.expected_wait("rk", queued=4, free=0, busy=2) == 50.0


def test_fair_share_compacts_cancelled_requests():
    s = Scheduler(fair_share=True)
    for i in range(500):
        s.request("rk", "u", 1, f"gone{i}", host=f"h{i % 7}")
    s.request("rk", "u", 1, "stays", host="h0")
    for i in range(500):
        s.drop_owner(f"gone{i}")
    assert s.queue_info()["rk"]["pending"] == 1
    assert owners(s.put("rk", "b", 1, "rk:1", SERVER)) == ["stays"]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3), st.integers(0, 5)),
        st.tuples(st.just("req"), st.integers(0, 5), st.integers(0, 2)),
        st.tuples(st.just("drop"), st.integers(0, 5), st.integers(0, 3)),
        st.tuples(st.just("drain"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("resume"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("crash"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("healthy"), st.integers(0, 3), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.booleans())
def test_rules_against_a_naive_model(ops, fair):
    """Random puts, requests, drops, drains, crashes and health checks, both orders.

    The naive model keeps every live request and free resource in plain lists:
    each assignment must take an available resource (oldest first) for a live
    request of the highest waiting priority; in stock order the oldest of
    those, in fair share the oldest of its host, and no host is served twice
    at one priority while another host waited at that priority all along.
    """
    s = Scheduler(fair_share=fair, rules=BoardRules(quarantine_after=2))
    waiting: list[tuple[str, str, int, int]] = []  # (owner, host, priority, seq), arrival order
    free: list[tuple[str, str]] = []  # (matchkey, board), PUT order
    served_at: dict[tuple[int, str], int] = {}  # (priority, host) -> clock of last service
    arrived: dict[int, int] = {}  # request seq -> clock when it arrived
    clock = 0

    def check(assignments):
        nonlocal clock
        for a in assignments:
            clock += 1
            board = a.resource.board
            assert s.rules.available("rk", board)
            avail = [m for m, b in free if s.rules.available("rk", b)]
            assert a.resource.matchkey == avail[0]
            free.remove((a.resource.matchkey, board))
            top = max(p for _, _, p, _ in waiting)
            entry = next(w for w in waiting if w[0] == a.request.owner and w[3] == a.request.seq)
            _owner, host, prio, rseq = entry
            assert prio == top
            same_host = [w for w in waiting if w[1] == host and w[2] == top]
            assert rseq == min(w[3] for w in same_host)  # FIFO within a host
            if not fair:
                assert rseq == min(w[3] for w in waiting if w[2] == top)
            else:
                last = served_at.get((top, host))
                if last is not None:
                    for w in waiting:
                        other_last = served_at.get((top, w[1]), -1)
                        # w's host waited since before our last service and got nothing since
                        starved = w[2] == top and arrived[w[3]] < last and other_last < last
                        assert not (w[1] != host and starved), (w, host, last)
                served_at[(top, host)] = clock
            waiting.remove(entry)

    for op, a, b in ops:
        board = f"h{a}:1"
        if op == "put":
            matchkey = f"rk:{a}.{b}"
            free[:] = [(m, bd) for m, bd in free if m != matchkey]
            free.append((matchkey, board))
            check(s.put("rk", f"h{a}", 1, matchkey, f"srv{a}"))
        elif op == "req":
            clock += 1
            request, assignments = s.request("rk", "u", b, f"cli{a}", host=f"host{a % 3}")
            arrived[request.seq] = clock
            waiting.append((f"cli{a}", f"host{a % 3}", b, request.seq))
            check(assignments)
        elif op == "drop":
            s.drop_owner(f"cli{a}")
            waiting[:] = [w for w in waiting if w[0] != f"cli{a}"]
            if b == 0:
                s.drop_owner(f"srv{a % 4}")
                free[:] = [(m, bd) for m, bd in free if not m.startswith(f"rk:{a % 4}.")]
        elif op == "drain":
            s.rules.drain(board=board)
        elif op == "resume":
            s.rules.resume(board=board)
            check(s.rematch())
        elif op == "crash":
            s.rules.record(board, "crashed")
        else:
            s.rules.record(board, "health_ok")
            check(s.rematch())
        available = [m for m, bd in free if s.rules.available("rk", bd)]
        info = s.queue_info().get("rk", {"free": 0, "pending": 0})
        assert info["pending"] == len(waiting)
        assert info["free"] == len(available)
        assert not (available and waiting)  # nothing available is left idle while some wait


def test_server_reports_count_each_session_once():
    rules = BoardRules(quarantine_after=2)
    crashed = {"sessions": 1, "last_session": {"outcome": "crashed"}}
    assert rules.report("b:1", crashed) == ["crashed"]
    assert rules.report("b:1", crashed) == []  # the same report again (a reconnect)
    second = {"sessions": 2, "last_session": {"outcome": "crashed"}}
    assert rules.report("b:1", second) == ["crashed"]
    assert rules.state("k", "b:1") is BoardState.QUARANTINED
    failed_check = {**second, "health": {"checks": 1, "ok": False}}
    assert rules.report("b:1", failed_check) == ["health_failed"]
    assert rules.state("k", "b:1") is BoardState.QUARANTINED
    passed = {**second, "health": {"checks": 2, "ok": True}}
    assert rules.report("b:1", passed) == ["health_ok"]
    assert rules.available("k", "b:1")
    assert rules.streak("b:1") == 0
    # a restarted server counts from zero again; its first session is new
    assert rules.report("b:1", {"sessions": 1, "last_session": {"outcome": "ok"}}) == ["ok"]
    assert rules.report("b:1", "junk") == []
    assert rules.report("b:1", {"sessions": "many", "health": []}) == []


def test_passing_checks_after_each_crash_do_not_keep_a_board_out_of_quarantine():
    """Our server runs a health check after every crash; the crashes still add up."""
    rules = BoardRules(quarantine_after=3)
    for n in (1, 2, 3):
        report = {
            "sessions": n,
            "last_session": {"outcome": "crashed"},
            "health": {"checks": n, "ok": True},
        }
        assert rules.report("b:1", report) == ["health_ok", "crashed"]
    assert rules.state("k", "b:1") is BoardState.QUARANTINED
    # the same report again lifts nothing; a later passing check does
    assert rules.report("b:1", report) == []
    assert rules.state("k", "b:1") is BoardState.QUARANTINED
    assert rules.report("b:1", {**report, "health": {"checks": 4, "ok": True}}) == ["health_ok"]
    assert rules.available("k", "b:1")
