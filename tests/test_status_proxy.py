"""The proxy's status endpoint against a stock server and stock clients through it."""

from __future__ import annotations

import gc

import pytest
from tvm import rpc

from tests.proxy_support import raw_leg, read_reply, start_proxied_server, start_proxy
from tests.status_support import STATUS_FLAG, metrics, status, status_port, value
from tests.support import running

pytestmark = pytest.mark.stock

BLOB = 4 << 20


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    logs = tmp_path_factory.mktemp("status-proxy")
    proxy = start_proxy(logs, *STATUS_FLAG, "--timeout-client", "1")
    with running(proxy):
        status_port(proxy)
        server = start_proxied_server(logs, proxy, "pk")
        with running(server):
            yield proxy


def test_pairing_bytes_and_waiting_servers(proxied):
    proxy = proxied
    before = metrics(proxy.status_port)
    assert value(before, "tvmrpc_proxy_waiting_servers", key="pk") == 1
    mark = proxy.mark()
    session = rpc.connect("127.0.0.1", proxy.port, key="pk", session_timeout=60)
    doc = status(proxy.status_port)
    (live,) = doc["pairings"]
    assert live["key"] == "pk"
    assert live["client"].startswith("127.0.0.1:")
    session.upload(bytearray(BLOB), "blob")
    assert len(session.download("blob")) == BLOB
    del session
    gc.collect()  # a stock session ends when it is collected
    proxy.wait_for(r"session of 127\.0\.0\.1:\d+ with \S+ on pk: .* closed by client", start=mark)
    proxy.wait_for(r"waits as server pk\b", start=mark)  # the stock server came back

    after = metrics(proxy.status_port)
    up = value(after, "tvmrpc_proxy_forwarded_bytes_total", direction="client_to_server") - value(
        before, "tvmrpc_proxy_forwarded_bytes_total", direction="client_to_server"
    )
    down = value(after, "tvmrpc_proxy_forwarded_bytes_total", direction="server_to_client") - value(
        before, "tvmrpc_proxy_forwarded_bytes_total", direction="server_to_client"
    )
    print(f"proxy forwarded {up:.0f} bytes up, {down:.0f} down for {BLOB} each way")
    assert BLOB <= up <= BLOB * 1.01
    assert BLOB <= down <= BLOB * 1.01
    assert (
        value(after, "tvmrpc_proxy_pairings_total", key="pk")
        - value(before, "tvmrpc_proxy_pairings_total", key="pk")
        == 1
    )
    assert value(after, "tvmrpc_proxy_waiting_servers", key="pk") == 1
    assert value(after, "tvmrpc_proxy_active_pairings") == 0
    record = status(proxy.status_port)["sessions"][0]
    assert record["key"] == "pk"
    assert record["bytes_to_server"] == up
    assert record["seconds"] > 0


def test_pairing_timeout_is_counted(proxied):
    proxy = proxied
    before = metrics(proxy.status_port)
    mark = proxy.mark()
    with raw_leg(proxy.port, "client:nobody") as lonely:
        proxy.wait_for(r"waited too long for a peer", start=mark)
        assert read_reply(lonely)[0] is not None  # refused with no-match
    after = metrics(proxy.status_port)
    assert (
        value(after, "tvmrpc_proxy_pairing_timeouts_total", role="client")
        - value(before, "tvmrpc_proxy_pairing_timeouts_total", role="client")
        == 1
    )


def test_our_server_behind_our_proxy_records_the_real_client(tmp_path):
    from tests.server_support import start_server

    logs = tmp_path / "logs"
    logs.mkdir()
    with running(start_proxy(logs)) as proxy:
        args = ["--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port)]
        server = start_server(logs, "far", *args, *STATUS_FLAG, listen=False)
        with running(server):
            status_port(server)
            server.wait_for(r"waiting at proxy")
            session = rpc.connect("127.0.0.1", proxy.port, key="far", session_timeout=60)
            session.upload(bytearray(BLOB), "blob")
            mark, proxy_mark = server.mark(), proxy.mark()
            del session
            gc.collect()  # a stock session ends when it is collected
            server.wait_for(r"session of 127\.0\.0\.1:\d+ via proxy \S+ on far: ok", start=mark)
            seen = proxy.wait_for(r"session of (\S+) with \S+ on far", start=proxy_mark)
            (record,) = status(server.status_port)["sessions"]
            assert record["client"].startswith(seen.group(1) + " via proxy")
            assert BLOB <= record["bytes_in"] <= BLOB * 1.01


def test_proxy_in_tracker_mode_seen_by_both(tmp_path):
    from tests.support import start_tracker

    logs = tmp_path / "logs"
    logs.mkdir()
    with running(start_tracker(logs, *STATUS_FLAG)) as tracker:
        status_port(tracker)
        proxy = start_proxy(
            logs,
            *STATUS_FLAG,
            "--tracker",
            f"127.0.0.1:{tracker.port}",
            "--custom-addr",
            "127.0.0.1",
        )
        with running(proxy):
            status_port(proxy)
            mark = proxy.mark()
            with running(start_proxied_server(logs, proxy, "tk")):
                proxy.wait_for(r"put tk:\S+ at the tracker", start=mark)
                assert (
                    value(metrics(proxy.status_port), "tvmrpc_proxy_waiting_servers", key="tk") == 1
                )
                client = rpc.connect_tracker("127.0.0.1", tracker.port)
                session = client.request("tk", session_timeout=60)
                (held,) = [b for b in status(tracker.status_port)["boards"] if b["key"] == "tk"]
                assert held["state"] == "busy"
                assert held["address"] == f"127.0.0.1:{proxy.port}"
                session.upload(bytearray(1 << 20), "blob")
                mark = proxy.mark()
                del session
                gc.collect()  # a stock session ends when it is collected
                proxy.wait_for(r"session of \S+ with \S+ on tk: ", start=mark)
                proxy.wait_for(r"put tk:\S+ at the tracker", start=mark)  # the server is back
                tracker.wait_for(r"session on tk board \S+ for 127\.0\.0\.1: .* released")
                assert (
                    value(metrics(proxy.status_port), "tvmrpc_proxy_pairings_total", key="tk") == 1
                )
                record = status(tracker.status_port)["sessions"][0]
                assert record["key"] == "tk"
                assert record["outcome"] is None  # the stock server behind reports nothing
