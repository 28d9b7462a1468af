"""Tracker mode bookkeeping with a fake tracker link and a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tvmrpc.codec import PeerKey
from tvmrpc.proxy.pairing import SERVER
from tvmrpc.proxy.registrar import Registrar
from tvmrpc.proxy.switchboard import Switchboard


class FakeLink:
    """Records tracker calls; GET_PENDING_MATCHKEYS answers ``pending``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.pending: list[str] = []
        self.transport = SimpleNamespace(getPeer=lambda: SimpleNamespace(host="t", port=1))

    def put(self, key, port, matchkey, custom_addr=None):
        self.calls.append(("put", key, port, matchkey, custom_addr))
        return defer.succeed(None)

    def update_info(self, info):
        self.calls.append(("info", info))
        return defer.succeed(None)

    def pending_matchkeys(self):
        return defer.succeed(list(self.pending))


class FakeLeg:
    def __init__(self, name: str) -> None:
        self.peer_name = name
        self.key = f"server:{name}"

    def pair(self, peer) -> None: ...

    def start(self) -> None: ...

    def refuse(self, code: int) -> None: ...


def setup(custom_addr=None):
    clock = Clock()
    board = Switchboard(clock, tracker_mode=True)
    registrar = Registrar(
        clock, board, ("t", 1), defer.Deferred(), custom_addr=custom_addr, grace=5
    )
    registrar.port = 9090
    registrar.startService()  # it watches the switchboard while it runs
    return clock, board, registrar


def arrive(board: Switchboard, key: str) -> FakeLeg:
    leg = FakeLeg(key)
    board.arrive(leg, PeerKey("server", key), key)
    return leg


def test_servers_before_connect_are_rekeyed_and_put_on_connect():
    _, board, registrar = setup(custom_addr="10.0.0.2")
    leg = arrive(board, "dev")
    before = board.table.matchkey_of(leg)
    link = FakeLink()
    registrar._ready(link)
    after = board.table.matchkey_of(leg)
    assert after != before
    assert link.calls == [
        ("info", {"key": "server:proxy[dev]", "addr": ["10.0.0.2", 9090]}),
        ("put", "dev", 9090, after, "10.0.0.2"),
    ]


def test_new_device_key_updates_info_before_put():
    _, board, registrar = setup()
    link = FakeLink()
    registrar._ready(link)
    link.calls.clear()
    a = arrive(board, "b")
    arrive(board, "a")
    second_b = arrive(board, "b")
    assert [c[0] for c in link.calls] == ["info", "put", "info", "put", "put"]
    assert link.calls[2] == ("info", {"key": "server:proxy[a,b]", "addr": [None, 9090]})
    assert link.calls[1][3] == board.table.matchkey_of(a)
    assert link.calls[4][3] == board.table.matchkey_of(second_b)


def test_handed_out_key_regenerated_after_grace_and_lost_link_stops_puts():
    clock, board, registrar = setup()
    link = FakeLink()
    registrar._ready(link)
    leg = arrive(board, "dev")
    first = board.table.matchkey_of(leg)
    link.pending = []  # the tracker handed it out
    link.calls.clear()
    registrar._check()
    clock.advance(4.9)
    registrar._check()
    assert link.calls == []
    clock.advance(0.1)
    registrar._check()
    second = board.table.matchkey_of(leg)
    assert second != first
    assert link.calls == [("put", "dev", 9090, second, None)]
    registrar._lost(link)
    link.calls.clear()
    arrive(board, "other")
    assert link.calls == []
    waiting = board.table.waiting(SERVER)
    assert len(waiting) == 2
    assert waiting[second] is leg


def connected_link(registrar: Registrar) -> list[bool]:
    """Connect ``registrar`` to a fake tracker; the list records each reset of the link."""
    link = FakeLink()
    closed: list[bool] = []
    link.transport.loseConnection = lambda: closed.append(True)
    registrar._ready(link)
    return closed


def test_departed_waiting_servers_reset_the_tracker_link_once():
    """The wire cannot withdraw one PUT: the link is dropped so the tracker forgets them all."""
    clock, board, registrar = setup()
    closed = connected_link(registrar)
    gone_a, gone_b = arrive(board, "a"), arrive(board, "b")
    stays = arrive(board, "c")
    board.leave(gone_a)
    board.leave(gone_b)
    assert closed == []
    clock.advance(registrar.withdraw_delay)
    assert closed == [True]
    assert list(board.table.waiting(SERVER).values()) == [stays]


def test_paired_or_client_legs_leaving_do_not_reset_the_link():
    clock, board, registrar = setup()
    closed = connected_link(registrar)
    board.leave(FakeLeg("never-waited"))
    clock.advance(1)
    assert closed == []


def in_session(board: Switchboard, server: FakeLeg) -> FakeLeg:
    """A client takes ``server`` (it stops waiting and is in a session)."""
    matchkey = board.table.matchkey_of(server)
    client = FakeLeg(matchkey)
    client.key = f"client:{matchkey}"
    board.arrive(client, PeerKey("client", matchkey), matchkey)
    assert not board.table.is_waiting(server)
    return client


def test_advertised_keys_shrink_within_one_period_after_the_last_server_leaves():
    _, board, registrar = setup()
    link = FakeLink()
    registrar._ready(link)
    a1, a2, b = arrive(board, "a"), arrive(board, "a"), arrive(board, "b")
    for server in (a1, a2, b):
        in_session(board, server)
    link.calls.clear()
    board.leave(a1)  # its session ended; another "a" is still there
    registrar._check()
    assert [c for c in link.calls if c[0] == "info"] == []
    board.leave(a2)
    board.leave(b)
    registrar._check()
    assert ("info", {"key": "server:proxy[]", "addr": [None, 9090]}) in link.calls
    link.calls.clear()
    registrar._check()  # nothing changed since: nothing sent
    assert link.calls == []


def test_waiting_servers_leaving_reset_the_link_and_the_next_link_gets_the_smaller_set():
    clock, board, registrar = setup()
    link = FakeLink()
    link.transport.loseConnection = lambda: None
    registrar._ready(link)
    stays, goes = arrive(board, "stays"), arrive(board, "goes")
    link.calls.clear()
    board.leave(goes)
    registrar._check()  # a reset is pending: no UPDATE_INFO on a link about to go
    assert link.calls == []
    clock.advance(registrar.withdraw_delay)
    registrar._lost(link)
    second = FakeLink()
    registrar._ready(second)
    assert second.calls[0] == ("info", {"key": "server:proxy[stays]", "addr": [None, 9090]})
    assert board.table.matchkey_of(stays) == second.calls[1][3]


def test_bounded_device_keys_keep_update_info_small():
    from tvmrpc.codec import MAX_KEY_CHARS, encode_frame
    from tvmrpc.proxy.limits import DeviceKeys

    clock = Clock()
    board = Switchboard(clock, tracker_mode=True, device_keys=DeviceKeys(limit=8))
    registrar = Registrar(clock, board, ("t", 1), defer.Deferred())
    registrar.port = 9090
    registrar.startService()
    link = FakeLink()
    registrar._ready(link)
    for i in range(300):  # case 2: 300 junk servers with long keys
        arrive(board, f"{i:03d}" + "j" * (MAX_KEY_CHARS - 40))
    infos = [c[1] for c in link.calls if c[0] == "info"]
    largest = max(len(encode_frame([5, info])) for info in infos)
    print(f"largest UPDATE_INFO frame with 300 junk keys: {largest} bytes")
    assert largest < 8 * (MAX_KEY_CHARS + 1) + 100
    assert len([c for c in link.calls if c[0] == "put"]) == 8


class RefusingLink(FakeLink):
    """A tracker that refuses UPDATE_INFO with ``failure``, unless it is plain ``server:proxy``."""

    def __init__(self, failure: Exception) -> None:
        super().__init__()
        self.failure = failure

    def update_info(self, info):
        self.calls.append(("info", info))
        if info["key"] == "server:proxy":
            return defer.succeed(None)
        return defer.fail(self.failure)


def test_refused_update_info_falls_back_to_plain_proxy_key_once():
    from tvmrpc.client import TrackerError

    _, board, registrar = setup()
    arrive(board, "dev")
    link = RefusingLink(TrackerError("tracker refused UPDATE_INFO: -1"))
    registrar._ready(link)
    assert registrar.compact
    arrive(board, "other")
    second = FakeLink()
    registrar._ready(second)
    infos = [c[1]["key"] for c in second.calls if c[0] == "info"]
    assert infos == ["server:proxy"]
    assert [c[0] for c in second.calls].count("put") == 2


def test_tracker_closing_under_update_info_falls_back_but_our_own_reset_does_not():
    from twisted.internet.error import ConnectionDone

    _, board, registrar = setup()
    ours = FakeLink()
    ours.transport.loseConnection = lambda: None
    registrar._ready(ours)
    arrive(board, "dev")
    registrar._reset_link()  # we closed it to withdraw a departed server
    registrar._info_failed(Failure(ConnectionDone()), ours, registrar.info())
    assert not registrar.compact
    theirs = RefusingLink(ConnectionDone())
    registrar._ready(theirs)
    assert registrar.compact
