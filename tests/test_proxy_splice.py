"""The splice(2) data path: the relay on real loopback sockets, and the Twisted behaviour
``tvmrpc/proxy/handover.py`` relies on, pinned with the real reactor (pytest-twisted).
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides

from tvmrpc.harness.sockets import recvall
from tvmrpc.proxy import handover
from tvmrpc.proxy.splice import SpliceRelay, State, splice_supported

pytestmark = pytest.mark.skipif(not splice_supported(), reason="no splice(2) here")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection, the first non-blocking (the proxy's side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    inner.setblocking(False)
    return inner, outer


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(30)
    return recvall(sock, n)


def turns(reactor, n: int = 5) -> defer.Deferred:
    """Let the reactor run ``n`` iterations (each deferLater(0) is one turn)."""

    async def run() -> None:
        for _ in range(n):
            await task.deferLater(reactor, 0, lambda: None)

    return defer.ensureDeferred(run())


class Relayed:
    """A relay between two proxy-side sockets, with the peers' sockets to drive it."""

    def __init__(self, reactor, prefix_to_a=b"", prefix_to_b=b"") -> None:
        self.a, self.peer_a = tcp_pair()
        self.b, self.peer_b = tcp_pair()
        self.done: defer.Deferred[None] = defer.Deferred()
        self.relay = SpliceRelay(
            reactor, self.a, self.b, prefix_to_a, prefix_to_b, lambda: self.done.callback(None)
        )

    def close(self) -> None:
        self.relay.stop()
        for sock in (self.a, self.b, self.peer_a, self.peer_b):
            sock.close()


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_relay_sends_prefixes_first_then_bytes_both_ways(reactor):
    r = Relayed(reactor, prefix_to_a=b"answer-a|early-b|", prefix_to_b=b"answer-b|")
    try:
        r.peer_a.sendall(b"from a")
        r.peer_b.sendall(b"from b")
        r.relay.start()
        got_b = await defer_to_recv(reactor, r.peer_b, len(b"answer-b|from a"))
        got_a = await defer_to_recv(reactor, r.peer_a, len(b"answer-a|early-b|from b"))
        assert got_b == b"answer-b|from a"
        assert got_a == b"answer-a|early-b|from b"
        # one side closing: the relay delivers what it sent, finishes once, frees its fds
        r.peer_a.sendall(b"last words")
        r.peer_a.close()
        fds = len(os.listdir("/proc/self/fd"))  # the relay runs only once we await
        await r.done
        assert r.relay.state is State.DONE
        assert recv_exactly(r.peer_b, 10) == b"last words"
        assert len(os.listdir("/proc/self/fd")) == fds - 6  # 2 dups + 2 pipes closed
    finally:
        r.close()


async def defer_to_recv(reactor, sock: socket.socket, n: int) -> bytes:
    """Read ``n`` bytes from a plain socket while the reactor runs the relay."""
    sock.setblocking(False)
    data = b""
    while len(data) < n:
        with contextlib.suppress(BlockingIOError):
            chunk = sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
            continue
        await turns(reactor, 1)
    sock.setblocking(True)
    return data


@pytest_twisted.ensureDeferred
async def test_relay_stops_reading_while_the_pipe_is_full(reactor):
    """A destination that reads nothing: the source is no longer read; bytes stay in the kernel."""
    r = Relayed(reactor)
    try:
        r.relay.start()
        r.peer_a.setblocking(False)
        sent = 0
        block = b"x" * (1 << 20)
        # push until neither the kernel nor the relay takes more
        for _ in range(64):
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent += r.peer_a.send(block)
            await turns(reactor, 3)
        end_a = r.relay._directions[0].src
        pipe = r.relay._directions[0].pipe
        assert not end_a.reading
        assert pipe.held > 0
        print(f"held back after {sent / (1 << 20):.1f} MiB; pipe holds {pipe.held} bytes")
        assert sent < 64 << 20
        # the destination reads: everything arrives, in order
        r.peer_b.setblocking(True)
        got = 0
        r.peer_b.settimeout(0.0)
        while got < sent:
            try:
                chunk = r.peer_b.recv(1 << 20)
            except BlockingIOError:
                await turns(reactor, 1)
                continue
            assert chunk == b"x" * len(chunk)
            got += len(chunk)
        assert got == sent
    finally:
        r.close()


@pytest.mark.parametrize("pipe_bytes", [4096, 1 << 20])
@pytest_twisted.ensureDeferred
async def test_relay_moves_everything_in_order_both_ways_at_once(reactor, monkeypatch, pipe_bytes):
    """8 MiB each way at the same time, through pipes of one page (the size an
    unprivileged user over its pipe quota gets) or of 1 MiB."""
    import hashlib

    from tvmrpc.proxy import splice

    monkeypatch.setattr(splice, "PIPE_BYTES", (pipe_bytes,))
    r = Relayed(reactor, prefix_to_a=b"A", prefix_to_b=b"B")
    total = 8 << 20
    blocks = {
        side: bytes((i * (7 if side == "a" else 13)) % 251 for i in range(1 << 16)) for side in "ab"
    }
    try:
        assert r.relay._directions[0].pipe.capacity == pipe_bytes
        r.relay.start()
        socks = {"a": r.peer_a, "b": r.peer_b}
        for sock in socks.values():
            sock.setblocking(False)
        sent = {"a": 0, "b": 0}
        got = {"a": b"", "b": b""}  # what each peer received (prefix first)
        digests = {"a": hashlib.sha256(), "b": hashlib.sha256()}
        received = {"a": 0, "b": 0}
        while received["a"] < total + 1 or received["b"] < total + 1:
            for side, sock in socks.items():
                with contextlib.suppress(BlockingIOError):
                    if sent[side] < total:
                        offset = sent[side] % len(blocks[side])
                        sent[side] += sock.send(blocks[side][offset:])
                with contextlib.suppress(BlockingIOError):
                    chunk = sock.recv(1 << 20)
                    assert chunk, f"{side} closed early"
                    if not got[side]:
                        got[side], chunk = chunk[:1], chunk[1:]
                    digests[side].update(chunk)
                    received[side] += len(chunk) + (1 if received[side] == 0 else 0)
            await turns(reactor, 1)
        assert got == {"a": b"A", "b": b"B"}
        assert r.relay.moved == (total, total)
        for side, other in (("a", "b"), ("b", "a")):
            expected = hashlib.sha256()
            for _ in range(total // len(blocks[other])):
                expected.update(blocks[other])
            assert digests[side].hexdigest() == expected.hexdigest()
    finally:
        r.close()


@pytest_twisted.ensureDeferred
async def test_relay_destination_gone_finishes_once(reactor):
    r = Relayed(reactor)
    calls = []
    r.done.addCallback(calls.append)
    try:
        r.relay.start()
        r.peer_b.close()
        r.peer_a.sendall(b"to nobody" * 1000)
        await r.done
        await turns(reactor)
        assert calls == [None]
        r.relay.stop()  # idempotent
        assert calls == [None]
    finally:
        r.close()


# -- the Twisted behaviour handover.py relies on -------------------------------


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.made: defer.Deferred[Recorder] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_paused_transport_reads_nothing_and_still_closes(reactor):
    recorder = Recorder()
    factory = protocol.Factory.forProtocol(lambda: recorder)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30)
    try:
        proto = await recorder.made
        transport = proto.transport
        sock = handover.spliceable_socket(transport)
        assert isinstance(sock, socket.socket)
        assert sock.getpeername() == client.getsockname()
        assert not sock.getblocking()
        handover.take(transport)
        client.sendall(b"for the relay")
        await turns(reactor, 10)
        assert recorder.received == b""  # Twisted read nothing ...
        assert sock.recv(64, socket.MSG_PEEK) == b"for the relay"  # ... it is all still there
        transport.loseConnection()  # paused and never written: still closes
        await recorder.lost
        client.settimeout(30)
        assert client.recv(64) == b""
    finally:
        client.close()
        await port.stopListening()


def test_only_plain_tcp_transports_are_spliceable():
    assert handover.spliceable_socket(StringTransport()) is None
    tls_like = StringTransport()
    directlyProvides(tls_like, ISSLTransport)
    assert handover.spliceable_socket(tls_like) is None


# -- legs on the real reactor: splice, and the fall-back to userspace ------------


async def handshake(reactor, port: int, key: str) -> socket.socket:
    from tvmrpc.codec import encode_handshake

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(encode_handshake(key))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("fail_relay", [False, True], ids=["splice", "fallback"])
@pytest_twisted.ensureDeferred
async def test_legs_splice_or_fall_back_to_userspace(reactor, monkeypatch, fail_relay):
    from tvmrpc.codec import RPC_CODE_SUCCESS, encode_reply
    from tvmrpc.proxy import leg
    from tvmrpc.proxy.protocol import ProxyFactory
    from tvmrpc.proxy.switchboard import Switchboard

    if fail_relay:

        def no_fds(*args, **kwargs):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(leg, "SpliceRelay", no_fds)
    board = Switchboard(reactor)
    factory = ProxyFactory(board, 5, reactor)
    legs = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: legs.append(build(addr)) or legs[-1]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = client = None
    try:
        number = port.getHost().port
        server = await handshake(reactor, number, "server:k")
        server.sendall(b"early")
        await turns(reactor, 10)
        client = await handshake(reactor, number, "client:k")
        answer = encode_reply(RPC_CODE_SUCCESS, "server:k")
        assert await defer_to_recv(reactor, client, len(answer) + 5) == answer + b"early"
        answer = encode_reply(RPC_CODE_SUCCESS, "client:k")
        assert await defer_to_recv(reactor, server, len(answer)) == answer
        client.sendall(b"ping")
        assert await defer_to_recv(reactor, server, 4) == b"ping"
        assert len(board.table) == 0
        assert [p.forwarding for p in legs] == ["userspace" if fail_relay else "splice"] * 2
        server.close()
        client.setblocking(True)
        client.settimeout(0)
        while True:  # the proxy closes the client once the server went
            try:
                if client.recv(64) == b"":
                    break
            except BlockingIOError:
                await turns(reactor, 1)
            except ConnectionResetError:
                break
    finally:
        for sock in (server, client):
            if sock is not None:
                sock.close()
        await port.stopListening()
