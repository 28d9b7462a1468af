"""Our server as a registering board: it proves the board secret to our tracker and our
proxy, reaches the tracker over TLS, and says in one line when the peer is stock; stock
clients in plaintext run a compiled model on it through the same tracker and proxy."""

from __future__ import annotations

import gc
import json
import struct

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.proxy_support import start_proxy
from tests.server_support import mlp_library, start_server  # noqa: F401 - a fixture
from tests.support import running, start_stock_tracker, start_tracker, stock_tracker_socket
from tests.test_security_tls import tls_port
from tests.tls_support import CA, ssl_listen, tls_target
from tvmrpc.mlp import run_mlp

pytestmark = pytest.mark.stock


def call(sock, value):
    frame = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(frame)) + frame)
    return base.recvjson(sock)


def test_our_server_registers_with_the_secret_a_rogue_put_does_not(
    log_dir,
    secret_file,
    mlp_library,  # noqa: F811
):
    secret = ("--board-secret-file", str(secret_file))
    with running(start_tracker(log_dir, *secret)) as tracker:
        link = ("--tracker", f"127.0.0.1:{tracker.port}", *secret)
        with running(start_server(log_dir, "ours", *link)) as server:
            server.wait_for(r"registered with tracker 127\.0\.0\.1:\d+ as server:ours")
            rogue = stock_tracker_socket(tracker.port, source="127.0.0.2")
            try:
                reply = call(rogue, [base.TrackerCode.PUT, "ours", [1, "ours:evil"], "10.9.9.9"])
                assert reply[0] == base.TrackerCode.FAIL
            finally:
                rogue.close()
            session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                "ours", session_timeout=60
            )
            assert run_mlp(session, mlp_library).ok
            del session
            gc.collect()


def test_our_server_at_a_stock_tracker_says_so(log_dir, secret_file):
    with running(start_stock_tracker(log_dir)) as tracker:
        link = ("--tracker", f"127.0.0.1:{tracker.port}", "--board-secret-file", str(secret_file))
        with running(start_server(log_dir, "lone", *link)) as server:
            server.wait_for(r"does not support board authentication \(a stock tracker\?\)")
            assert "registered with tracker" not in server.output


def test_our_server_through_our_proxy_with_the_secret(log_dir, secret_file):
    secret = ("--board-secret-file", str(secret_file))
    with running(start_proxy(log_dir, *secret)) as proxy:
        args = ("--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port), *secret)
        with running(start_server(log_dir, "behind", *args, listen=False)):
            proxy.wait_for(r"waits as server behind\b")
            session = rpc.connect("127.0.0.1", proxy.port, key="behind", session_timeout=60)
            assert session.get_function("testing.echo")("proven") == "proven"
            del session
            gc.collect()
        assert "refused registration" not in proxy.output


def test_our_server_at_a_stock_proxy_says_so(log_dir, secret_file):
    from tvmrpc.harness import start_stock_proxy

    with running(start_stock_proxy(log_dir)) as stock:
        port = stock.port
        args = ("--through-proxy", "--host", "127.0.0.1", "--port", str(port))
        server = start_server(
            log_dir,
            "astray",
            *args,
            "--board-secret-file",
            str(secret_file),
            listen=False,
        )
        with running(server):
            # A stock client pairs with it: the stock proxy answers success, not a challenge.
            with pytest.raises(Exception):  # noqa: B017, PT011 - the stock client's own error
                rpc.connect("127.0.0.1", port, key="astray", session_timeout=5)
            server.wait_for(r"stock proxy or one without --board-secret-file")


def test_our_server_reaches_the_tracker_over_tls(log_dir, tmp_path, mlp_library):  # noqa: F811
    lab = CA(tmp_path, "lab-ca")
    cert, key = lab.issue("tracker", ["localhost"], ["127.0.0.1"])
    with running(start_tracker(log_dir, "--listen", ssl_listen(cert, key))) as tracker:
        target = tls_target("localhost", tls_port(tracker), lab.trust_dir)
        with running(start_server(log_dir, "tlsboard", "--tracker", target)) as server:
            server.wait_for(r"registered with tracker localhost:\d+ as server:tlsboard")
            session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                "tlsboard", session_timeout=60
            )
            assert run_mlp(session, mlp_library).ok
            del session
            gc.collect()
