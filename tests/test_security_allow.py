"""``--allow CIDR``: a stock client outside the listed networks is closed at accept (logged,
counted on /metrics); one inside is served, on the tracker, the proxy and the server."""

from __future__ import annotations

import gc
import socket
import struct

import pytest
from tvm import rpc

from tests.proxy_support import start_proxied_server, start_proxy
from tests.server_support import start_server
from tests.status_support import STATUS_FLAG, metrics, status_port, value
from tests.support import running, start_tracker, stock_tracker_socket
from tvmrpc.codec import RPC_MAGIC, TRACKER_MAGIC
from tvmrpc.listening import address_in, parse_network

pytestmark = pytest.mark.stock

OUTSIDE = "127.0.0.2"


def closed_unanswered(port: int, magic: int, source: str) -> bool:
    """True if the daemon closes a connection from ``source`` without answering its magic.

    The daemon aborts such a connection at accept, so the reset may already
    reach ``connect`` itself: that is a close without an answer too.
    """
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        ) as sock:
            sock.sendall(struct.pack("<i", magic))
            return sock.recv(4) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_address_matching_is_plain_cidr():
    nets = [parse_network("10.1.0.0/16"), parse_network("127.0.0.1"), parse_network("fd00::/8")]
    assert address_in("10.1.200.3", nets)
    assert address_in("::ffff:10.1.0.9", nets)  # IPv4 on a dual-stack socket
    assert address_in("127.0.0.1", nets)
    assert address_in("fd00::1", nets)
    assert not address_in("127.0.0.2", nets)
    assert not address_in("10.2.0.1", nets)
    assert not address_in("not-an-address", nets)


def test_tracker_serves_inside_refuses_outside_and_counts(log_dir):
    args = ("--allow", "127.0.0.1/32", "--allow", "10.0.0.0/8", *STATUS_FLAG)
    with running(start_tracker(log_dir, *args)) as tracker:
        port = status_port(tracker)
        assert closed_unanswered(tracker.port, TRACKER_MAGIC, OUTSIDE)
        tracker.wait_for(
            r"#warn\] tvm-tracker refused a connection from 127\.0\.0\.2: not in an --allow "
            r"network \(127\.0\.0\.1/32, 10\.0\.0\.0/8\)"
        )
        assert closed_unanswered(tracker.port, TRACKER_MAGIC, OUTSIDE)
        # A stock client inside is served.
        assert rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"] == {}
        sock = stock_tracker_socket(tracker.port, source="127.0.0.1")
        sock.close()
        assert value(metrics(port), "tvmrpc_refused_connections_total", reason="allow") == 2
        assert tracker.output.count("not in an --allow network") == 1  # rate limited


def test_without_allow_everyone_is_served(log_dir):
    with running(start_tracker(log_dir)) as tracker:
        stock_tracker_socket(tracker.port, source=OUTSIDE).close()
        assert "--allow" not in tracker.output


def test_proxy_client_side(log_dir):
    with running(start_proxy(log_dir, "--allow", "127.0.0.1")) as proxy:
        server = start_proxied_server(log_dir, proxy, "allowed")
        with running(server):
            assert closed_unanswered(proxy.port, RPC_MAGIC, OUTSIDE)
            proxy.wait_for(r"tvm-proxy refused a connection from 127\.0\.0\.2: not in an --allow")
            session = rpc.connect("127.0.0.1", proxy.port, key="allowed", session_timeout=60)
            assert session.get_function("testing.echo")(7) == 7
            del session
            gc.collect()


def test_server_listening_port(log_dir):
    with running(start_server(log_dir, "gated", "--allow", "127.0.0.1/32")) as server:
        assert closed_unanswered(server.port, RPC_MAGIC, OUTSIDE)
        server.wait_for(r"refused a connection from 127\.0\.0\.2: not in an --allow network")
        session = rpc.connect("127.0.0.1", server.port, key="gated", session_timeout=60)
        assert session.get_function("testing.echo")(3) == 3
        del session
        gc.collect()


def test_bad_allow_is_one_line(log_dir):
    import subprocess
    import sys

    from tests.support import subprocess_env

    result = subprocess.run(
        [sys.executable, "-m", "twisted", "tvm-tracker", "--allow", "10.0.0.0/33"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode != 0
    assert "--allow wants an address or network such as 10.1.0.0/16, got '10.0.0.0/33'" in (
        result.stderr + result.stdout
    )
