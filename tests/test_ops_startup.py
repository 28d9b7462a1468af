"""Starting the daemons wrong (or the stock way): one line, exit 1, or it just works.

Real ``twistd -n`` daemons; stock clients and stock query where one applies.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import pytest
from tvm import rpc

from tests.support import (
    Daemon,
    Process,
    free_port,
    run_module,
    running,
    start_tracker,
    stock_tracker_socket,
    subprocess_env,
)
from tvmrpc.codec import RPC_MAGIC

pytestmark = pytest.mark.stock

EXIT_TIMEOUT = 60


def exits(daemon: Process) -> int:
    """Wait for the daemon to end by itself; its exit status."""
    status = daemon.proc.wait(EXIT_TIMEOUT)
    daemon.stop()  # joins the reader: ``output`` is complete
    return status


def error_lines(output: str) -> list[str]:
    """Lines that report a problem (log errors/warnings, stderr one-liners, tracebacks)."""
    return [
        line
        for line in output.splitlines()
        if re.search(r"#error\]|#critical\]|Traceback|^tvm-\w+: |Error:", line)
    ]


def holding_port() -> socket.socket:
    """A loopback port held (bound and listening) by the test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_port_in_use_exits_1_with_one_line_naming_the_port(log_dir):
    with holding_port() as held:
        port = held.getsockname()[1]
        daemon = Daemon(
            "tvm-tracker", ["--host", "127.0.0.1", "--port", str(port)], log_dir / "busy.log"
        )
        assert exits(daemon) == 1
    errors = error_lines(daemon.output)
    assert len(errors) == 1, daemon.output
    # --port alone tries that port only: the range named is the one tried.
    assert re.search(
        rf"tvm-tracker cannot listen: port {port} on 127\.0\.0\.1: .*Address already in use; "
        r"stop what holds it or choose another --port/--port-end",
        errors[0],
    ), errors[0]


def test_busy_first_port_is_a_warning_and_silent_hides_info(log_dir):
    """--silent (stock's flag): the warning about the moved port shows, info lines do not."""
    with holding_port() as held:
        port = held.getsockname()[1]
        args = [
            "--silent",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 20),
        ]
        with running(Daemon("tvm-tracker", args, log_dir / "moved.log")) as daemon:
            match = daemon.wait_for(
                rf"#warn\] tvm-tracker: port {port} is in use; took port (\d+) instead"
            )
            taken = int(match.group(1))
            assert port < taken < port + 20
            # A stock client is served on the port the warning named.
            summary = rpc.connect_tracker("127.0.0.1", taken).summary()
            assert summary["queue_info"] == {}
        output = daemon.output
    assert "#info]" not in output, output
    assert "listening on" not in output  # an info line, hidden by --silent


def test_bad_endpoint_string_exits_1_with_one_line(log_dir):
    daemon = Daemon("tvm-tracker", ["--listen", "bogus:1234"], log_dir / "bogus.log")
    assert exits(daemon) == 1
    assert daemon.output.strip().splitlines()[-1] == (
        "tvm-tracker: bad --listen endpoint 'bogus:1234': Unknown endpoint type: 'bogus' "
        "(examples: tcp:9190:interface=0.0.0.0, unix:/run/tvm.sock)"
    )
    assert "Traceback" not in daemon.output


def hiding(tmp_path: Path, *modules: str) -> dict[str, str]:
    """A child environment in which ``modules`` cannot be imported (as if not installed)."""
    blocked = tmp_path / "hidden-modules"
    blocked.mkdir()
    for name in modules:
        (blocked / f"{name}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n"
        )
    env = subprocess_env()
    env["PYTHONPATH"] = f"{blocked}:{env['PYTHONPATH']}"
    return env


def test_web_port_without_autobahn_names_the_extra(log_dir, tmp_path):
    daemon = Daemon(
        "tvm-proxy",
        ["--listen", "tcp:0:interface=127.0.0.1", "--web-port", "0"],
        log_dir / "noautobahn.log",
        env=hiding(tmp_path, "autobahn"),
    )
    assert exits(daemon) == 1
    assert daemon.output.strip().splitlines()[-1] == (
        "tvm-proxy: --web-port needs the websocket extra: pip install 'tvmrpc[websocket]'"
    )
    assert "Traceback" not in daemon.output


def test_ssl_endpoint_without_pyopenssl_names_the_package(log_dir, tmp_path):
    daemon = Daemon(
        "tvm-tracker",
        ["--listen", "ssl:0:privateKey=key.pem"],
        log_dir / "nossl.log",
        env=hiding(tmp_path, "OpenSSL"),
    )
    assert exits(daemon) == 1
    last = daemon.output.strip().splitlines()[-1]
    assert last.startswith("tvm-tracker: --listen 'ssl:0:privateKey=key.pem' needs TLS support")
    assert "pip install pyOpenSSL" in last
    assert "Traceback" not in daemon.output


def test_tracker_on_a_unix_socket_serves_our_query(log_dir, tmp_path):
    path = tmp_path / "tracker.sock"
    with running(Daemon("tvm-tracker", ["--listen", f"unix:{path}"], log_dir / "unix.log")) as d:
        d.wait_for(rf"tvm-tracker listening on unix:{re.escape(str(path))}$")
        # A board registers over the UNIX socket (stock wire, raw socket) ...
        with socket.socket(socket.AF_UNIX) as board:
            board.connect(str(path))
            board.sendall(struct.pack("<i", 0x2F271))
            assert struct.unpack("<i", board.recv(4))[0] == 0x2F271
            frame = b'[3, "unixboard", [9090, "unixboard:1"], "10.0.0.5"]'
            board.sendall(struct.pack("<i", len(frame)) + frame)
            assert board.recv(100) == struct.pack("<i", 1) + b"0"
            # ... and our query reads the tracker's state over it.
            out = run_module("tvmrpc.cli", "query", "--host", f"unix:{path}", "--json").stdout
        assert '"unixboard"' in out
        assert '"free": 1' in out


def test_proxy_on_a_unix_socket_pairs_and_forwards(log_dir, tmp_path):
    path = tmp_path / "proxy.sock"
    with running(Daemon("tvm-proxy", ["--listen", f"unix:{path}"], log_dir / "unixp.log")) as d:
        d.wait_for(rf"tvm-proxy listening on unix:{re.escape(str(path))}$")
        server, client = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        with server, client:
            for sock, key in ((server, b"server:dev"), (client, b"client:dev")):
                sock.settimeout(30)
                sock.connect(str(path))
                sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            for sock, peer in ((server, b"client:dev"), (client, b"server:dev")):
                head = sock.recv(8)
                assert struct.unpack("<ii", head) == (RPC_MAGIC, len(peer))
                assert sock.recv(len(peer)) == peer
            client.sendall(b"ping over unix")
            assert server.recv(100) == b"ping over unix"


def test_proxy_accepts_stock_example_rpc_with_a_warning(log_dir):
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--example-rpc", "1"]
    with running(Daemon("tvm-proxy", args, log_dir / "example.log")) as proxy:
        proxy.wait_for(r"#warn\] --example-rpc is accepted for stock compatibility and ignored")
        port = int(proxy.wait_for(r"tvm-proxy listening on \S+:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            pass


def test_query_honours_tvm_tracker_host_and_port_like_stock(log_dir):
    with (
        running(start_tracker(log_dir)) as tracker,
        stock_tracker_socket(tracker.port) as board,
    ):
        for frame in (
            b'[5, {"key": "server:envboard", "addr": [null, 9090]}]',
            b'[3, "envboard", [9090, "envboard:1"], null]',
        ):
            board.sendall(struct.pack("<i", len(frame)) + frame)
            assert board.recv(100) == struct.pack("<i", 1) + b"0"
        env = subprocess_env(
            {"TVM_TRACKER_HOST": "127.0.0.1", "TVM_TRACKER_PORT": str(tracker.port)}
        )
        ours = run_module("tvmrpc.cli", "query", env=env, check=False)
        stock = run_module("tvm.exec.query_rpc_tracker", env=env, check=False)
    assert ours.returncode == 0, ours.stderr
    assert f"Tracker address 127.0.0.1:{tracker.port}" in ours.stdout
    assert "envboard" in ours.stdout
    assert ours.stdout == stock.stdout


def test_port_end_not_above_port_is_refused(log_dir):
    port = free_port()
    daemon = Daemon(
        "tvm-tracker", ["--port", str(port), "--port-end", str(port)], log_dir / "range.log"
    )
    assert exits(daemon) == 1
    assert f"--port-end ({port}) must be greater than --port ({port})" in daemon.output
