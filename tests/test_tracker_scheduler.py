"""The tracker's scheduler, as plain function calls."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tvmrpc.tracker.scheduler import Scheduler

SERVER, OTHER_SERVER = object(), object()


def served(assignments):
    return [(a.request.owner, a.resource.matchkey) for a in assignments]


def test_request_waits_until_put():
    s = Scheduler()
    request, now = s.request("rk", "u", 1, "client")
    assert now == []
    assert s.queue_info() == {"rk": {"free": 0, "pending": 1}}
    assignments = s.put("rk", "10.0.0.2", 9090, "rk:1", SERVER)
    assert served(assignments) == [("client", "rk:1")]
    assert assignments[0].resource.value() == ["10.0.0.2", 9090, "rk:1"]
    assert assignments[0].request is request
    assert s.queue_info() == {"rk": {"free": 0, "pending": 0}}
    assert s.pending_matchkeys(SERVER) == []


def test_free_resource_served_at_once_oldest_first():
    s = Scheduler()
    s.put("rk", "a", 1, "rk:1", SERVER)
    s.put("rk", "b", 2, "rk:2", OTHER_SERVER)
    _, first = s.request("rk", "u", 1, "c1")
    _, second = s.request("rk", "u", 1, "c2")
    assert served(first) == [("c1", "rk:1")]
    assert served(second) == [("c2", "rk:2")]


def test_priority_then_fifo():
    s = Scheduler()
    for name, prio in [("low", 1), ("high1", 5), ("mid", 3), ("high2", 5)]:
        s.request("rk", name, prio, name)
    order = []
    for i in range(4):
        order += [owner for owner, _ in served(s.put("rk", "a", 1, f"rk:{i}", SERVER))]
    assert order == ["high1", "high2", "mid", "low"]


def test_keys_are_independent():
    s = Scheduler()
    s.request("a", "u", 1, "ca")
    assert s.put("b", "h", 1, "b:1", SERVER) == []
    assert s.queue_info() == {"a": {"free": 0, "pending": 1}, "b": {"free": 1, "pending": 0}}


def test_dropped_requester_never_served_nor_pending():
    s = Scheduler()
    s.request("rk", "u", 9, "gone")
    s.request("rk", "u", 1, "stays")
    s.drop_owner("gone")
    assert s.queue_info()["rk"]["pending"] == 1
    assert served(s.put("rk", "a", 1, "rk:1", SERVER)) == [("stays", "rk:1")]


def test_dropped_server_resources_removed_without_update_info():
    s = Scheduler()
    s.put("rk", "a", 1, "rk:1", SERVER)
    s.put("rk", "a", 2, "rk:2", SERVER)
    s.put("rk", "b", 3, "rk:3", OTHER_SERVER)
    s.drop_owner(SERVER)
    assert s.queue_info()["rk"] == {"free": 1, "pending": 0}
    assert [r.matchkey for r in s.free_resources("rk")] == ["rk:3"]
    assert s.pending_matchkeys(SERVER) == []


def test_put_of_queued_matchkey_replaces():
    s = Scheduler()
    s.put("rk", "a", 1, "rk:1", SERVER)
    s.put("rk", "a", 5, "rk:1", SERVER)
    assert s.queue_info()["rk"]["free"] == 1
    assert [r.port for r in s.free_resources("rk")] == [5]
    assert s.pending_matchkeys(SERVER) == ["rk:1"]


def test_pending_matchkeys_and_remove():
    s = Scheduler()
    s.put("rk", "a", 1, "rk:1", SERVER)
    s.put("rk", "a", 1, "rk:2", SERVER)
    s.request("rk", "u", 1, "c")
    assert s.pending_matchkeys(SERVER) == ["rk:2"]
    assert s.remove("rk:2") is True
    assert s.remove("rk:2") is False
    assert s.pending_matchkeys(SERVER) == []


def test_many_cancelled_requests_are_compacted():
    s = Scheduler()
    for i in range(1000):
        s.request("rk", "u", 1, f"gone{i}")
    s.request("rk", "u", 1, "stays")
    for i in range(1000):
        s.drop_owner(f"gone{i}")
    assert s.queue_info()["rk"]["pending"] == 1
    assert served(s.put("rk", "a", 1, "rk:1", SERVER)) == [("stays", "rk:1")]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3), st.integers(0, 5), st.integers(0, 2)),
        st.tuples(st.just("req"), st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("drop"), st.integers(0, 3), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@given(ops)
def test_invariants_under_random_operations(operations):
    """Never serve a dropped owner; counts and known keys match a naive model.

    Each resource is used once; a key is listed exactly while it has free
    resources, waiting requests or a live server that PUT under it (key GC).
    Match keys are shared across keys, so a re-PUT can move one between keys.
    """
    s = Scheduler()
    live_requests: dict[str, list[tuple[str, int]]] = {}  # owner -> (key, priority) waiting
    dropped_requesters: set[str] = set()
    handed_out: set[str] = set()
    free: dict[str, tuple[str, str]] = {}  # matchkey -> (key, owner), still free
    holders: dict[str, set[str]] = {}  # key -> live servers that PUT under it
    for op, a, b, k in operations:
        key = f"k{k}"
        if op == "put":
            matchkey, owner = f"m:{a}.{b}", f"srv{a}"
            handed_out.discard(matchkey)  # a new PUT is a new resource, even under an old matchkey
            free.pop(matchkey, None)
            holders.setdefault(key, set()).add(owner)
            assignments = s.put(key, "h", 1, matchkey, owner)
            assert len(assignments) <= 1
            for assignment in assignments:
                client = assignment.request.owner
                assert client not in dropped_requesters
                assert assignment.resource.matchkey == matchkey
                handed_out.add(matchkey)
                live_requests[client].remove((key, assignment.request.priority))
            if not assignments:
                free[matchkey] = (key, owner)
        elif op == "req":
            owner = f"cli{a}"
            dropped_requesters.discard(owner)
            live_requests.setdefault(owner, []).append((key, b))
            _, assignments = s.request(key, "u", b, owner)
            for assignment in assignments:
                assert assignment.request.owner == owner
                matchkey = assignment.resource.matchkey
                assert matchkey not in handed_out
                assert free.pop(matchkey)[0] == key
                handed_out.add(matchkey)
                live_requests[owner].remove((key, b))
        else:
            s.drop_owner(f"cli{a}")
            s.drop_owner(f"srv{a}")
            live_requests.pop(f"cli{a}", None)
            dropped_requesters.add(f"cli{a}")
            free = {m: v for m, v in free.items() if v[1] != f"srv{a}"}
            for servers in holders.values():
                servers.discard(f"srv{a}")
        expected = {}
        for name in {f"k{i}" for i in range(3)}:
            n_free = sum(1 for key_, _ in free.values() if key_ == name)
            n_pending = sum(key_ == name for waits in live_requests.values() for key_, _ in waits)
            if n_free or n_pending or holders.get(name):
                expected[name] = {"free": n_free, "pending": n_pending}
        assert s.queue_info() == expected
        assert s.known_keys() == len(expected)
        for info in expected.values():
            # a key never has both free resources and waiting requests
            assert not (info["free"] and info["pending"])


def test_keys_leave_when_nothing_refers_to_them():
    s = Scheduler()
    for i in range(1000):
        s.request(f"gone{i}", "u", 1, "client")
    s.put("busy", "h", 1, "busy:1", SERVER)
    s.put("spare", "h", 1, "spare:1", OTHER_SERVER)
    s.request("busy", "u", 1, "taker")  # the server is now in a session: no free slot
    assert s.known_keys() == 1002
    s.drop_owner("client")
    # A busy server keeps its key listed (as stock shows it: total 1, free 0).
    assert s.queue_info() == {"busy": {"free": 0, "pending": 0}, "spare": {"free": 1, "pending": 0}}
    s.drop_owner(SERVER)
    s.drop_owner(OTHER_SERVER)
    assert s.queue_info() == {}
    assert s.known_keys() == 0


def test_generation_changes_with_state_only():
    s = Scheduler()
    start = s.generation
    s.drop_owner("nobody")
    assert s.generation == start
    s.put("rk", "h", 1, "rk:1", SERVER)
    after_put = s.generation
    assert after_put != start
    s.drop_owner("still-nobody")
    assert s.generation == after_put
    s.drop_owner(SERVER)
    assert s.generation != after_put


def test_forgotten_keys_are_reported_and_rule_changes_count_as_changes():
    s = Scheduler()
    forgotten = []
    s.on_forget = forgotten.append
    s.request("gone", "u", 1, "client")
    s.put("kept", "h", 1, "kept:1", SERVER)
    s.drop_owner("client")
    assert forgotten == ["gone"]
    before = s.generation
    s.rules.drain(key="kept")
    assert s.rematch() == []
    assert s.generation != before  # free counts depend on the rules
    assert s.queue_info() == {"kept": {"free": 0, "pending": 0}}
