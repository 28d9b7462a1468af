"""The proxy's pairing table and switchboard, with plain calls and a fake clock."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.task import Clock

from tests.proxy_support import Wire
from tvmrpc.codec import (
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    encode_handshake,
    parse_key,
    proxy_matchkey,
)
from tvmrpc.proxy.pairing import (
    CLIENT,
    SERVER,
    Duplicate,
    NoMatch,
    Paired,
    PairingTable,
    Waiting,
)
from tvmrpc.proxy.protocol import ProxyFactory
from tvmrpc.proxy.switchboard import Switchboard

# -- the pure table ----------------------------------------------------------


def test_first_arrival_waits_and_the_other_role_pairs_with_it():
    table = PairingTable()
    assert table.arrive("s", SERVER, "k", now=0, timeout=10) == Waiting("k", 10)
    assert table.arrive("c", CLIENT, "k", now=1, timeout=10) == Paired("s")
    assert len(table) == 0
    assert not table.is_waiting("s")


def test_client_first_then_server():
    table = PairingTable()
    assert isinstance(table.arrive("c", CLIENT, "k", now=0, timeout=None), Waiting)
    assert table.arrive("s", SERVER, "k", now=0, timeout=None) == Paired("c")


def test_same_role_never_pairs_and_second_waiter_is_duplicate():
    table = PairingTable()
    table.arrive("s1", SERVER, "k", now=0, timeout=10)
    assert table.arrive("s2", SERVER, "k", now=0, timeout=10) == Duplicate()
    assert table.waiting(SERVER) == {"k": "s1"}
    assert table.arrive("c", CLIENT, "k", now=0, timeout=10) == Paired("s1")
    # after pairing the key is free again
    assert isinstance(table.arrive("s2", SERVER, "k", now=0, timeout=10), Waiting)


def test_different_keys_do_not_pair():
    table = PairingTable()
    table.arrive("s", SERVER, "a", now=0, timeout=10)
    assert isinstance(table.arrive("c", CLIENT, "b", now=0, timeout=10), Waiting)
    assert len(table) == 2


def test_expiry_removes_only_due_waiters():
    table = PairingTable()
    table.arrive("s", SERVER, "a", now=0, timeout=5)
    table.arrive("c", CLIENT, "b", now=2, timeout=5)
    table.arrive("forever", SERVER, "c", now=0, timeout=None)
    assert table.next_deadline() == 5
    assert table.expire(4.9) == []
    assert table.expire(5) == ["s"]
    assert table.expire(100) == ["c"]
    assert table.waiting(SERVER) == {"c": "forever"}
    assert table.next_deadline() is None


def test_withdraw_forgets_a_waiter_once():
    table = PairingTable()
    table.arrive("s", SERVER, "k", now=0, timeout=5)
    assert table.withdraw("s") is True
    assert table.withdraw("s") is False
    assert table.expire(10) == []
    assert isinstance(table.arrive("c", CLIENT, "k", now=0, timeout=5), Waiting)


def test_may_not_wait_gives_no_match():
    table = PairingTable()
    assert table.arrive("c", CLIENT, "k:1", now=0, timeout=5, may_wait=False) == NoMatch()
    assert len(table) == 0


def test_rekey_moves_a_server_to_a_fresh_key():
    table = PairingTable()
    first = table.fresh_server_key("dev")
    assert first.startswith("dev:")
    table.arrive("s", SERVER, first, now=0, timeout=None)
    second = table.rekey(first)
    assert second != first
    assert second.rsplit(":", 1)[0] == "dev"
    assert table.matchkey_of("s") == second
    assert table.arrive("c", CLIENT, first, now=0, timeout=None, may_wait=False) == NoMatch()
    assert table.arrive("c", CLIENT, second, now=0, timeout=None, may_wait=False) == Paired("s")


def test_stale_server_keys_after_grace():
    table = PairingTable()
    table.arrive("s1", SERVER, "d:1", now=0, timeout=None)
    table.arrive("s2", SERVER, "d:2", now=0, timeout=None)
    assert table.stale_server_keys({"d:1", "d:2"}, now=0, grace=5) == []
    # d:2 was handed out: first noticed at 1, stale from 6 on
    assert table.stale_server_keys({"d:1"}, now=1, grace=5) == []
    assert table.stale_server_keys({"d:1"}, now=5.9, grace=5) == []
    assert table.stale_server_keys({"d:1"}, now=6, grace=5) == ["d:2"]
    # back in pending: forgotten
    assert table.stale_server_keys({"d:1", "d:2"}, now=7, grace=5) == []
    assert table.stale_server_keys({"d:1"}, now=8, grace=5) == []


def test_rekey_all():
    table = PairingTable()
    table.arrive("s1", SERVER, "a:1", now=0, timeout=None)
    table.arrive("s2", SERVER, "b:1", now=0, timeout=None)
    new = table.rekey_all()
    assert sorted(k.rsplit(":", 1)[0] for k in new) == ["a", "b"]
    assert set(table.waiting(SERVER)) == set(new)


def test_matchkey_grammar():
    assert proxy_matchkey("client:abc -timeout=30") == "abc"
    assert proxy_matchkey("server:dev:0.5") == "dev:0.5"


# -- the switchboard and TCP legs with string transports ---------------------


def reply(code: int, key: str | None = None) -> bytes:
    if key is None:
        return struct.pack("<i", code)
    return struct.pack("<ii", code, len(key)) + key.encode()


@pytest.fixture
def clock():
    return Clock()


def make_factory(clock, **kwargs) -> ProxyFactory:
    return ProxyFactory(Switchboard(clock, **kwargs), handshake_timeout=5)


def test_legs_pair_and_forward_both_ways(clock):
    factory = make_factory(clock)
    server, client = Wire(factory), Wire(factory)
    # a handshake split anywhere is fine
    data = encode_handshake("server:dev")
    for i in range(len(data)):
        server.send(data[i : i + 1])
    assert server.take() == b""
    client.send(encode_handshake("client:dev -timeout=30"))
    assert server.take() == reply(RPC_CODE_SUCCESS, "client:dev -timeout=30")
    assert client.take() == reply(RPC_CODE_SUCCESS, "server:dev")
    assert client.transport.producer is server.transport
    assert server.transport.producer is client.transport
    client.send(b"\x00" * 10 + b"abc")
    assert server.take() == b"\x00" * 10 + b"abc"
    server.send(b"xyz")
    assert client.take() == b"xyz"
    # one side closing closes the other
    server.proto.connectionLost()
    assert client.transport.disconnecting


def test_waiting_leg_times_out_with_no_match(clock):
    factory = make_factory(clock, timeout_client=3, timeout_server=7)
    client = Wire(factory)
    client.send(encode_handshake("client:dev"))
    clock.advance(2.9)
    assert client.take() == b""
    clock.advance(0.1)
    assert client.take() == reply(RPC_CODE_MISMATCH)
    assert client.transport.disconnecting
    # and the key is free: a server now waits rather than pairing with a ghost
    server = Wire(factory)
    server.send(encode_handshake("server:dev"))
    assert server.take() == b""
    assert factory.switchboard.table.waiting(SERVER) == {"dev": server.proto}


def test_duplicate_waiter_refused_first_kept(clock):
    factory = make_factory(clock)
    first, second = Wire(factory), Wire(factory)
    first.send(encode_handshake("server:dev"))
    second.send(encode_handshake("server:dev"))
    assert second.take() == reply(RPC_CODE_DUPLICATE)
    assert second.transport.disconnecting
    assert not first.transport.disconnecting
    assert factory.switchboard.table.waiting(SERVER) == {"dev": first.proto}


def test_closed_waiter_is_forgotten_and_its_timer_cancelled(clock):
    factory = make_factory(clock, timeout_server=5)
    server = Wire(factory)
    server.send(encode_handshake("server:dev"))
    server.proto.connectionLost()
    assert len(factory.switchboard.table) == 0
    assert clock.getDelayedCalls() == []


def test_bad_and_stalled_handshakes_close_only_themselves(clock):
    factory = make_factory(clock)
    bad = Wire(factory)
    bad.send(b"GET / HTTP/1.1\r\n\r\n")
    assert bad.transport.disconnecting or bad.transport.disconnected
    nokey = Wire(factory)
    nokey.send(encode_handshake("nobody:dev"))
    assert nokey.transport.disconnecting or nokey.transport.disconnected
    stalled = Wire(factory)
    stalled.send(encode_handshake("server:dev")[:6])
    waiter = Wire(factory)
    waiter.send(encode_handshake("server:other"))
    clock.advance(5)
    assert stalled.transport.disconnecting or stalled.transport.disconnected
    assert not waiter.transport.disconnecting
    assert factory.switchboard.table.waiting(SERVER) == {"other": waiter.proto}


class Watcher:
    """An IServerWatcher that records the servers that start waiting."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def server_waiting(self, device_key: str, matchkey: str) -> None:
        self.seen.append((device_key, matchkey))

    def server_gone(self, matchkey: str) -> None:
        pass


def test_tracker_mode_rekeys_servers_and_refuses_unknown_clients(clock):
    factory = make_factory(clock, tracker_mode=True)
    seen = []
    factory.switchboard.subscribe(Watcher(seen))
    server = Wire(factory)
    server.send(encode_handshake("server:dev"))
    ((key, matchkey),) = seen
    assert key == "dev"
    assert matchkey.startswith("dev:")
    stray = Wire(factory)
    stray.send(encode_handshake("client:dev:0.42"))
    assert stray.take() == reply(RPC_CODE_MISMATCH)
    clock.advance(10_000)  # servers wait without deadline in tracker mode
    assert server.take() == b""
    client = Wire(factory)
    client.send(encode_handshake(f"client:{matchkey} -timeout=5"))
    assert client.take() == reply(RPC_CODE_SUCCESS, "server:dev")
    assert server.take() == reply(RPC_CODE_SUCCESS, f"client:{matchkey} -timeout=5")


def test_parse_key_roles():
    assert parse_key("server:dev -x").role == "server"
