"""The Twisted behaviour ``tvmrpc/server/handoff.py`` relies on, pinned with the real reactor.

- ``detach``: public APIs only; the connection lives on in the duplicate and
  Twisted never touches it again (no read, no shutdown, no connectionLost).
- ``read_at_most``: the one workaround (a transport's ``bufferSize``): a read
  takes no more than asked, the rest stays in the socket.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task

from tvmrpc.server.handoff import detach, read_at_most


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


def turns(reactor, n: int = 10) -> defer.Deferred:
    """Let the reactor run ``n`` iterations."""

    async def run() -> None:
        for _ in range(n):
            await task.deferLater(reactor, 0, lambda: None)

    return defer.ensureDeferred(run())


class Recorder(protocol.Protocol):
    def __init__(self, first_read: int | None = None) -> None:
        self.made: defer.Deferred[Recorder] = defer.Deferred()
        self.reads: list[bytes] = []
        self.lost = False
        self.first_read = first_read
        self.read: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.first_read is not None:
            read_at_most(self.transport, self.first_read)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        if not self.read.called:
            self.read.callback(data)
        if self.first_read is not None:
            self.transport.pauseProducing()  # one read only: the rest must stay in the socket

    def connectionLost(self, reason=None) -> None:
        self.lost = True


async def serve(reactor, recorder: Recorder):
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(lambda: recorder), interface="127.0.0.1"
    )
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30)
    await recorder.made
    return port, client


@pytest_twisted.ensureDeferred
async def test_detached_connection_lives_on_in_the_duplicate_only(reactor):
    recorder = Recorder()
    port, client = await serve(reactor, recorder)
    try:
        sock = detach(reactor, recorder.transport)
        assert sock.getblocking()
        assert sock.getpeername() == client.getsockname()
        client.sendall(b"for the worker")
        await turns(reactor)
        assert recorder.reads == []  # Twisted is out of it
        assert not recorder.lost
        assert sock.recv(64) == b"for the worker"
        sock.sendall(b"from the worker")
        assert client.recv(64) == b"from the worker"  # not shut down by Twisted
        sock.close()
        assert client.recv(64) == b""  # the duplicate's close ends the connection
        await turns(reactor)
        assert not recorder.lost
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_read_at_most_leaves_the_rest_in_the_socket(reactor):
    recorder = Recorder(first_read=4)
    port, client = await serve(reactor, recorder)
    try:
        client.sendall(b"ANSWsession bytes")
        await recorder.read
        await turns(reactor)
        assert recorder.reads == [b"ANSW"]
        handle = recorder.transport.getHandle()
        assert handle.recv(64, socket.MSG_PEEK) == b"session bytes"
    finally:
        client.close()
        await port.stopListening()
