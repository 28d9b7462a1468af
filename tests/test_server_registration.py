"""Tracker registration: a match key handed out to a client that never came is replaced."""

from __future__ import annotations

import socket
import struct

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.server_support import handshake_bytes, raw_connect, start_server
from tests.support import running, start_tracker, stock_tracker_socket
from tvmrpc.codec import RPC_CODE_MISMATCH

pytestmark = pytest.mark.stock


def _request_without_connecting(tracker_port: int, key: str) -> list:
    """A REQUEST as the stock client sends it; returns ``[addr, port, matchkey]``."""
    with stock_tracker_socket(tracker_port) as sock:
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
        code, resource = base.recvjson(sock)
    assert code == base.TrackerCode.SUCCESS
    return resource


def test_stale_match_key_is_refused_and_a_fresh_one_registered(log_dir):
    with running(start_tracker(log_dir)) as tracker:
        args = ["--tracker", f"127.0.0.1:{tracker.port}"]
        with running(start_server(log_dir, "stale", *args)) as server:
            server.wait_for(r"registered with tracker")
            _addr, port, matchkey = _request_without_connecting(tracker.port, "stale")
            assert port == server.port
            assert matchkey.startswith("stale:")
            server.wait_for(r"no client came; registering a fresh one")
            with raw_connect(server.port) as sock:
                sock.sendall(handshake_bytes(f"client:{matchkey}"))
                assert sock.recv(4, socket.MSG_WAITALL) == struct.pack("<i", RPC_CODE_MISMATCH)
            session = rpc.connect_tracker("127.0.0.1", tracker.port).request("stale")
            session.upload(bytearray(b"fresh"), "f")
            assert bytes(session.download("f")) == b"fresh"


def test_custom_addr_is_what_the_tracker_hands_out(log_dir):
    """Listening on 127.0.0.2 only: clients find it only through --custom-addr."""
    with running(start_tracker(log_dir)) as tracker:
        args = ["--listen", "tcp:0:interface=127.0.0.2", "--custom-addr", "127.0.0.2"]
        args += ["--tracker", f"127.0.0.1:{tracker.port}"]
        server = start_server(log_dir, "custom", *args, listen=False)
        with running(server):
            server.wait_listening()
            server.wait_for(r"registered with tracker")
            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            infos = [i for i in client.summary()["server_info"] if i["key"] == "server:custom"]
            assert [info["addr"] for info in infos] == [["127.0.0.2", server.port]]
            session = client.request("custom", session_timeout=60)
            session.upload(bytearray(b"aliased"), "f")
            assert bytes(session.download("f")) == b"aliased"
