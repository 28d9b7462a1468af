"""Parsing tracker requests into commands (pure)."""

from __future__ import annotations

import pytest

from tvmrpc.tracker.commands import (
    CommandError,
    GetPendingMatchkeys,
    Ping,
    Put,
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
        ([5, {"key": "server:rk", "addr": [None, 9090]}],
         UpdateInfo({"key": "server:rk", "addr": [None, 9090]})),
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
