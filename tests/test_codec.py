"""The codec: round trips and robustness against arbitrary bytes (hypothesis)."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvmrpc.codec import (
    MAX_FRAME_BYTES,
    MAX_REPLY_FRAME_BYTES,
    NO_FRAME,
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_MAGIC,
    CodecError,
    FrameDecoder,
    HandshakeDecoder,
    ReplyDecoder,
    encode_frame,
    encode_handshake,
    encode_reply,
    exception_packet,
    parse_key,
    proxy_matchkey,
    random_matchkey,
    split_matchkey,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (sorted, clipped)."""
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


@given(st.lists(json_values, min_size=1, max_size=5), st.lists(st.integers(0, 400)))
def test_frames_round_trip_however_the_stream_is_cut(values, cuts):
    stream = b"".join(encode_frame(v) for v in values)
    decoder = FrameDecoder()
    decoded = []
    for piece in chunked(stream, cuts):
        decoded += decoder.feed(piece)
    assert decoded == values
    assert decoder.buffered == 0


@given(st.binary(max_size=300), st.lists(st.integers(0, 300)))
def test_arbitrary_bytes_give_frames_or_codec_error(data, cuts):
    decoder = FrameDecoder(max_frame_bytes=1024)
    try:
        for piece in chunked(data, cuts):
            for value in decoder.feed(piece):
                json.dumps(value)  # only JSON values come out
    except CodecError:
        pass


def test_frame_is_one_bytes_object_with_le_length():
    frame = encode_frame([6])
    assert frame == struct.pack("<i", 3) + b"[6]"


@pytest.mark.parametrize("length", [0, -1, -(2**31), MAX_FRAME_BYTES + 1])
def test_bad_frame_lengths_are_rejected(length):
    with pytest.raises(CodecError, match="frame length"):
        FrameDecoder().feed(struct.pack("<i", length))


def test_configurable_frame_limit_and_bad_json():
    with pytest.raises(CodecError):
        FrameDecoder(max_frame_bytes=8).feed(encode_frame("x" * 20))
    with pytest.raises(CodecError, match="JSON"):
        FrameDecoder().feed(struct.pack("<i", 3) + b"\xff\xfe[")


@given(
    st.sampled_from(["client", "server"]),
    st.text(st.characters(blacklist_categories=["Zs", "Cc", "Cs"]), min_size=1, max_size=40),
    st.lists(st.from_regex(r"-[a-z]+=[0-9]{1,4}", fullmatch=True), max_size=3),
    st.lists(st.integers(0, 100)),
)
def test_handshake_round_trip(role, matchkey, options, cuts):
    key = " ".join([f"{role}:{matchkey}", *options])
    decoder = HandshakeDecoder()
    result = None
    for piece in chunked(encode_handshake(key) + b"tail", cuts):
        if result is None:
            result = decoder.feed(piece)
            if result is not None:
                result = (result[0], result[1] + b"")
        else:
            result = (result[0], result[1] + piece)
    assert result == (key, b"tail")
    parsed = parse_key(key)
    assert (parsed.role, parsed.matchkey, parsed.options, parsed.raw) == (
        role,
        matchkey,
        tuple(options),
        key,
    )


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_handshake_decoders(data):
    for decoder in (HandshakeDecoder(), ReplyDecoder()):
        with contextlib.suppress(CodecError):
            decoder.feed(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("<i", 0x2F271), "magic"),
        (struct.pack("<ii", RPC_MAGIC, -5), "length"),
        (struct.pack("<ii", RPC_MAGIC, 1 << 30), "length"),
        (struct.pack("<ii", RPC_MAGIC, 2) + b"\xc3\x28", "UTF-8"),
    ],
)
def test_bad_handshakes(data, message):
    with pytest.raises(CodecError, match=message):
        HandshakeDecoder().feed(data)


def test_reply_codes():
    assert ReplyDecoder().feed(encode_reply(RPC_CODE_SUCCESS, "server:k")) == (
        RPC_CODE_SUCCESS,
        "server:k",
        b"",
    )
    for code in (RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH):
        assert ReplyDecoder().feed(encode_reply(code) + b"x") == (code, None, b"x")
    with pytest.raises(CodecError):
        ReplyDecoder().feed(struct.pack("<i", 12345))


def test_key_grammar_and_timeout():
    key = parse_key("client:rasp:0.25 -timeout=30 -other=1")
    assert key.role == "client"
    assert key.matchkey == "rasp:0.25"
    assert key.timeout == 30.0
    assert parse_key("server:rasp").timeout is None
    assert parse_key("client:x -timeout=0").timeout is None
    with pytest.raises(CodecError):
        parse_key("client:x -timeout=abc").timeout  # noqa: B018 - the property raises
    for bad in ("rasp", "peer:rasp", ""):
        with pytest.raises(CodecError):
            parse_key(bad)


def test_matchkeys():
    matchkey = random_matchkey("rk3399")
    assert split_matchkey(matchkey) == "rk3399"
    assert split_matchkey("a:b:0.5") == "a:b"
    assert random_matchkey("k", {matchkey}) != matchkey
    assert proxy_matchkey("client:rk3399 -timeout=10") == "rk3399"
    assert proxy_matchkey("server:rk3399") == "rk3399"


@pytest.mark.parametrize("type_index", [8, 11])
def test_exception_packet_layout(type_index):
    packet = exception_packet("RPCSessionTimeoutError: late", type_index)
    (length,) = struct.unpack_from("<Q", packet)
    assert length == len(packet) - 8
    code, nargs, tindex, slen = struct.unpack_from("<iiiQ", packet, 8)
    assert (code, nargs, tindex) == (5, 1, type_index)
    assert packet[8 + 20 :].decode() == "RPCSessionTimeoutError: late"
    assert slen == len("RPCSessionTimeoutError: late")


@given(st.lists(json_values, min_size=1, max_size=5), st.lists(st.integers(0, 400)))
def test_pop_yields_the_same_frames_one_at_a_time(values, cuts):
    stream = b"".join(encode_frame(v) for v in values)
    decoder = FrameDecoder()
    decoded = []
    for piece in chunked(stream, cuts):
        decoder.append(piece)
        while (value := decoder.pop()) is not NO_FRAME:
            decoded.append(value)
    assert decoded == values
    assert decoder.buffered == 0


def test_pop_decodes_nothing_it_was_not_asked_for():
    decoder = FrameDecoder()
    decoder.append(encode_frame([1]) + struct.pack("<i", 3) + b"{{{")
    assert decoder.pop() == [1]  # the bad frame behind it is not touched yet
    assert decoder.buffered == 7
    with pytest.raises(CodecError, match="JSON"):
        decoder.pop()


def test_null_is_a_frame_not_the_end():
    decoder = FrameDecoder()
    decoder.append(encode_frame(None))
    assert decoder.pop() is None
    assert decoder.pop() is NO_FRAME


def test_clear_drops_the_backlog():
    decoder = FrameDecoder()
    decoder.append(encode_frame([6]) * 1000)
    decoder.pop()
    decoder.clear()
    assert decoder.buffered == 0
    assert decoder.pop() is NO_FRAME


def test_reply_bound_reads_what_a_request_bound_refuses():
    big = encode_frame({"queue_info": {f"k{i}": {"free": 1, "pending": 0} for i in range(50_000)}})
    assert len(big) > MAX_FRAME_BYTES
    with pytest.raises(CodecError, match="frame length"):
        FrameDecoder().feed(big)
    assert len(FrameDecoder(MAX_REPLY_FRAME_BYTES).feed(big)[0]["queue_info"]) == 50_000
    with pytest.raises(CodecError, match=f"outside 1..{MAX_REPLY_FRAME_BYTES} bytes"):
        FrameDecoder(MAX_REPLY_FRAME_BYTES).feed(struct.pack("<i", MAX_REPLY_FRAME_BYTES + 1))
