"""Board registration with ``--board-secret-file`` at the tracker: a rogue PUT without the
secret cannot divert a stock client, a replayed proof is refused, stock servers register only
from ``--allow-board-from`` networks, our proxy holding the secret registers its boards, and a
stock tracker fails our proof with one clear line."""

from __future__ import annotations

import gc
import json
import struct

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.proxy_support import start_proxied_server, start_proxy
from tests.status_support import STATUS_FLAG, metrics, status_port, value
from tests.support import (
    running,
    start_stock_server,
    start_stock_tracker,
    start_tracker,
    stock_tracker_socket,
)
from tests.tls_support import SECRET
from tvmrpc import boardauth

pytestmark = pytest.mark.stock


def call(sock, value):
    """One tracker request/reply on a raw stock-style socket."""
    frame = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(frame)) + frame)
    return base.recvjson(sock)


def test_proofs_bind_nonce_label_and_key():
    secret = SECRET.encode()
    good = boardauth.proof(secret, "tracker", "n1", "rasp")
    assert boardauth.verify(secret, "tracker", "n1", "rasp", good)
    assert not boardauth.verify(secret, "tracker", "n2", "rasp", good)  # another connection
    assert not boardauth.verify(secret, "proxy", "n1", "rasp", good)  # another daemon kind
    assert not boardauth.verify(secret, "tracker", "n1", "other", good)  # another key
    assert not boardauth.verify(b"x" * 16, "tracker", "n1", "rasp", good)
    assert not boardauth.verify(secret, "tracker", None, "rasp", good)  # no challenge asked
    assert not boardauth.verify(secret, "tracker", "n1", "rasp", [good])
    assert SECRET not in good


def test_short_secret_file_is_one_line(tmp_path):
    path = tmp_path / "short"
    path.write_text("abc\n")
    with pytest.raises(boardauth.BoardSecretError, match="at least 16 characters"):
        boardauth.read_secret(str(path))


def test_rogue_put_cannot_divert_a_client(log_dir, secret_file):
    """Our proxy holds the secret and registers a stock board (next to it: admitted by
    --allow-board-from); a rogue PUT of the same key from a peer without the secret is
    refused and never queued: the stock client reaches the board."""
    with running(
        start_tracker(log_dir, "--board-secret-file", str(secret_file), *STATUS_FLAG)
    ) as tracker:
        sport = status_port(tracker)
        proxy = start_proxy(
            log_dir,
            "--tracker",
            f"127.0.0.1:{tracker.port}",
            "--board-secret-file",
            str(secret_file),
            "--allow-board-from",
            "127.0.0.1/32",
        )
        with running(proxy), running(start_proxied_server(log_dir, proxy, "lab")):
            proxy.wait_for(r"put lab:\S+ at the tracker")
            rogue = stock_tracker_socket(tracker.port, source="127.0.0.2")
            try:
                reply = call(rogue, [base.TrackerCode.PUT, "lab", [1, "lab:evil"], "10.9.9.9"])
                assert reply[0] == base.TrackerCode.FAIL
                assert "needs the board secret" in reply[1]
                tracker.wait_for(
                    r"#warn\] refused a request from 127\.0\.0\.2: PUT lab: board registration "
                    r"needs the board secret"
                )
                reply = call(rogue, [base.TrackerCode.UPDATE_INFO, {"key": "server:lab"}])
                assert reply[0] == base.TrackerCode.FAIL
                summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
                assert summary["queue_info"]["lab"]["free"] == 1  # the proxy's PUT only
                client = rpc.connect_tracker("127.0.0.1", tracker.port)
                session = client.request("lab", session_timeout=60)
                assert session.get_function("testing.echo")("real board") == "real board"
                del session
                gc.collect()
            finally:
                rogue.close()
        assert value(metrics(sport), "tvmrpc_refused_connections_total", reason="board auth") == 2


def test_replayed_proof_is_refused(log_dir, secret_file):
    secret = SECRET.encode()
    with running(start_tracker(log_dir, "--board-secret-file", str(secret_file))) as tracker:
        first = stock_tracker_socket(tracker.port)
        try:
            reply = call(first, [boardauth.BOARD_CHALLENGE])
            assert reply[0] == 0
            first_nonce = reply[1]
            assert len(first_nonce) == boardauth.NONCE_HEX
            recorded = [
                boardauth.BOARD_AUTH,
                "k",
                boardauth.proof(secret, "tracker", reply[1], "k"),
            ]
            assert call(first, recorded) == 0
            assert call(first, [base.TrackerCode.PUT, "k", [9000, "k:1"], None]) == 0
        finally:
            first.close()
        # The recorded exchange, replayed on new connections, with and without a challenge.
        replay = stock_tracker_socket(tracker.port, source="127.0.0.3")
        try:
            reply = call(replay, recorded)
            assert reply[0] == base.TrackerCode.FAIL
            assert "bad board proof" in reply[1]
            other_nonce = call(replay, [boardauth.BOARD_CHALLENGE])[1]
            assert other_nonce != first_nonce  # fresh per connection
            reply = call(replay, recorded)
            assert reply[0] == base.TrackerCode.FAIL
            assert "bad board proof" in reply[1]
            reply = call(replay, [base.TrackerCode.PUT, "k", [9001, "k:2"], None])
            assert reply[0] == base.TrackerCode.FAIL
        finally:
            replay.close()
        tracker.wait_for(r"#warn\] refused a request from 127\.0\.0\.3: bad board proof for k")
        assert "k" not in rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"]


@pytest.mark.parametrize("allowed", [True, False])
def test_stock_server_admitted_only_from_allowed_networks(log_dir, secret_file, allowed):
    network = "127.0.0.0/24" if allowed else "127.0.0.2/32"
    args = ("--board-secret-file", str(secret_file), "--allow-board-from", network)
    with running(start_tracker(log_dir, *args)) as tracker:
        server = start_stock_server(log_dir, "stock", tracker=("127.0.0.1", tracker.port))
        with running(server):
            if allowed:
                tracker.wait_for(r"server:stock registered from 127\.0\.0\.1")
                client = rpc.connect_tracker("127.0.0.1", tracker.port)
                session = client.request("stock", session_timeout=60)
                assert session.get_function("testing.echo")(5) == 5
                del session
                gc.collect()
            else:
                tracker.wait_for(
                    r"#warn\] refused a request from 127\.0\.0\.1: UPDATE_INFO server:stock: "
                    r"board registration needs the board secret"
                )
                summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
                assert "stock" not in summary["queue_info"]
                assert "registered from" not in tracker.output


def test_stock_tracker_fails_our_proof_with_one_line(log_dir, secret_file):
    with running(start_stock_tracker(log_dir)) as tracker:
        proxy = start_proxy(
            log_dir,
            "--tracker",
            f"127.0.0.1:{tracker.port}",
            "--board-secret-file",
            str(secret_file),
        )
        with running(proxy):
            proxy.wait_for(
                r"does not support board authentication \(a stock tracker\?\); run tvmrpc's "
                r"tracker with --board-secret-file, or drop --board-secret-file here"
            )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--allow-board-from", "10.0.0.0/8"],
            "--allow-board-from needs --board-secret-file or a --listen mtls: endpoint: "
            "without them every board may register",
        ),
        (
            ["--board-secret-file", "/nonexistent/secret"],
            "--board-secret-file /nonexistent/secret: cannot read it",
        ),
    ],
)
def test_bad_board_flags_are_one_line(args, message):
    import subprocess
    import sys

    from tests.support import subprocess_env

    result = subprocess.run(
        [sys.executable, "-m", "twisted", "tvm-tracker", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
