"""``--max-connections-per-peer``: the N+1th connection from one address is closed at once,
and accepted again once one closes; the server's socket hand-off still works under a cap."""

from __future__ import annotations

import gc
import socket
import struct

import pytest
from tvm import rpc

from tests.proxy_support import start_proxy
from tests.server_support import start_server
from tests.support import running, start_tracker, stock_tracker_socket

pytestmark = pytest.mark.stock


def refused(port: int) -> bool:
    """True if the tracker closes a new connection without answering the magic.

    The tracker aborts a refused peer at accept, so the reset may reach
    connect() itself (seen in a loaded run): that too is a close without an answer.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(struct.pack("<i", 0x2F271))
            return sock.recv(4) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_tracker_refuses_the_n_plus_first_connection_and_accepts_after_a_close(log_dir):
    cap = 3
    with running(start_tracker(log_dir, "--max-connections-per-peer", str(cap))) as tracker:
        held = [stock_tracker_socket(tracker.port) for _ in range(cap)]
        try:
            assert refused(tracker.port)
            tracker.wait_for(
                r"#warn\] tvm-tracker refused a connection from 127\.0\.0\.1: "
                r"it already has 3 open \(--max-connections-per-peer\)"
            )
            assert refused(tracker.port)  # still full; this one is not logged again
            # The tracker itself closes one (an unknown code, as stock does); once we see
            # the close, its slot is free (the tracker counts down as it closes the socket).
            closing = held.pop()
            frame = b"[99]"
            closing.sendall(struct.pack("<i", len(frame)) + frame)
            assert closing.recv(100) == b""
            closing.close()
            # A stock client gets in again.
            assert rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"] == {}
        finally:
            for sock in held:
                sock.close()
        assert tracker.output.count("refused a connection") == 1  # rate limited


def test_unlimited_with_zero(log_dir):
    with running(start_tracker(log_dir, "--max-connections-per-peer", "0")) as tracker:
        held = [stock_tracker_socket(tracker.port) for _ in range(20)]
        for sock in held:
            sock.close()
        assert "refused a connection" not in tracker.output


def test_server_hand_off_frees_the_slot(log_dir):
    """A cap of 1 at the server: the session's socket leaves the daemon for a worker, so
    back-to-back stock sessions from one address are all served."""
    with running(start_server(log_dir, "capped", "--max-connections-per-peer", "1")) as server:
        for i in range(3):
            mark = server.mark()
            session = rpc.connect("127.0.0.1", server.port, key="capped", session_timeout=60)
            assert session.get_function("testing.echo")(i) == i
            del session
            gc.collect()  # a stock session closes when collected
            server.wait_for(r"session ended", start=mark)
        assert "refused a connection" not in server.output


def closed_at_once(port: int) -> bool:
    """True if the daemon closes a new connection (EOF or reset) before it says anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_proxy_caps_its_rpc_port_and_its_web_port(log_dir):
    args = ("--max-connections-per-peer", "2", "--handshake-timeout", "120")
    with running(start_proxy(log_dir, *args, web=True)) as proxy:
        for port in (proxy.port, proxy.web_port):
            held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
            try:
                assert closed_at_once(port)
            finally:
                for sock in held:
                    sock.close()
        proxy.wait_for(r"#warn\] tvm-proxy refused a connection from 127\.0\.0\.1")
        proxy.wait_for(r"#warn\] tvm-proxy web refused a connection from 127\.0\.0\.1")
