"""The tracker protocol over in-memory transports: replies, isolation of bad peers."""

from __future__ import annotations

import gc
import struct
import tracemalloc

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from tvmrpc.codec import TRACKER_MAGIC, FrameDecoder, encode_frame, encode_int32
from tvmrpc.tracker.protocol import (
    FRAMES_PER_TURN,
    MAX_WAITING_REQUESTS,
    Phase,
    PhaseError,
    TrackerFactory,
)

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
    return TrackerFactory(stop_key="s3cret", clock=Clock())


def test_put_request_summary_pending(factory):
    server = Peer(factory, "10.0.0.5")
    client = Peer(factory, "10.0.0.9")
    assert server.send([5, {"key": "server:rk", "addr": [None, 9090]}]) == [0]
    assert server.send([3, "rk", [9090, "rk:0.1"], None]) == [0]
    assert server.send([7]) == [["rk:0.1"]]
    assert client.send([6]) == [
        [
            0,
            {
                "queue_info": {"rk": {"free": 1, "pending": 0}},
                "server_info": [{"key": "server:rk", "addr": ["10.0.0.5", 9090]}],
            },
        ]
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
    # Stock keeps both keys forever; ours forgets a key nothing refers to any more.
    assert factory.scheduler.queue_info() == {}
    assert factory.scheduler.known_keys() == 0
    assert factory.summary()["server_info"] == []


def test_stop_needs_the_key():
    stopped = []
    factory = TrackerFactory(stop_key="s3cret", on_stop=lambda: stopped.append(True), clock=Clock())
    peer = Peer(factory, "10.0.0.1")
    assert peer.send([2, "wrong"]) == [-1]
    assert not peer.closed
    assert peer.send([2, "s3cret"]) == [0]
    peer.close()
    assert stopped == [True]


def test_stop_refused_without_configured_key():
    factory = TrackerFactory(clock=Clock())
    peer = Peer(factory, "10.0.0.1")
    assert peer.send([2, None]) == [-1]
    assert peer.send([2, ""]) == [-1]


# -- flow control, refusals, handshake timeout (issue 14) ----------------------


class BufferedTransport(StringTransport):
    """A transport that pauses its streaming producer as Twisted's TCP one does.

    Writes collect until :meth:`drain`; once more than ``bound`` bytes wait,
    the registered producer's ``pauseProducing`` is called, and ``drain``
    (the peer read everything) calls its ``resumeProducing``.
    """

    def __init__(self, bound: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bound = bound
        self.producer_paused = False
        self.writes = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        if (
            self.producer is not None
            and not self.producer_paused
            and (len(self.value()) > self.bound)
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def buffered_peer(factory: TrackerFactory, host: str, bound: int = 65536):
    transport = BufferedTransport(bound, peerAddress=IPv4Address("TCP", host, 40001))
    proto = factory.buildProtocol(transport.getPeer())
    proto.makeConnection(transport)
    proto.dataReceived(MAGIC)
    transport.drain()
    transport.writes = 0
    return proto, transport


@pytest.fixture
def clock_factory():
    return TrackerFactory(clock=Clock())


def register_keys(factory: TrackerFactory, count: int) -> Peer:
    server = Peer(factory, "10.0.0.5")
    frames = [[3, f"key{i:05d}-{'x' * 40}", [9000, f"key{i:05d}:1"]] for i in range(count)]
    for start in range(0, count, 100):
        server.send(*frames[start : start + 100])
    return server


def test_burst_of_summaries_stops_while_replies_back_up(clock_factory):
    """Case 1 in miniature: 9,000 SUMMARYs in one read; replies bounded, others served."""
    factory = clock_factory
    register_keys(factory, 2000)
    assert len(factory.summary_frame()) > 100_000
    burst, transport = buffered_peer(factory, "10.0.0.66")
    burst.dataReceived(encode_frame([6]) * 9000)
    # The first reply alone exceeds the bound: the tracker stops there.
    assert transport.writes == 1
    assert transport.producerState == "paused"  # not reading either
    other = Peer(factory, "10.0.0.9")
    assert other.send([1]) == [0]
    assert other.send([6])[0][0] == 0
    # Each time the peer takes its replies, one more is handled.
    transport.drain()
    assert transport.writes == 2
    # The peer hangs up: nothing it sent is handled any more, nothing is kept.
    transport.producer.stopProducing()
    burst.connectionLost(None)
    transport.drain()
    assert transport.writes == 2
    assert burst._decoder.buffered == 0
    factory.clock.advance(0)
    assert transport.writes == 2


def test_cheap_frames_are_handled_a_turn_at_a_time(clock_factory):
    factory = clock_factory
    burst, transport = buffered_peer(factory, "10.0.0.66")
    burst.dataReceived(encode_frame([1]) * 1000)
    assert transport.writes == FRAMES_PER_TURN
    assert transport.producerState == "paused"
    other = Peer(factory, "10.0.0.9")
    assert other.send([1]) == [0]  # served before the burst's next turn
    turns = []
    schedule = factory.clock.callLater
    factory.clock.callLater = lambda *a, **kw: turns.append(a[0]) or schedule(*a, **kw)
    factory.clock.advance(0)
    assert transport.writes == 1000
    assert len(turns) == 1000 // FRAMES_PER_TURN - 1  # one more turn per 128 frames
    assert transport.producerState == "producing"  # reading again once the backlog is done
    assert FrameDecoder().feed(transport.value()) == [0] * 1000


def test_summary_is_encoded_once_per_change_of_state(clock_factory):
    factory = clock_factory
    first = factory.summary_frame()
    assert factory.summary_frame() is first
    server = Peer(factory, "10.0.0.5")
    assert factory.summary_frame() is first  # a new connection changes nothing
    server.send([3, "rk", [9090, "rk:1"]])
    second = factory.summary_frame()
    assert second != first
    server.send([5, {"key": "server:rk", "addr": [None, 9090]}])
    third = factory.summary_frame()
    assert third != second
    assert b"server:rk" in third
    assert factory.summary_frame() is third
    server.close()
    assert factory.summary_frame() == first


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ([3, "k" * 300, [9090, "k:1"]], "PUT key is 300 characters long (at most 256)"),
        ([3, "rk", [9090, "rk 1"]], "PUT matchkey 'rk 1' has whitespace or control characters"),
        ([4, "bad\nkey", "", 1], "REQUEST key 'bad\\nkey' has whitespace or control characters"),
        ([4, "", "", 1], "REQUEST key is empty"),
        ([5, {"key": "server:" + "p" * 140_000}], "UPDATE_INFO key is 140007 characters long"),
        ([5, {"key": "server:rk", "tvmrpc": {"a": {"b": {"c": {"d": {}}}}}}], "nested more than 4"),
    ],
)
def test_bad_keys_and_infos_are_refused_and_the_connection_stays(clock_factory, frame, reason):
    factory = clock_factory
    peer = Peer(factory, "10.0.0.66")
    replies = peer.send(frame)
    assert replies[0][0] == -1
    assert reason in replies[0][1]
    assert not peer.closed
    assert peer.send([1]) == [0]
    assert factory.scheduler.queue_info() == {}
    assert peer.proto.info == {}


def test_nested_update_info_does_not_break_summary(clock_factory):
    """Case 7: stock stores any value and then fails every SUMMARY (RecursionError)."""
    factory = clock_factory
    nested = b'{"key": "server:evil", "addr": [null, 1], "extra": ' + b"[" * 800 + b"]" * 800
    peer = Peer(factory, "10.0.0.66")
    payload = nested + b"}"
    peer.proto.dataReceived(struct.pack("<i", len(payload) + 5) + b"[5, " + payload + b"]")
    assert peer.replies() == [0]
    assert peer.proto.info == {"key": "server:evil", "addr": ["10.0.0.66", 1]}
    other = Peer(factory, "10.0.0.9")
    assert other.send([6])[0][1]["server_info"] == [
        {"key": "server:evil", "addr": ["10.0.0.66", 1]}
    ]


def test_extension_field_is_stored_and_shown(clock_factory):
    factory = clock_factory
    server = Peer(factory, "10.0.0.5")
    outcome = {"sessions": {"ok": 3, "failed": 1}, "last": "ok"}
    assert server.send([5, {"key": "server:rk", "addr": [None, 9090], "tvmrpc": outcome}]) == [0]
    assert server.send([5, {"tvmrpc": {"sessions": {"ok": 4}}}]) == [0]
    info = Peer(factory, "10.0.0.9").send([6])[0][1]["server_info"]
    assert info == [
        {"key": "server:rk", "addr": ["10.0.0.5", 9090], "tvmrpc": {"sessions": {"ok": 4}}}
    ]


def test_silent_connection_closed_after_handshake_timeout():
    clock = Clock()
    factory = TrackerFactory(clock=clock, handshake_timeout=5)
    silent = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.66", 1))
    proto = factory.buildProtocol(silent.getPeer())
    proto.makeConnection(silent)
    proto.dataReceived(MAGIC[:2])  # half a magic is not a greeting
    greeted = Peer(factory, "10.0.0.9")
    clock.advance(4.9)
    assert not silent.disconnecting
    clock.advance(0.1)
    assert silent.disconnecting
    assert silent.producer is None  # unregistered, or the transport would never close
    assert proto not in factory.connections
    assert not greeted.closed
    assert greeted.send([1]) == [0]
    assert clock.getDelayedCalls() == []


def test_closing_unregisters_the_producer(clock_factory):
    peer = Peer(clock_factory, "10.0.0.66")
    assert peer.transport.producer is peer.proto
    peer.proto.dataReceived(encode_frame([99]))
    assert peer.closed
    assert peer.transport.producer is None


def test_memory_returns_when_keys_leave(clock_factory):
    """Case 3 in-process: what 20,000 keys took is freed when their connection closes.

    (The daemon's RSS keeps part of it in the allocator for reuse; the
    integration test prints that figure.)
    """
    factory = clock_factory
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peer = register_keys(factory, 20_000)
        assert len(factory.scheduler.queue_info()) == 20_000
        loaded = tracemalloc.get_traced_memory()[0]
        peer.close()
        del peer
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    mib = 1 << 20
    print(
        f"\n20000 keys: traced memory +{(loaded - baseline) / mib:.1f} MiB loaded, "
        f"+{(after - baseline) / mib:.2f} MiB after their connection closed"
    )
    assert factory.scheduler.known_keys() == 0
    assert after - baseline < (loaded - baseline) / 20


def test_waiting_requests_per_connection_are_bounded(clock_factory):
    factory = clock_factory
    greedy = Peer(factory, "10.0.0.66")
    greedy.proto.dataReceived(encode_frame([4, "rk", "", 1]) * (MAX_WAITING_REQUESTS + 2))
    factory.clock.advance(0)
    replies = greedy.replies()
    assert len(replies) == 2
    assert replies[0][0] == -1
    assert f"already has {MAX_WAITING_REQUESTS} requests waiting" in replies[0][1]
    assert factory.scheduler.queue_info() == {"rk": {"free": 0, "pending": MAX_WAITING_REQUESTS}}
    other = Peer(factory, "10.0.0.9")
    assert other.send([4, "rk", "", 9]) == []  # other connections are not limited by it
    server = Peer(factory, "10.0.0.5")
    assert server.send([3, "rk", [9090, "rk:1"]]) == [0]
    assert other.replies() == [[0, ["10.0.0.5", 9090, "rk:1"]]]
    greedy.close()
    assert factory.scheduler.queue_info() == {"rk": {"free": 0, "pending": 0}}


def test_refusals_are_logged_once_a_minute_per_connection(clock_factory):
    factory = clock_factory
    peer = Peer(factory, "10.0.0.66")
    bad = [4, "bad key", "", 1]
    with capturedLogs() as events:
        for _ in range(3):
            assert peer.send(bad)[0][0] == -1
        factory.clock.advance(60)
        assert peer.send(bad)[0][0] == -1
        assert Peer(factory, "10.0.0.67").send(bad)[0][0] == -1  # its own first report
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "tvmrpc.tracker.protocol"]
    assert lines == [
        "refused a request from 10.0.0.66: REQUEST key 'bad key' has whitespace or control "
        "characters",
        "refused a request from 10.0.0.66: REQUEST key 'bad key' has whitespace or control "
        "characters (2 more refused from this connection since the last report)",
        "refused a request from 10.0.0.67: REQUEST key 'bad key' has whitespace or control "
        "characters",
    ]


def test_extended_summary_is_fresh_and_plain_one_cached(clock_factory):
    factory = clock_factory
    server = Peer(factory, "10.0.0.5")
    server.send([3, "rk", [9090, "rk:1"]])
    client = Peer(factory, "10.0.0.9")
    plain = client.send([6])[0][1]
    assert "tvmrpc" not in plain
    extended = client.send([6, {"tvmrpc": 1}])[0][1]
    assert extended["tvmrpc"] == {"expected_wait_seconds": {"rk": 0.0}}
    assert extended["queue_info"] == plain["queue_info"]
    frame = factory.summary_frame()
    client.send([6, {"tvmrpc": 1}])
    assert factory.summary_frame() is frame


def test_a_key_that_leaves_takes_its_wait_statistics(clock_factory):
    factory = clock_factory
    server = Peer(factory, "10.0.0.5")
    client = Peer(factory, "10.0.0.9")
    server.send([3, "rk", [9090, "rk:1"]])
    assert client.send([4, "rk", "", 1]) == [[0, ["10.0.0.5", 9090, "rk:1"]]]
    factory.clock.advance(2)
    server.send([3, "rk", [9090, "rk:2"]])  # the board is free again: a 2 s hold
    assert factory.waits.mean_hold("rk") == 2
    server.close()
    assert factory.scheduler.queue_info() == {}
    assert factory.waits.mean_hold("rk") is None


def test_summary_frame_is_the_json_of_the_summary_as_state_changes(clock_factory):
    """The frame joined from its cached parts decodes to, and equals, encoding the whole."""
    factory = clock_factory
    boards = [Peer(factory, f"10.0.1.{i}") for i in range(3)]
    for i, board in enumerate(boards):
        board.send([5, {"key": "server:rk", "addr": [None, 9090 + i]}])
        board.send([3, "rk", [9090 + i, f"rk:{i}"]])
        expected = encode_frame([0, factory.summary()])
        assert factory.summary_frame() == expected
    client = Peer(factory, "10.0.2.1")
    client.send([4, "rk", "me", 1])  # an assignment: queue counts change, infos do not
    assert factory.summary_frame() == encode_frame([0, factory.summary()])
    boards[1].close()  # rk:0 went to the client; rk:1 leaves with its board
    frame = factory.summary_frame()
    assert frame == encode_frame([0, factory.summary()])
    summary = FrameDecoder().feed(frame)[0][1]
    assert summary["queue_info"]["rk"]["free"] == 1
    assert [s["addr"][1] for s in summary["server_info"]] == [9090, 9092]


def test_connections_still_greeting_share_one_timer():
    clock = Clock()
    factory = TrackerFactory(clock=clock, handshake_timeout=5)
    silent = []
    for i in range(20):  # one every 0.25 s: deadlines at 5, 5.25, ..., 9.75
        if i:
            clock.advance(0.25)
        transport = StringTransport(peerAddress=IPv4Address("TCP", f"10.0.3.{i}", 1))
        proto = factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        silent.append(transport)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(7.25 - clock.seconds())
    assert [t.disconnecting for t in silent] == [True] * 10 + [False] * 10
    clock.advance(2.5)
    assert all(t.disconnecting for t in silent)
    assert factory.connections == {}
    assert clock.getDelayedCalls() == []


def test_phases_only_change_as_the_table_says(clock_factory):
    peer = Peer(clock_factory, "10.0.0.1")
    assert peer.proto.phase is Phase.SERVING
    with pytest.raises(PhaseError, match="cannot go from SERVING to GREETING"):
        peer.proto._enter(Phase.GREETING)
    peer.close()
    assert peer.proto.phase is Phase.CLOSED
    with pytest.raises(PhaseError, match="cannot go from CLOSED to SERVING"):
        peer.proto._enter(Phase.SERVING)
    peer.proto.dataReceived(encode_frame([1]))  # a late read after the close is ignored
    assert peer.replies() == []


def test_an_accepted_stop_stops_the_tracker_once_the_connection_is_gone():
    stopped = []
    factory = TrackerFactory(stop_key="k", on_stop=lambda: stopped.append(True), clock=Clock())
    peer = Peer(factory, "10.0.0.1")
    assert peer.send([2, "k"], [1]) == [0]  # the PING after STOP is not handled
    assert peer.proto.phase is Phase.STOPPING
    assert peer.closed
    assert stopped == []
    peer.proto.stopProducing()  # the transport going away reports both
    peer.close()
    assert stopped == [True]
