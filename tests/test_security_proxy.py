"""Board registration with ``--board-secret-file`` at the proxy: a ``server:`` handshake
must answer the proxy's challenge (our option ``-tvmrpc-auth``); stock servers register only
from ``--allow-board-from`` networks; a replayed proof is refused; refused legs never wait."""

from __future__ import annotations

import gc
import socket
import struct

import pytest
from tvm import rpc

from tests.proxy_support import (
    raw_leg,
    read_reply,
    recvall,
    send_handshake,
    start_proxied_server,
    start_proxy,
)
from tests.support import running
from tests.tls_support import SECRET
from tvmrpc import boardauth
from tvmrpc.codec import RPC_CODE_MISMATCH, RPC_CODE_SUCCESS

pytestmark = pytest.mark.stock


def read_challenge(sock: socket.socket) -> str:
    (code, length) = struct.unpack("<ii", recvall(sock, 8))
    assert code == boardauth.RPC_CODE_CHALLENGE
    return recvall(sock, length).decode()


def test_a_proven_server_waits_and_pairs_a_replayed_one_is_refused(log_dir, secret_file):
    with running(start_proxy(log_dir, "--board-secret-file", str(secret_file))) as proxy:
        board = raw_leg(proxy.port, f"server:lab {boardauth.PROXY_OPTION}")
        nonce = read_challenge(board)
        recorded = boardauth.encode_proof(
            boardauth.proof(SECRET.encode(), boardauth.LABEL_PROXY, nonce, "lab")
        )
        board.sendall(recorded)
        proxy.wait_for(r"waits as server lab\b")
        # The recorded exchange replayed on a new connection (the proxy chose a new nonce).
        replay = socket.create_connection(("127.0.0.1", proxy.port), timeout=60)
        send_handshake(replay, f"server:lab {boardauth.PROXY_OPTION}")
        assert read_challenge(replay) != nonce
        replay.sendall(recorded)
        assert read_reply(replay) == (RPC_CODE_MISMATCH, None)
        proxy.wait_for(
            r"#warn\] refused registration server:lab -tvmrpc-auth from 127\.0\.0\.1:\d+: "
            r"bad board proof"
        )
        # A client still pairs with the proven board only.
        client = raw_leg(proxy.port, "client:lab")
        assert read_reply(board)[0] == RPC_CODE_SUCCESS
        assert read_reply(client) == (RPC_CODE_SUCCESS, f"server:lab {boardauth.PROXY_OPTION}")
        for sock in (board, replay, client):
            sock.close()


def test_a_stock_server_without_proof_never_waits(log_dir, secret_file):
    with running(start_proxy(log_dir, "--board-secret-file", str(secret_file))) as proxy:
        rogue = raw_leg(proxy.port, "server:lab")
        assert read_reply(rogue) == (RPC_CODE_MISMATCH, None)
        rogue.close()
        proxy.wait_for(r"#warn\] refused registration server:lab from .*: it sent no board proof")
        assert "waits as server" not in proxy.output
        # Clients need no secret: a client leg still waits as stock.
        client = raw_leg(proxy.port, "client:lab")
        proxy.wait_for(r"waits as client lab\b")
        client.close()


@pytest.mark.parametrize("allowed", [True, False])
def test_stock_server_admitted_only_from_allowed_networks(log_dir, secret_file, allowed):
    network = "127.0.0.1/32" if allowed else "127.0.0.2/32"
    args = ("--board-secret-file", str(secret_file), "--allow-board-from", network)
    with running(start_proxy(log_dir, *args)) as proxy:
        if allowed:
            with running(start_proxied_server(log_dir, proxy, "stockboard")):
                session = rpc.connect("127.0.0.1", proxy.port, key="stockboard", session_timeout=60)
                assert session.get_function("testing.echo")(11) == 11
                del session
                gc.collect()
        else:
            server = start_proxied_server(log_dir, proxy, "stockboard", wait=False)
            with running(server):
                proxy.wait_for(r"#warn\] refused registration server:stockboard from 127\.0\.0\.1")
            assert "waits as server" not in proxy.output


def test_answerer_proves_for_its_key_and_rejects_a_stock_answer():
    secret = SECRET.encode()
    answerer = boardauth.ProxyAnswerer(secret, "lab")
    frame = boardauth.encode_challenge("ab" * 16)
    assert answerer.feed(frame[:5]) is None
    reply = answerer.feed(frame[5:])
    decoded = boardauth.proof_decoder().feed(reply)
    assert decoded is not None
    assert boardauth.verify(secret, boardauth.LABEL_PROXY, "ab" * 16, "lab", decoded[0])
    stock = boardauth.ProxyAnswerer(secret, "lab")
    with pytest.raises(boardauth.FrameError, match="stock proxy"):
        stock.feed(struct.pack("<i", RPC_CODE_SUCCESS))


def test_a_silent_server_leg_is_refused_at_the_handshake_timeout(log_dir, secret_file):
    args = ("--board-secret-file", str(secret_file), "--handshake-timeout", "0.5")
    with running(start_proxy(log_dir, *args)) as proxy:
        silent = raw_leg(proxy.port, f"server:lab {boardauth.PROXY_OPTION}")
        read_challenge(silent)
        assert read_reply(silent) == (RPC_CODE_MISMATCH, None)
        silent.close()
        proxy.wait_for(r"#warn\] refused registration .*: no board proof within the handshake")
        assert "waits as server" not in proxy.output
