"""Tracker links say what is wrong: a non-tracker target, an unreachable one, and a clean stop.

Our proxy (and once our server) registers at ``--tracker``; the targets are an
HTTP server, a socket that never answers, a peer that greets with a banner,
and nothing at all, then our tracker.
"""

from __future__ import annotations

import re
import signal
import socket
import sys

import pytest

from tests.proxy_support import start_proxy
from tests.server_support import start_server
from tests.support import Daemon, Process, free_port, run_module, running

pytestmark = pytest.mark.stock

#: The link's magic timeout is 5 s; the warning must come within it (plus slack for CI).
WARN_WITHIN = 30


def assert_clean_stop(daemon: Process) -> None:
    # twistd re-raises SIGTERM on itself after a clean shutdown: -15 is the clean status.
    assert daemon.stop() in (0, -signal.SIGTERM)
    for bad in ("Unhandled Error", "NoTransition", "Traceback", "Scheduling retry"):
        assert bad not in daemon.output, daemon.output


def not_a_tracker(port: int, reason: str = "") -> str:
    """The link's warning about 127.0.0.1:PORT, a regex; ``reason`` (a regex) follows it."""
    return rf"#warn\] tracker 127\.0\.0\.1:{port} is not a TVM tracker" + (
        f": {reason}" if reason else ""
    )


def proxy_at(log_dir, port: int) -> Daemon:
    """Our proxy registering at 127.0.0.1:PORT."""
    return start_proxy(log_dir, "--tracker", f"127.0.0.1:{port}")


def test_http_server_is_named_not_a_tvm_tracker(log_dir):
    port = free_port()
    http = Process(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        log_dir / "http.log",
    )
    with running(http):
        http.wait_for(r"Serving HTTP")
        with running(proxy_at(log_dir, port)) as proxy:
            reason = r"no answer to the magic within 5 s; retrying in [\d.]+ s"
            proxy.wait_for(not_a_tracker(port, reason), WARN_WITHIN)
        assert_clean_stop(proxy)


def test_banner_peer_is_named_not_a_tvm_tracker(log_dir):
    port = free_port()
    banner = Process(
        [
            sys.executable,
            "-c",
            "import socket\n"
            f"s = socket.create_server(('127.0.0.1', {port}))\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(b'SSH-2.0-OpenSSH_9.2\\r\\n')\n",
        ],
        log_dir / "banner.log",
    )
    with running(banner):
        banner.wait_for("ready")
        with running(proxy_at(log_dir, port)) as proxy:
            proxy.wait_for(not_a_tracker(port, r"it answered b'SSH-' to the magic"), WARN_WITHIN)


def test_silent_socket_is_named_and_stopping_meanwhile_is_clean(log_dir):
    """A socket that accepts and never answers (a firewall, a hung process)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes connections; nobody reads them
        port = silent.getsockname()[1]
        with running(proxy_at(log_dir, port)) as proxy:
            proxy.wait_for(not_a_tracker(port, "no answer to the magic within 5 s"), WARN_WITHIN)
            # Stopped while the next attempt hangs in the magic: no unhandled error.
        assert_clean_stop(proxy)


def test_server_registrar_names_a_silent_tracker(log_dir):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        server = start_server(log_dir, "board", "--tracker", f"127.0.0.1:{port}")
        with running(server):
            server.wait_for(not_a_tracker(port), WARN_WITHIN)
        assert_clean_stop(server)


def test_unreachable_tracker_warned_once_then_rate_limited(log_dir):
    """Refused, then a peer that hangs up (4 more failures): one warning in all; then the
    real tracker comes up and the proxy registers, saying how many attempts failed."""
    port = free_port()
    proxy = start_proxy(log_dir, "--tracker", f"127.0.0.1:{port}")
    with running(proxy):
        proxy.wait_for(
            rf"#warn\] tracker 127\.0\.0\.1:{port} is unreachable: connection refused; "
            r"retrying in [\d.]+ s \(further failures are logged at most once a minute\)",
            WARN_WITHIN,
        )
        with socket.create_server(("127.0.0.1", port)) as hangup:
            hangup.settimeout(WARN_WITHIN)
            for _ in range(4):  # four more failed attempts, each seen here
                conn, _ = hangup.accept()
                conn.close()
        tracker = Daemon(
            "tvm-tracker", ["--host", "127.0.0.1", "--port", str(port)], log_dir / "tracker.log"
        )
        with running(tracker):
            tracker.wait_listening()
            mark_line = proxy.wait_for(
                rf"tracker 127\.0\.0\.1:{port} answered after (\d+) failed attempts", 60
            )
            proxy.wait_for(r"connected to tracker 127\.0\.0\.1")
    failed = int(mark_line.group(1))
    warnings = [
        line
        for line in proxy.output.splitlines()
        if re.search(rf"#warn\] tracker 127\.0\.0\.1:{port}", line)
    ]
    print(f"{failed} failed attempts, {len(warnings)} warning line(s)")
    assert failed >= 5
    assert len(warnings) == 1, warnings


def test_query_names_a_silent_socket_not_a_tvm_tracker():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        result = run_module(
            "tvmrpc.cli", "query", "--port", str(port), "--timeout", "4", check=False
        )
    assert result.returncode == 1
    assert result.stderr == (
        f"tvmrpc query: cannot query tracker at 127.0.0.1:{port}: "
        "not a TVM tracker: no answer to the magic within 2 s\n"
    )
