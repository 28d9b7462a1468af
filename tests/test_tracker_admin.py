"""The tracker's admin API and the ``tvmrpc drain``/``resume`` CLI, over real HTTP.

The API runs in this test's reactor on a loopback port; the CLI runs as a
subprocess, exactly as an operator runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import resource, server

from tests.support import free_port, subprocess_env
from tvmrpc.tracker.admin import AdminResource, AdminTokenError, parse_target, read_token
from tvmrpc.tracker.boards import BoardRules, BoardState

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def api():
    rules = BoardRules()
    changes = []
    root = resource.Resource()
    v1 = resource.Resource()
    api_root = resource.Resource()
    root.putChild(b"api", api_root)
    api_root.putChild(b"v1", v1)
    v1.putChild(b"admin", AdminResource(rules, TOKEN, lambda: changes.append(1)))
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    yield rules, changes, f"http://127.0.0.1:{port.getHost().port}"
    port.stopListening()


async def tvmrpc(*args: str) -> tuple[int, str, str]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "tvmrpc.cli", *args], env=subprocess_env()
    )
    return code, out.decode(), err.decode()


@pytest_twisted.ensureDeferred
async def test_drain_and_resume_a_board_and_a_key(api, token_file):
    rules, changes, url = api
    code, out, err = await tvmrpc(
        "drain", "--tracker-status", url, "--token-file", str(token_file), "10.0.0.7:9090"
    )
    assert (code, err) == (0, "")
    assert out.startswith("drain: board 10.0.0.7:9090 gets no new sessions")
    assert rules.state("rk", "10.0.0.7:9090") is BoardState.DRAINED
    code, out, _ = await tvmrpc(
        "drain", "--tracker-status", url, "--token-file", str(token_file), "--key", "jetson"
    )
    assert code == 0
    assert rules.state("jetson", "10.0.0.8:9090") is BoardState.DRAINED
    for target in (["10.0.0.7:9090"], ["--key", "jetson"]):
        code, _, _ = await tvmrpc(
            "resume", "--tracker-status", url, "--token-file", str(token_file), *target
        )
        assert code == 0
    assert rules.available("rk", "10.0.0.7:9090")
    assert rules.available("jetson", "10.0.0.8:9090")
    assert len(changes) == 4


@pytest_twisted.ensureDeferred
async def test_wrong_token_changes_nothing(api, tmp_path):
    rules, changes, url = api
    wrong = tmp_path / "wrong"
    wrong.write_text("f" * 32)
    code, out, err = await tvmrpc(
        "drain", "--tracker-status", url, "--token-file", str(wrong), "10.0.0.7:9090"
    )
    assert code == 1
    assert out == ""
    assert err.strip() == "tvmrpc drain: the tracker refused (401): bad or missing bearer token"
    assert rules.available("rk", "10.0.0.7:9090")
    assert changes == []


@pytest_twisted.ensureDeferred
async def test_unreachable_and_missing_api_say_what_to_do(token_file):
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = await tvmrpc(
        "drain", "--tracker-status", dead, "--token-file", str(token_file), "h:1"
    )
    assert code == 1
    assert err.startswith(f"tvmrpc drain: cannot reach {dead}/api/v1/admin/drain")
    assert len(err.strip().splitlines()) == 1
    port = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        code, _, err = await tvmrpc(
            "drain", "--tracker-status", url, "--token-file", str(token_file), "h:1"
        )
    finally:
        await port.stopListening()
    assert code == 1
    assert "start the tracker with --status and --admin-token-file" in err


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2(token_file):
    code, _, err = await tvmrpc(
        "drain", "--tracker-status", "http://x", "--token-file", str(token_file)
    )
    assert code == 2
    assert "name one BOARD (addr:port) or --key KEY" in err


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "must be"),
        (b"[1]", "must be"),
        (b'{"board": "a:1", "key": "k"}', "must be"),
        (b'{"board": "nocolon"}', "addr:port"),
        (b'{"key": "has space"}', "whitespace"),
        (b"{not json", "not JSON"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(body, reason):
    with pytest.raises(ValueError, match=reason):
        parse_target(body)


def test_token_file_must_hold_a_real_token(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(AdminTokenError, match="openssl rand -hex 32"):
        read_token(short)
    with pytest.raises(AdminTokenError, match="cannot read"):
        read_token(tmp_path / "absent")
