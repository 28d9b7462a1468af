"""The tracker client pipelines calls, but never past a REQUEST (tvmrpc/client.py).

Driven on a string transport: the bytes on the wire are what a tracker sees.
"""

from __future__ import annotations

import json
import struct

import pytest
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tvmrpc.client import TrackerClientProtocol, TrackerError
from tvmrpc.codec import TRACKER_MAGIC, TrackerCode, encode_frame, encode_int32


def frames(data: bytes) -> list:
    """The JSON frames in ``data`` (int32 length, then JSON)."""
    out = []
    while data:
        (length,) = struct.unpack_from("<i", data)
        out.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


def connected() -> tuple[TrackerClientProtocol, StringTransport]:
    proto = TrackerClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == encode_int32(TRACKER_MAGIC)
    transport.clear()
    proto.dataReceived(encode_int32(TRACKER_MAGIC))
    return proto, transport


def test_update_info_and_put_leave_together_and_replies_match_in_order():
    proto, transport = connected()
    results: list[object] = []
    info = proto.update_info({"key": "server:k", "addr": [None, 9000]})
    put = proto.put("k", 9000, "k:1")
    info.addBoth(lambda r: results.append(("info", r)))
    put.addBoth(lambda r: results.append(("put", r)))
    assert frames(transport.value()) == [
        [TrackerCode.UPDATE_INFO, {"key": "server:k", "addr": [None, 9000]}],
        [TrackerCode.PUT, "k", [9000, "k:1"], None],
    ]  # both on the wire before either is answered: one round trip
    proto.dataReceived(encode_frame(TrackerCode.SUCCESS) + encode_frame(TrackerCode.SUCCESS))
    assert results == [("info", None), ("put", None)]


def test_a_refused_call_fails_only_its_own_deferred():
    proto, _transport = connected()
    first, second = proto.put("k", 1, "k:1"), proto.ping()
    errors: list[Failure] = []
    first.addErrback(errors.append)
    proto.dataReceived(encode_frame(TrackerCode.FAIL) + encode_frame(TrackerCode.SUCCESS))
    assert len(errors) == 1
    assert errors[0].check(TrackerError)
    assert second.called
    assert second.result is None


def test_a_request_waits_for_calls_in_flight_and_holds_back_later_ones():
    proto, transport = connected()
    ping = proto.ping()
    request = proto.request("k")
    summary = proto.summary()
    assert frames(transport.value()) == [[TrackerCode.PING]]  # the REQUEST waits
    transport.clear()
    proto.dataReceived(encode_frame(TrackerCode.SUCCESS))
    assert ping.called
    assert frames(transport.value()) == [[TrackerCode.REQUEST, "k", "", 1]]  # alone
    transport.clear()
    assert not summary.called
    assert transport.value() == b""  # nothing after a REQUEST until its reply
    proto.dataReceived(encode_frame([TrackerCode.SUCCESS, ["127.0.0.1", 9000, "k:1"]]))
    assert request.result == ["127.0.0.1", 9000, "k:1"]
    assert frames(transport.value()) == [[TrackerCode.SUMMARY]]
    proto.dataReceived(encode_frame([TrackerCode.SUCCESS, {"queue_info": {}}]))
    assert summary.result == {"queue_info": {}}


def test_calls_queued_before_the_magic_is_answered_leave_together_after_it():
    proto = TrackerClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()
    proto.ping()
    proto.ping()
    assert transport.value() == b""
    proto.dataReceived(encode_int32(TRACKER_MAGIC))
    assert frames(transport.value()) == [[TrackerCode.PING], [TrackerCode.PING]]


def test_an_unsolicited_reply_drops_the_connection():
    proto, transport = connected()
    proto.dataReceived(encode_frame(TrackerCode.SUCCESS))
    assert transport.disconnecting or getattr(transport, "disconnected", False)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_a_lost_connection_fails_every_call_sent_or_queued(in_flight):
    proto, _transport = connected()
    calls = [proto.ping() for _ in range(in_flight)]
    calls += [proto.request("k"), proto.ping()]
    errors: list[Failure] = []
    for d in calls:
        d.addErrback(errors.append)
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert len(errors) == len(calls)
    late = proto.ping()
    late.addErrback(errors.append)
    assert len(errors) == len(calls) + 1


def test_cancelling_a_queued_call_sends_nothing_for_it():
    proto, transport = connected()
    request = proto.request("k")
    queued = proto.ping()
    queued.addErrback(lambda f: None)
    transport.clear()
    queued.cancel()
    proto.dataReceived(encode_frame([TrackerCode.SUCCESS, ["h", 1, "k:1"]]))
    assert request.called
    assert transport.value() == b""
