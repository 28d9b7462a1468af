"""Tracker mode bookkeeping with a fake tracker link and a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock

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
    registrar = Registrar(clock, board, ("t", 1), defer.Deferred(), custom_addr=custom_addr,
                          grace=5)
    registrar.port = 9090
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


def test_departed_waiting_servers_reset_the_tracker_link_once():
    """The wire cannot withdraw one PUT: the link is dropped so the tracker forgets them all."""
    clock, board, registrar = setup()
    link = FakeLink()
    closed = []
    link.transport.loseConnection = lambda: closed.append(True)
    registrar._ready(link)
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
    link = FakeLink()
    closed = []
    link.transport.loseConnection = lambda: closed.append(True)
    registrar._ready(link)
    board.leave(FakeLeg("never-waited"))
    clock.advance(1)
    assert closed == []
