"""Misbehaving peers at our proxy: each affects only its own connections."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest

from tests.proxy_support import raw_leg, raw_pair, read_reply, recvall, start_proxy
from tests.support import running
from tvmrpc.codec import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS, RPC_MAGIC


@pytest.fixture(scope="module", params=["splice", "userspace"])
def proxy(request, tmp_path_factory):
    """Our proxy forwarding with splice(2), or in userspace (``--no-splice``)."""
    log_dir = tmp_path_factory.mktemp(f"proxy-faults-{request.param}")
    extra = ["--no-splice"] if request.param == "userspace" else []
    daemon = start_proxy(
        log_dir,
        "--timeout-client",
        "1",
        "--timeout-server",
        "1.5",
        "--handshake-timeout",
        "1",
        *extra,
    )
    daemon.path = request.param  # type: ignore[attr-defined]
    with running(daemon):
        yield daemon


def expect_path(proxy, mark: int) -> None:
    """The pairing since ``mark`` used the forwarding path the fixture asked for."""
    path = proxy.wait_for(r"forwarding \S+ and \S+ by (\w+)", start=mark).group(1)
    assert path == proxy.path


def assert_alive(port: int, key: str) -> None:
    """A fresh pair on ``key`` still works both ways."""
    server, client = raw_pair(port, key)
    with server, client:
        client.sendall(b"ping")
        assert recvall(server, 4) == b"ping"
        server.sendall(b"pong")
        assert recvall(client, 4) == b"pong"


def assert_closed(sock: socket.socket) -> None:
    """The proxy closed ``sock``: a read sees end of stream (or a reset)."""
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""


def test_waiting_client_and_server_time_out_with_no_match(proxy):
    with (
        raw_leg(proxy.port, "client:nobody") as client,
        raw_leg(proxy.port, "server:nobody-either") as server,
    ):
        assert_alive(proxy.port, "during-timeouts")
        assert read_reply(client) == (RPC_CODE_MISMATCH, None)
        assert_closed(client)
        assert read_reply(server) == (RPC_CODE_MISMATCH, None)
        assert_closed(server)
    # the keys are free again
    assert_alive(proxy.port, "nobody")


def test_duplicate_waiter_refused_and_first_one_still_pairs(proxy):
    with raw_leg(proxy.port, "server:dup") as first:
        proxy.wait_for(r"waits as server dup\b")
        with raw_leg(proxy.port, "server:dup") as second:
            assert read_reply(second) == (RPC_CODE_DUPLICATE, None)
            assert_closed(second)
        with raw_leg(proxy.port, "client:dup -timeout=9") as client:
            assert read_reply(first) == (RPC_CODE_SUCCESS, "client:dup -timeout=9")
            assert read_reply(client) == (RPC_CODE_SUCCESS, "server:dup")


def test_side_closing_mid_stream_closes_the_other_after_its_bytes(proxy):
    mark = proxy.mark()
    server, client = raw_pair(proxy.port, "midstream")
    expect_path(proxy, mark)
    other_server, other_client = raw_pair(proxy.port, "bystander")
    payload = bytes(range(256)) * 4096  # 1 MiB
    with server, client, other_server, other_client:
        client.sendall(payload)
        client.close()
        assert recvall(server, len(payload) + 1) == payload  # everything, then EOF
        assert_closed(server)
        other_client.sendall(b"still here")
        assert recvall(other_server, 10) == b"still here"
    # and the server side closing closes the client
    server, client = raw_pair(proxy.port, "midstream")
    with server, client:
        server.sendall(b"bye")
        server.close()
        assert recvall(client, 4) == b"bye"


def test_bad_handshakes_are_closed_alone(proxy):
    server, client = raw_pair(proxy.port, "bad-bystander")
    with server, client:
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            struct.pack("<ii", RPC_MAGIC, -5),
            struct.pack("<ii", RPC_MAGIC, 1 << 30),
            struct.pack("<ii", RPC_MAGIC, 9) + b"nobody:xx",
        ):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as bad:
                bad.sendall(garbage)
                assert_closed(bad)
        client.sendall(b"unaffected")
        assert recvall(server, 10) == b"unaffected"


def test_stalled_handshake_times_out_alone(proxy):
    server, client = raw_pair(proxy.port, "stall-bystander")
    with server, client, socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as half:
        half.sendall(struct.pack("<ii", RPC_MAGIC, 20) + b"server:")
        mark = proxy.mark()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as silent:
            proxy.wait_for(r"handshake from \S+ timed out", start=mark)
            assert_closed(half)
            assert_closed(silent)
        client.sendall(b"fine")
        assert recvall(server, 4) == b"fine"
        assert_alive(proxy.port, "after-stall")


def test_bytes_sent_before_pairing_arrive_after_the_answer(proxy):
    """Early bytes (held in userspace while waiting) precede the spliced or copied stream."""
    with raw_leg(proxy.port, "server:early") as server:
        server.sendall(b"sent early")
        proxy.wait_for(r"waits as server early\b")
        mark = proxy.mark()
        with raw_leg(proxy.port, "client:early") as client:
            assert read_reply(client) == (RPC_CODE_SUCCESS, "server:early")
            assert read_reply(server) == (RPC_CODE_SUCCESS, "client:early")
            expect_path(proxy, mark)
            assert recvall(client, 10) == b"sent early"
            client.sendall(b"and back")
            assert recvall(server, 8) == b"and back"


def test_side_reset_mid_stream_closes_the_other_alone(proxy):
    """A peer that resets (RST, not FIN) while bytes flow both ways."""
    mark = proxy.mark()
    server, client = raw_pair(proxy.port, "reset")
    expect_path(proxy, mark)
    other_server, other_client = raw_pair(proxy.port, "reset-bystander")
    with server, client, other_server, other_client:
        client.sendall(b"c" * (1 << 20))
        server.sendall(b"s" * (1 << 20))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST: unread bytes and all
        with contextlib.suppress(ConnectionResetError):
            while server.recv(1 << 20):
                pass
        other_client.sendall(b"unaffected")
        assert recvall(other_server, 10) == b"unaffected"
    assert_alive(proxy.port, "after-reset")


def test_many_pairings_leave_no_descriptors_behind(proxy):
    """Each pairing's sockets (and, with splice, its dups and pipes) are closed when it ends."""
    import psutil

    def round_trip(server: socket.socket, client: socket.socket) -> None:
        # a barrier: the proxy's reactor has run several turns once this returns
        for _ in range(2):
            client.sendall(b"ping")
            assert recvall(server, 4) == b"ping"

    proc = psutil.Process(proxy.proc.pid)
    keep_server, keep_client = raw_pair(proxy.port, "fd-barrier")
    with keep_server, keep_client:
        round_trip(keep_server, keep_client)
        before = proc.num_fds()
        for i in range(40):
            server, client = raw_pair(proxy.port, f"fd-{i}")
            with server, client:
                client.sendall(b"x" * 100_000)
                assert recvall(server, 100_000) == b"x" * 100_000
                first, second = (client, server) if i % 2 else (server, client)
                first.close()
                assert_closed(second)  # the proxy closed it: the pairing is over
        round_trip(keep_server, keep_client)
        after = proc.num_fds()
    print(f"{proxy.path}: proxy fds {before} before 40 pairings, {after} after")
    assert after == before
