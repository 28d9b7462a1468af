"""Tracker mode: our proxy registers stock servers behind it at our tracker."""

from __future__ import annotations

import json

import pytest
from tvm import rpc
from tvm.rpc import base

from tests.proxy_support import start_proxied_server, start_proxy
from tests.support import Daemon, run_module, running, start_tracker, stock_tracker_socket
from tvmrpc.mlp import build_mlp, run_mlp

pytestmark = pytest.mark.stock


def query(port: int, *args: str) -> str:
    return run_module(
        "tvmrpc.cli", "query", "--host", "127.0.0.1", "--port", str(port), *args
    ).stdout


def test_servers_behind_proxy_registered_and_reached(log_dir, tmp_path):
    library = build_mlp(tmp_path / "model")
    with (
        running(start_tracker(log_dir)) as tracker,
        running(
            start_proxy(
                log_dir, "--tracker", f"127.0.0.1:{tracker.port}", "--custom-addr", "127.0.0.1"
            )
        ) as proxy,
    ):
        proxy.wait_for(r"connected to tracker")
        mark = proxy.mark()
        with (
            running(start_proxied_server(log_dir, proxy, "boardA")),
            running(start_proxied_server(log_dir, proxy, "boardB", name="b")),
        ):
            proxy.wait_for(r"put boardA:\S+ at the tracker", start=mark)
            proxy.wait_for(r"put boardB:\S+ at the tracker", start=mark)
            table = query(tracker.port)
            assert "server:proxy[boardA,boardB]" in table
            summary = json.loads(query(tracker.port, "--json"))
            assert summary["queue_info"]["boardA"]["free"] == 1
            (info,) = [i for i in summary["server_info"] if i["key"].startswith("server:proxy")]
            assert info["addr"] == ["127.0.0.1", proxy.port]

            client = rpc.connect_tracker("127.0.0.1", tracker.port)
            session = client.request("boardA", session_timeout=60)
            assert session.get_function("testing.echo")("via tracker") == "via tracker"
            result = run_mlp(session, library)
            assert result.ok, (result.output, result.expected)
            del session
            # the stock server comes back to the proxy and is registered again
            proxy.wait_for(r"put boardA:\S+ at the tracker", start=proxy.mark())


def test_tracker_restart_reregisters_waiting_servers(log_dir):
    with running(start_tracker(log_dir, name="t1")) as tracker:
        port = tracker.port
        with running(
            start_proxy(log_dir, "--tracker", f"127.0.0.1:{port}", "--tracker-period", "0.5")
        ) as proxy:
            proxy.wait_for(r"connected to tracker")
            with running(start_proxied_server(log_dir, proxy, "rst")):
                proxy.wait_for(r"put rst:\S+ at the tracker")
                tracker.stop()
                proxy.wait_for(r"lost the tracker connection")
                mark = proxy.mark()
                again = Daemon(
                    "tvm-tracker",
                    ["--listen", f"tcp:{port}:interface=127.0.0.1"],
                    log_dir / "t2.log",
                )
                with running(again):
                    again.wait_listening()
                    proxy.wait_for(r"connected to tracker", start=mark)
                    proxy.wait_for(r"put rst:\S+ at the tracker", start=mark)
                    assert "server:proxy[rst]" in query(port)
                    session = rpc.connect_tracker("127.0.0.1", port).request(
                        "rst", session_timeout=60
                    )
                    assert session.get_function("testing.echo")(5) == 5


def test_key_handed_out_but_unused_is_regenerated(log_dir):
    with (
        running(start_tracker(log_dir)) as tracker,
        running(
            start_proxy(
                log_dir,
                "--tracker",
                f"127.0.0.1:{tracker.port}",
                "--tracker-period",
                "0.2",
                "--alloc-timeout",
                "0.5",
            )
        ) as proxy,
    ):
        proxy.wait_for(r"connected to tracker")
        with running(start_proxied_server(log_dir, proxy, "lost")):
            first = proxy.wait_for(r"put (lost:\S+) at the tracker").group(1)
            # a client takes the key from the tracker and never comes
            with stock_tracker_socket(tracker.port) as sock:
                base.sendjson(sock, [base.TrackerCode.REQUEST, "lost", "", 1])
                assert base.recvjson(sock) == [0, ["127.0.0.1", proxy.port, first]]
            mark = proxy.mark()
            proxy.wait_for(r"handed out but unused, regenerating", start=mark)
            second = proxy.wait_for(r"put (lost:\S+) at the tracker", start=mark).group(1)
            assert second != first
            session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                "lost", session_timeout=60
            )
            assert session.get_function("testing.echo")("again") == "again"
