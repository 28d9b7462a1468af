"""Hostile and careless peers at the proxy (issue 14, cases 2 and 8), with stock peers.

Each test prints what it measured: the proxy's RSS before and after the junk,
whether the real board behind the proxy is served during and after it, and
how long a stock client's session took.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.proxy_support import (
    is_closed_now,
    junk_leg,
    push_until_blocked,
    raw_pair,
    read_reply,
    recvall,
    rss,
    start_proxied_server,
    start_proxy,
    wait_closed,
    wait_lines,
)
from tests.support import running, start_stock_tracker, stock_tracker_socket
from tvmrpc.codec import MAX_KEY_CHARS, RPC_CODE_MISMATCH
from tvmrpc.proxy.limits import DEFAULT_EARLY_BYTES, DEFAULT_EARLY_TOTAL, DEFAULT_SERVER_KEYS

pytestmark = pytest.mark.stock

MiB = 1 << 20
JUNK = 300


def proxy_info(tracker_port: int) -> str:
    """The proxy's ``server:proxy[...]`` key in the tracker's SUMMARY."""
    with stock_tracker_socket(tracker_port) as sock:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, summary = base.recvjson(sock)
    assert code == base.TrackerCode.SUCCESS
    (key,) = [i["key"] for i in summary["server_info"] if i["key"].startswith("server:proxy")]
    return key


def timed_session(connect) -> float:
    """Open a stock session with ``connect()``, call echo once, close; seconds taken."""
    start = time.monotonic()
    session = connect()
    assert session.get_function("testing.echo")("board") == "board"
    del session
    return time.monotonic() - start


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def test_junk_servers_leave_the_board_behind_a_tracker_proxy_reachable(log_dir):
    """Case 2: 300 junk server connections with 4 KB keys, then 300 with valid distinct keys.

    Stock fails this case: the stock proxy checks no key and its advertised key
    set only grows (``_key_set`` in tvm/rpc/proxy.py), so the same junk pushes
    its UPDATE_INFO past the tracker's 1 MiB frame limit (not run here).
    """
    with (
        running(start_stock_tracker(log_dir)) as tracker,
        running(
            start_proxy(
                log_dir,
                "--tracker",
                f"127.0.0.1:{tracker.port}",
                "--custom-addr",
                "127.0.0.1",
                "--tracker-period",
                "0.5",
            )
        ) as proxy,
    ):
        proxy.wait_for(r"connected to tracker")
        with running(start_proxied_server(log_dir, proxy, "board")):
            proxy.wait_for(r"put board:\S+ at the tracker")
            before = rss(proxy.proc.pid)
            oversized, valid = [], []
            try:
                for i in range(JUNK):
                    oversized.append(junk_leg(proxy.port, f"server:{i:04d}" + "x" * 4085, i))
                for sock in oversized:
                    assert read_reply(sock) == (RPC_CODE_MISMATCH, None)
                mark = proxy.mark()
                for i in range(JUNK):
                    key = f"server:junk{i:03d}-" + "v" * 200
                    valid.append(junk_leg(proxy.port, key, JUNK + i))
                outcomes = wait_lines(
                    proxy,
                    r"waits as server junk\d{3}-|refused .*server key junk\d{3}-",
                    JUNK,
                    start=mark,
                )
                admitted = sum("waits as server" in line for line in outcomes)
                # the board holds one of the --max-server-keys device keys
                assert admitted == DEFAULT_SERVER_KEYS - 1
                during = timed_session(
                    lambda: rpc.connect_tracker("127.0.0.1", tracker.port).request(
                        "board", session_timeout=60
                    )
                )
                info = proxy_info(tracker.port)
                assert "board" in info[len("server:proxy[") : -1].split(",")
                assert len(info) <= len("server:proxy[]") + DEFAULT_SERVER_KEYS * (
                    MAX_KEY_CHARS + 1
                )
                info_during = len(info)
            finally:
                mark = proxy.mark()
                close_all(oversized + valid)
            # the junk is gone: the advertised set shrinks to the board alone
            # (told once every junk leg is gone and no withdrawal reset is pending)
            proxy.wait_for(r"tracker took UPDATE_INFO: 1 device keys", start=mark)
            assert proxy_info(tracker.port) == "server:proxy[board]"
            proxy.wait_for(r"put board:\S+ at the tracker", start=mark)
            after_junk = timed_session(
                lambda: rpc.connect_tracker("127.0.0.1", tracker.port).request(
                    "board", session_timeout=60
                )
            )
            after = rss(proxy.proc.pid)
        connects = proxy.output.count("connected to tracker")
        refusals = proxy.output.count("tracker refused our UPDATE_INFO")
        print(
            f"\ncase 2: {JUNK} junk with 4 KB keys refused, {admitted} of {JUNK} valid junk "
            f"keys admitted; proxy key in SUMMARY {info_during} chars during the junk; "
            f"board session during junk {during * 1000:.0f} ms, after {after_junk * 1000:.0f} ms; "
            f"tracker connections {connects}, UPDATE_INFO refusals {refusals}; "
            f"proxy RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB"
        )
        # one reconnect withdraws the departed junk; never a loop
        assert refusals == 0
        assert connects <= 4


def test_junk_bytes_before_pairing_stay_bounded(log_dir):
    """Case 8: 300 waiting server connections each send 1 MiB before pairing, then
    300 each send just under the per-connection bound.

    Stock passes this case: the stock proxy closes a connection at its first byte
    after the handshake ("Invalid RPC protocol, too many bytes").
    """
    with (
        running(start_proxy(log_dir)) as proxy,
        running(start_proxied_server(log_dir, proxy, "board")),
    ):
        before = rss(proxy.proc.pid)
        peak = before
        payload = b"j" * MiB
        legs = [junk_leg(proxy.port, f"server:big{i}", i) for i in range(JUNK)]
        try:
            for sock in legs:
                push_until_blocked(sock, payload)
            peak = max(peak, rss(proxy.proc.pid))
            closed_big = sum(wait_closed(sock) for sock in legs)
        finally:
            close_all(legs)
        after_big = rss(proxy.proc.pid)
        # every leg over the per-connection bound was closed
        assert closed_big == JUNK

        small = DEFAULT_EARLY_BYTES - 4096
        legs = [junk_leg(proxy.port, f"server:small{i}", JUNK + i) for i in range(JUNK)]
        try:
            for sock in legs:
                assert push_until_blocked(sock, b"s" * small) == small
            # A pairing round trip after the sends: the reactor has read every socket
            # that was readable before it began (one read each: small < one read).
            server, client = raw_pair(proxy.port, "barrier")
            with server, client:
                client.sendall(b"ping")
                assert recvall(server, 4) == b"ping"
            peak = max(peak, rss(proxy.proc.pid))
            survivors = [sock for sock in legs if not is_closed_now(sock)]
            during = timed_session(
                lambda: rpc.connect("127.0.0.1", proxy.port, key="board", session_timeout=60)
            )
        finally:
            close_all(legs)
        # the survivors together hold no more than the total bound
        assert len(survivors) * small <= DEFAULT_EARLY_TOTAL
        assert len(survivors) >= DEFAULT_EARLY_TOTAL // small - 1
        after = rss(proxy.proc.pid)
        print(
            f"\ncase 8: {JUNK} x 1 MiB before pairing: all {closed_big} closed; "
            f"{JUNK} x {small // 1024} KiB: {len(survivors)} kept, {JUNK - len(survivors)} "
            f"closed; board session during junk {during * 1000:.0f} ms; proxy RSS "
            f"{before / MiB:.1f} -> peak {peak / MiB:.1f}, {after_big / MiB:.1f} after the "
            f"1 MiB junk, {after / MiB:.1f} MiB at the end (issue: 34 -> 344 MiB)"
        )
        assert max(peak, after) - before < 32 * MiB
