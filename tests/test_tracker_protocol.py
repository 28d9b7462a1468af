"""The tracker protocol over in-memory transports: replies, isolation of bad peers."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tvmrpc.codec import TRACKER_MAGIC, FrameDecoder, encode_frame, encode_int32
from tvmrpc.tracker.protocol import TrackerFactory

MAGIC = encode_int32(TRACKER_MAGIC)


class Peer:
    """One connection to the tracker with a decoder for its replies."""

    def __init__(self, factory: TrackerFactory, host: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.proto = factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.decoder = FrameDecoder()
        self.writes = 0
        self.proto.dataReceived(MAGIC)
        assert self.transport.value() == MAGIC
        self.transport.clear()

    def send(self, *frames) -> list:
        self.proto.dataReceived(b"".join(encode_frame(f) for f in frames))
        return self.replies()

    def replies(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(data)

    def close(self) -> None:
        self.proto.connectionLost(None)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


@pytest.fixture
def factory():
    return TrackerFactory(stop_key="s3cret")


def test_put_request_summary_pending(factory):
    server = Peer(factory, "10.0.0.5")
    client = Peer(factory, "10.0.0.9")
    assert server.send([5, {"key": "server:rk", "addr": [None, 9090]}]) == [0]
    assert server.send([3, "rk", [9090, "rk:0.1"], None]) == [0]
    assert server.send([7]) == [["rk:0.1"]]
    assert client.send([6]) == [
        [0, {"queue_info": {"rk": {"free": 1, "pending": 0}},
             "server_info": [{"key": "server:rk", "addr": ["10.0.0.5", 9090]}]}]
    ]
    assert client.send([4, "rk", "me", 1]) == [[0, ["10.0.0.5", 9090, "rk:0.1"]]]
    assert server.send([7]) == [[]]


def test_custom_address_and_queued_request(factory):
    client = Peer(factory, "10.0.0.9")
    server = Peer(factory, "10.0.0.5")
    assert client.send([4, "rk", "me", 1]) == []
    assert server.send([3, "rk", [9090, "rk:0.2"], "192.0.2.1"]) == [0]
    assert client.replies() == [[0, ["192.0.2.1", 9090, "rk:0.2"]]]


def test_each_reply_is_one_write(factory):
    client = Peer(factory, "10.0.0.9")
    writes = []
    client.transport.write = writes.append
    client.proto.dataReceived(encode_frame([1]))
    assert writes == [encode_frame(0)]


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("<i", -4),
        struct.pack("<i", 2 << 20),
        encode_frame([99]),
        encode_frame([4, "rk"]),
        struct.pack("<i", 3) + b"{{{",
    ],
)
def test_bad_input_closes_only_that_connection(factory, garbage):
    server = Peer(factory, "10.0.0.5")
    waiting = Peer(factory, "10.0.0.7")
    assert server.send([3, "rk", [9090, "rk:0.1"]]) == [0]
    assert waiting.send([4, "other", "", 1]) == []
    bad = Peer(factory, "10.0.0.66")
    bad.send([3, "rk", [1, "rk:bad"]])
    bad.proto.dataReceived(garbage)
    assert bad.closed
    assert factory.scheduler.pending_matchkeys(bad.proto) == []
    assert not server.closed
    assert not waiting.closed
    assert factory.scheduler.queue_info() == {
        "rk": {"free": 1, "pending": 0},
        "other": {"free": 0, "pending": 1},
    }
    assert server.send([1]) == [0]


def test_wrong_magic_closes(factory):
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    proto.dataReceived(encode_int32(0xFF271))
    assert transport.disconnecting
    assert transport.value() == b""


def test_closed_connections_leave_nothing_behind(factory):
    server = Peer(factory, "10.0.0.5")
    client = Peer(factory, "10.0.0.9")
    server.send([3, "rk", [9090, "rk:0.1"]], [3, "rk", [9090, "rk:0.2"]])
    client.send([4, "busy", "", 1])
    server.close()
    client.close()
    assert factory.scheduler.queue_info() == {
        "rk": {"free": 0, "pending": 0},
        "busy": {"free": 0, "pending": 0},
    }
    assert factory.summary()["server_info"] == []


def test_stop_needs_the_key():
    stopped = []
    factory = TrackerFactory(stop_key="s3cret", on_stop=lambda: stopped.append(True))
    peer = Peer(factory, "10.0.0.1")
    assert peer.send([2, "wrong"]) == [-1]
    assert not peer.closed
    assert peer.send([2, "s3cret"]) == [0]
    peer.close()
    assert stopped == [True]


def test_stop_refused_without_configured_key():
    factory = TrackerFactory()
    peer = Peer(factory, "10.0.0.1")
    assert peer.send([2, None]) == [-1]
    assert peer.send([2, ""]) == [-1]
