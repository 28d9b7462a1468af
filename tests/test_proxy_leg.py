"""A leg's life cycle with plain calls: phases, impossible events, the carriers' interface,
the switchboard's watchers and the service's injected reactor."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tvmrpc.codec import RPC_CODE_DUPLICATE, RPC_CODE_SUCCESS, encode_handshake, encode_reply
from tvmrpc.proxy.leg import ALLOWED, ILegTransport, Leg, LegStateError, Phase
from tvmrpc.proxy.protocol import ProxyFactory, ProxyProtocol
from tvmrpc.proxy.registrar import Registrar
from tvmrpc.proxy.switchboard import ILeg, IServerWatcher, Switchboard


@implementer(ILegTransport)
class Carrier:
    """An ILegTransport that records what the leg asks of it."""

    def __init__(self, name: str, host: str | None = "127.0.0.1") -> None:
        self.peer_name = name
        self.peer_host = host
        self.bytes = StringTransport()
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.bytes.write(data)

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")

    def producer(self) -> Any:
        return self.bytes

    def on_waiting(self) -> None:
        self.events.append("waiting")

    def splice_socket(self) -> None:
        return None


def new_leg(board: Switchboard, name: str) -> tuple[Leg, Carrier]:
    carrier = Carrier(name)
    leg = Leg(board, carrier, handshake_timeout=5)
    leg.connected()
    return leg, carrier


def test_a_leg_goes_through_every_phase_in_order():
    clock = Clock()
    board = Switchboard(clock)
    server, server_carrier = new_leg(board, "s")
    assert server.phase is Phase.HANDSHAKE
    server.received(encode_handshake("server:dev"))
    assert server.phase is Phase.WAITING
    assert server_carrier.events == ["waiting"]
    client, client_carrier = new_leg(board, "c")
    client.received(encode_handshake("client:dev"))
    assert server.phase is client.phase is Phase.FORWARDING
    assert client_carrier.bytes.value() == encode_reply(RPC_CODE_SUCCESS, "server:dev")
    # flow control: each leg's byte transport is fed by the other's
    assert client_carrier.bytes.producer is server_carrier.bytes
    assert server_carrier.bytes.producer is client_carrier.bytes
    client.received(b"payload")
    assert server_carrier.bytes.value().endswith(b"payload")
    assert client.forwarded_bytes == 7
    assert client.forwarding == "userspace"
    client.lost()
    assert client.phase is Phase.CLOSED
    assert server.phase is Phase.CLOSING
    assert server_carrier.events == ["waiting", "close"]
    server.lost()
    assert server.phase is Phase.CLOSED
    assert clock.getDelayedCalls() == []  # no timer outlives its phase


def test_the_handshake_timer_runs_only_during_the_handshake():
    clock = Clock()
    board = Switchboard(clock)
    leg, carrier = new_leg(board, "slow")
    assert len(clock.getDelayedCalls()) == 1
    leg.received(encode_handshake("server:k")[:5])
    clock.advance(5)
    assert leg.phase is Phase.CLOSING
    assert carrier.events == ["abort"]
    leg.lost()
    waiting, _ = new_leg(board, "quick")
    waiting.received(encode_handshake("server:k"))
    assert waiting.phase is Phase.WAITING
    # the handshake timer is gone; what is left is the wait's own deadline
    assert [c.getTime() for c in clock.getDelayedCalls()] == [5 + 600]


def test_a_refused_leg_is_answered_and_closed():
    board = Switchboard(Clock())
    first, _ = new_leg(board, "one")
    first.received(encode_handshake("server:k"))
    second, carrier = new_leg(board, "two")
    second.received(encode_handshake("server:k"))
    assert second.phase is Phase.CLOSING
    assert carrier.bytes.value() == encode_reply(RPC_CODE_DUPLICATE)
    assert carrier.events == ["waiting", "close"]
    # bytes that arrive between our close and the connection's end are dropped
    second.received(b"late")
    assert board.early.held(second) == 0


@pytest.mark.parametrize(
    ("phase_events", "event"),
    [
        ([], "pair"),  # paired before its handshake
        ([], "start"),
        (["handshake"], "connected"),  # connected twice
        (["handshake", "lost"], "lost"),  # lost twice
        (["handshake", "lost"], "received"),
        (["wait"], "peer_gone"),  # a waiting leg has no peer
        (["wait"], "timed_out"),  # its handshake timer is gone
    ],
)
def test_impossible_events_raise(phase_events, event):
    board = Switchboard(Clock())
    leg = Leg(board, Carrier("x"), handshake_timeout=5)
    for step in phase_events:
        if step == "handshake":
            leg.connected()
        elif step == "wait":
            leg.connected()
            leg.received(encode_handshake("server:k"))
        elif step == "lost":
            leg.lost()
    before = leg.phase
    call = {
        "pair": lambda: leg.pair(Leg(board, Carrier("y"), 5)),
        "start": leg.start,
        "connected": leg.connected,
        "lost": leg.lost,
        "received": lambda: leg.received(b"x"),
        "peer_gone": leg.peer_gone,
        "timed_out": leg.timed_out,
    }[event]
    with pytest.raises(LegStateError, match=f"{event} while {before.value}"):
        call()
    assert leg.phase is before


def test_every_event_names_the_phases_it_may_happen_in():
    assert set(ALLOWED) == {
        "connected",
        "received",
        "timed_out",
        "pair",
        "start",
        "refuse",
        "peer_gone",
        "lost",
    }
    assert all(Phase.CLOSED not in phases for phases in ALLOWED.values())


def test_carriers_and_legs_provide_their_interfaces():
    board = Switchboard(Clock())
    proto = ProxyFactory(board).buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert isinstance(proto, ProxyProtocol)
    assert verifyObject(ILegTransport, proto)
    assert verifyObject(ILeg, proto.leg)
    assert proto.leg.carrier is proto
    assert proto.leg == proto  # one connection, one leg: looked up by either
    assert hash(proto.leg) == hash(proto)


def test_websocket_carrier_provides_the_interface():
    pytest.importorskip("autobahn")
    from tvmrpc.proxy.websocket import WebSocketLeg, _LegFactory

    ws = _LegFactory(Switchboard(Clock()), 5).buildProtocol(None)
    assert isinstance(ws, WebSocketLeg)
    assert verifyObject(ILegTransport, ws)
    assert ws.splice_socket() is None
    assert ws.leg.phase is Phase.NEW


@implementer(IServerWatcher)
class Watcher:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def server_waiting(self, device_key: str, matchkey: str) -> None:
        self.events.append(("waiting", device_key))

    def server_gone(self, matchkey: str) -> None:
        self.events.append(("gone", matchkey.split(":")[0]))


def test_watchers_hear_of_servers_only_while_subscribed():
    board = Switchboard(Clock(), tracker_mode=True)
    watcher = Watcher()
    board.subscribe(watcher)
    board.subscribe(watcher)  # once is enough
    leg, _ = new_leg(board, "s")
    leg.received(encode_handshake("server:dev"))
    leg.lost()
    assert watcher.events == [("waiting", "dev"), ("gone", "dev")]
    board.unsubscribe(watcher)
    board.unsubscribe(watcher)  # idempotent
    again, _ = new_leg(board, "s2")
    again.received(encode_handshake("server:dev"))
    assert watcher.events == [("waiting", "dev"), ("gone", "dev")]


def test_registrar_watches_the_switchboard_only_while_running():
    from twisted.internet import defer

    clock = Clock()
    board = Switchboard(clock, tracker_mode=True)
    registrar = Registrar(clock, board, ("t", 1), defer.Deferred())
    assert verifyObject(IServerWatcher, registrar)
    assert board._watchers == []  # constructing it plugs nothing in
    registrar.startService()
    assert board._watchers == [registrar]
    registrar.stopService()
    assert board._watchers == []


def test_make_service_uses_the_reactor_it_is_given():
    from tvmrpc.proxy.service import Options, makeService

    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.startService()
    try:
        ((port, factory, _, interface),) = reactor.tcpServers
        assert (port, interface) == (0, "127.0.0.1")
        assert factory.switchboard.clock is reactor  # timers run on the injected reactor
        assert factory.splice_reactor is None or factory.splice_reactor is reactor
    finally:
        top.stopService()


def test_a_pairing_that_ends_while_it_is_set_up_starts_nothing():
    """start() on a leg already closing (its relay ended at once) moves no byte."""
    board = Switchboard(Clock())
    server, server_carrier = new_leg(board, "s")
    server.received(encode_handshake("server:k"))
    client, _ = new_leg(board, "c")
    client.received(encode_handshake("client:other"))  # waits too: paired by hand below
    client.pair(server)
    server.pair(client)
    assert client.phase is server.phase is Phase.ANSWERED
    server.peer_gone()  # as the relay's end does, before start()
    server.start()
    assert server.phase is Phase.CLOSING
    assert server_carrier.bytes.producer is None  # no flow control was linked
    assert server_carrier.events == ["waiting", "close"]
