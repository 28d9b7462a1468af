"""A stock WebSocket RPC server at our proxy's /ws, paired with a stock TCP client."""

from __future__ import annotations

import urllib.request

import pytest
from tvm import rpc

from tests.proxy_support import start_proxy, start_websocket_server
from tests.support import running

pytestmark = pytest.mark.stock


def test_websocket_server_and_tcp_client(log_dir, tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<script>connect('ws://localhost:9190/ws')</script>")
    asset = tmp_path / "runtime.js"
    asset.write_text("// js")
    with running(
        start_proxy(
            log_dir, "--index-page", str(page), "--resource-files", f"/dist={asset}", web=True
        )
    ) as proxy:
        url = f"ws://127.0.0.1:{proxy.web_port}/ws"
        with running(start_websocket_server(log_dir, url, "wasm")):
            proxy.wait_for(r"ws \S+ waits as server wasm")
            session = rpc.connect("127.0.0.1", proxy.port, key="wasm", session_timeout=60)
            echo = session.get_function("testing.echo")
            assert echo("over a websocket") == "over a websocket"
            assert echo(b"\x00\xff" * 50_000) == b"\x00\xff" * 50_000
            del echo, session
        base = f"http://127.0.0.1:{proxy.web_port}"
        with urllib.request.urlopen(f"{base}/", timeout=30) as reply:
            assert f"ws://localhost:{proxy.web_port}/ws".encode() in reply.read()
        with urllib.request.urlopen(f"{base}/dist/runtime.js", timeout=30) as reply:
            assert reply.read() == b"// js"
