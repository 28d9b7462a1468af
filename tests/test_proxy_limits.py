"""The proxy's bounds (issue 14 cases 2 and 8) with plain calls, string transports, a fake clock.

The pure budgets first, then the switchboard and TCP legs applying them.
"""

from __future__ import annotations

import json
import struct

import pytest
from twisted.internet.task import Clock

from tests.proxy_support import Wire
from tvmrpc.codec import (
    MAX_FRAME_BYTES,
    MAX_KEY_CHARS,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    encode_frame,
    encode_handshake,
)
from tvmrpc.proxy.limits import (
    MAX_SERVER_KEYS,
    Admission,
    DeviceKeys,
    EarlyBudget,
)
from tvmrpc.proxy.pairing import SERVER
from tvmrpc.proxy.protocol import ProxyFactory
from tvmrpc.proxy.switchboard import Switchboard

# -- EarlyBudget ---------------------------------------------------------------


def test_early_budget_bounds_each_leg():
    budget = EarlyBudget(per_leg=100, total=1000)
    assert budget.take("a", 60) is None
    problem = budget.take("a", 41)
    assert problem is not None
    assert "--max-early-bytes" in problem
    assert "101 bytes" in problem
    assert budget.held("a") == 60  # a refused take changes nothing
    assert budget.take("a", 40) is None
    assert budget.held_total == 100


def test_early_budget_bounds_the_total_and_refuses_the_newest_offender():
    budget = EarlyBudget(per_leg=100, total=250)
    assert budget.take("a", 100) is None
    assert budget.take("b", 100) is None
    problem = budget.take("c", 51)
    assert problem is not None
    assert "--max-early-total" in problem
    assert budget.held("c") == 0
    assert budget.take("c", 50) is None
    assert budget.held_total == 250
    # releasing one leg makes room for others, and is idempotent
    assert budget.release("a") == 100
    assert budget.release("a") == 0
    assert budget.take("d", 100) is None
    assert budget.held_total == 250


def test_early_budget_of_many_legs_never_exceeds_its_bounds():
    """300 legs each trying to hold 1 MiB (case 8) hold at most ``total`` together."""
    budget = EarlyBudget(per_leg=64 << 10, total=4 << 20)
    for leg in range(300):
        for _ in range(16):
            budget.take(leg, 64 << 10)  # 1 MiB in 64 KiB reads
        assert budget.held(leg) <= 64 << 10
    assert budget.held_total <= 4 << 20
    assert budget.held_total == sum(budget.held(leg) for leg in range(300))


# -- DeviceKeys ----------------------------------------------------------------


def test_device_keys_counted_per_leg_and_shrink_when_last_leaves():
    keys = DeviceKeys(limit=2)
    assert keys.admit("s1", "a") is Admission.NEW
    assert keys.admit("s2", "a") is Admission.KNOWN
    assert keys.admit("s3", "b") is Admission.NEW
    assert keys.keys() == {"a", "b"}
    assert keys.release("s1") is None  # s2 still holds "a"
    assert keys.release("s2") == "a"
    assert keys.keys() == {"b"}
    assert keys.release("s2") is None  # idempotent
    assert keys.release("never") is None


def test_device_keys_refuse_new_keys_beyond_the_limit_but_not_known_ones():
    keys = DeviceKeys(limit=2)
    keys.admit("s1", "a")
    keys.admit("s2", "b")
    assert keys.admit("s3", "c") is Admission.FULL
    assert keys.admit("s4", "a") is Admission.KNOWN
    assert keys.keys() == {"a", "b"}
    assert keys.release("s3") is None  # never admitted: nothing to release
    keys.release("s2")
    assert keys.admit("s3", "c") is Admission.NEW
    with pytest.raises(ValueError, match="already admitted"):
        keys.admit("s3", "d")


def test_max_server_keys_keeps_the_worst_update_info_under_the_frame_limit():
    worst_key = "\U0001f600" * MAX_KEY_CHARS  # 12 JSON bytes per character
    keys = ",".join(f"{worst_key[:-4]}{i:04d}" for i in range(MAX_SERVER_KEYS))
    frame = encode_frame([5, {"key": f"server:proxy[{keys}]", "addr": [None, 65535]}])
    assert len(frame) - 4 <= MAX_FRAME_BYTES
    assert len(json.dumps([5, {"key": worst_key}])) > 12 * MAX_KEY_CHARS


# -- the switchboard and TCP legs applying them ---------------------------------


def reply(code: int, key: str | None = None) -> bytes:
    if key is None:
        return struct.pack("<i", code)
    return struct.pack("<ii", code, len(key)) + key.encode()


def factory(**kwargs) -> ProxyFactory:
    return ProxyFactory(Switchboard(Clock(), **kwargs), handshake_timeout=5)


@pytest.mark.parametrize(
    "key",
    [
        "server:" + "k" * (MAX_KEY_CHARS + 1),
        "client:" + "k" * (MAX_KEY_CHARS + 1),
        "server:",
        "server:a\tb",
        "client:bell\x07",
    ],
)
def test_bad_keys_are_refused_with_no_match_and_never_wait(key):
    f = factory()
    leg = Wire(f)
    leg.send(encode_handshake(key))
    assert leg.take() == reply(RPC_CODE_MISMATCH)
    assert leg.closed
    assert len(f.switchboard.table) == 0


def test_long_key_refused_in_tracker_mode_when_the_random_suffix_would_not_fit():
    f = factory(tracker_mode=True)
    fits, too_long = Wire(f), Wire(f)
    fits.send(encode_handshake("server:" + "k" * (MAX_KEY_CHARS - 30)))
    too_long.send(encode_handshake("server:" + "k" * MAX_KEY_CHARS))
    assert fits.take() == b""
    assert not fits.closed
    assert too_long.take() == reply(RPC_CODE_MISMATCH)
    assert f.switchboard.device_keys.keys() == {"k" * (MAX_KEY_CHARS - 30)}


def test_tracker_mode_bounds_device_keys_and_they_shrink_as_servers_leave():
    from tvmrpc.proxy.limits import DeviceKeys

    f = factory(tracker_mode=True, device_keys=DeviceKeys(limit=3))
    board = f.switchboard
    real = Wire(f)
    real.send(encode_handshake("server:board"))
    junk = []
    for i in range(10):
        leg = Wire(f)
        leg.send(encode_handshake(f"server:junk{i}"))
        junk.append(leg)
    assert board.device_keys.keys() == {"board", "junk0", "junk1"}
    assert [leg.closed for leg in junk] == [False, False] + [True] * 8
    assert all(leg.take() == reply(RPC_CODE_MISMATCH) for leg in junk[2:])
    # a second server of a known key is still welcome
    again = Wire(f)
    again.send(encode_handshake("server:junk0"))
    assert not again.closed
    for leg in junk:
        leg.lose()
    assert board.device_keys.keys() == {"board", "junk0"}
    again.lose()
    assert board.device_keys.keys() == {"board"}
    # the real board pairs and stays counted through its session, until it closes
    (matchkey,) = board.table.waiting(SERVER)
    client = Wire(f)
    client.send(encode_handshake(f"client:{matchkey}"))
    assert client.take() == reply(RPC_CODE_SUCCESS, "server:board")
    assert board.device_keys.keys() == {"board"}
    real.lose()
    assert board.device_keys.keys() == frozenset()


def test_early_bytes_bounded_per_connection():
    f = factory(early=EarlyBudget(per_leg=1000, total=10_000))
    ok, greedy = Wire(f), Wire(f)
    ok.send(encode_handshake("server:ok") + b"x" * 1000)
    greedy.send(encode_handshake("server:greedy") + b"x" * 600)
    assert not greedy.closed
    greedy.send(b"y" * 401)
    assert greedy.closed
    assert not ok.closed
    greedy.lose()
    assert f.switchboard.early.held_total == 1000
    # the early bytes reach the peer once paired, and are released then
    client = Wire(f)
    client.send(encode_handshake("client:ok"))
    assert client.take() == reply(RPC_CODE_SUCCESS, "server:ok") + b"x" * 1000
    assert f.switchboard.early.held_total == 0


def test_early_bytes_bounded_in_total_newest_offender_closed():
    f = factory(early=EarlyBudget(per_leg=1000, total=2500))
    legs = [Wire(f) for _ in range(4)]
    for i, leg in enumerate(legs):
        leg.send(encode_handshake(f"server:w{i}") + b"z" * 1000)
    assert [leg.closed for leg in legs] == [False, False, True, True]
    assert f.switchboard.early.held_total == 2000
    legs[0].lose()
    late = Wire(f)
    late.send(encode_handshake("server:late") + b"z" * 1000)
    assert not late.closed
    assert f.switchboard.early.held_total == 2000
