"""Parsing tracker requests into commands (pure)."""

from __future__ import annotations

import pytest

from tvmrpc.tracker.commands import (
    CommandError,
    GetPendingMatchkeys,
    Ping,
    Put,
    RefusedError,
    RequestResource,
    Stop,
    Summary,
    UpdateInfo,
    parse_command,
)


@pytest.mark.parametrize(
    ("frame", "command"),
    [
        ([1], Ping()),
        ([2, "secret"], Stop("secret")),
        ([3, "rk", [9090, "rk:0.1"]], Put("rk", 9090, "rk:0.1", None)),
        ([3, "rk", [9090, "rk:0.1"], None], Put("rk", 9090, "rk:0.1", None)),
        ([3, "rk", [9090, "rk:0.1"], "10.1.1.1"], Put("rk", 9090, "rk:0.1", "10.1.1.1")),
        ([4, "rk", "alice", 2], RequestResource("rk", "alice", 2)),
        ([4, "rk", "", 0.5], RequestResource("rk", "", 0.5)),
        (
            [5, {"key": "server:rk", "addr": [None, 9090]}],
            UpdateInfo({"key": "server:rk", "addr": [None, 9090]}),
        ),
        ([6], Summary()),
        ([7], GetPendingMatchkeys()),
    ],
)
def test_stock_shapes(frame, command):
    assert parse_command(frame) == command


@pytest.mark.parametrize(
    "frame",
    [
        [],
        {},
        "ping",
        [True],
        [99],
        [-1],
        [1, "extra"],
        [3, "rk"],
        [3, "rk", [9090]],
        [3, "rk", ["9090", "m"]],
        [3, "rk", [70000, "m"]],
        [3, 5, [1, "m"]],
        [3, "rk", [1, "m"], 7],
        [4, "rk", "u"],
        [4, "rk", "u", "high"],
        [5, "info"],
        [5, {"key": 3}],
        [5, {"addr": "h:1"}],
        [6, 1],
    ],
)
def test_bad_requests_raise(frame):
    with pytest.raises(CommandError):
        parse_command(frame)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ([3, "k" * 257, [1, "k:1"]], "PUT key is 257 characters long"),
        ([3, 5, [1, "m"]], "PUT key must be a string"),
        ([3, "rk", [1, "rk:" + "9" * 400]], "PUT matchkey is 403 characters long (at most 320)"),
        ([3, "rk", [1, "rk:1"], "10.0.0.1 evil"], "PUT custom address"),
        ([4, "rk\tx", "", 1], "REQUEST key 'rk\\tx' has whitespace"),
        ([4, ["rk"], "", 1], "REQUEST key must be a string, got list"),
        ([5, {"key": 3}], "UPDATE_INFO key must be a string"),
        ([5, {"addr": "h:1"}], "UPDATE_INFO addr must be [host or null, port]"),
        ([5, {"addr": [None, 70000]}], "port must be an integer in 0..65535"),
        ([5, {"tvmrpc": [1]}], "'tvmrpc' must be an object"),
    ],
)
def test_bad_keys_and_infos_are_refusals(frame, reason):
    with pytest.raises(RefusedError) as info:
        parse_command(frame)
    assert reason in str(info.value)


def test_update_info_keeps_only_what_the_tracker_uses():
    command = parse_command(
        [5, {"key": "server:rk", "addr": ["10.0.0.1", 9090], "junk": [[[[[]]]]], "tvmrpc": {}}]
    )
    assert command == UpdateInfo({"key": "server:rk", "addr": ["10.0.0.1", 9090], "tvmrpc": {}})


def test_errors_about_deep_or_huge_values_stay_short():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for frame in ([deep], [3, "rk", deep], [4, "rk", "u", deep], [5, deep]):
        with pytest.raises(CommandError) as info:
            parse_command(frame)
        assert len(str(info.value)) < 200
    command = parse_command([4, "rk", deep, 1])
    assert len(command.user) <= 80
    assert parse_command([4, "rk", "u" * 10_000, 1]).user == "u" * 256
