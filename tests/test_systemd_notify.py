"""Type=notify: what each daemon sends to NOTIFY_SOCKET (READY, STATUS, WATCHDOG, STOPPING).

Pure parts with plain calls; the notifier against a real datagram socket on
a fake clock; then each daemon as a subprocess with a NOTIFY_SOCKET this
test listens on, as systemd would.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct

import pytest
from tvm import rpc
from twisted.internet.task import Clock

from tests.support import Daemon, free_port, running, stock_tracker_socket
from tests.systemd_support import NotifyListener, stock_env
from tvmrpc.systemd import notify

#: twistd ends by re-raising the signal that stopped it; systemd counts SIGTERM as clean.
STOPPED_BY_SIGTERM = -signal.SIGTERM

# -- pure ----------------------------------------------------------------------------


def test_socket_address_path_and_abstract():
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify.socket_address("@private/notify") == b"\0private/notify"
    with pytest.raises(notify.NotifyConfigError, match="path or start with '@'"):
        notify.socket_address("relative/notify")


def test_message_is_key_value_lines_without_embedded_newlines():
    assert notify.message(ready=1, status="listening on ::1:9190") == (
        b"READY=1\nSTATUS=listening on ::1:9190"
    )
    assert notify.message(status="two\nlines") == b"STATUS=two lines"


def test_watchdog_interval_is_half_the_timeout_for_this_pid_only():
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert notify.watchdog_interval({}, 42) is None
    with pytest.raises(notify.NotifyConfigError, match="microseconds"):
        notify.watchdog_interval({"WATCHDOG_USEC": "soon"}, 42)


def test_without_notify_socket_nothing_is_sent_and_nothing_runs():
    clock = Clock()
    env = {"WATCHDOG_USEC": "1000000"}
    notifier = notify.Notifier.from_environment(clock, env)
    assert not notifier.enabled
    assert notifier.send(ready=1) is False
    notifier.ready("listening")
    notifier.start_watchdog()
    assert clock.getDelayedCalls() == []


def test_bad_notify_socket_disables_notifications(tmp_path):
    notifier = notify.Notifier.from_environment(Clock(), {"NOTIFY_SOCKET": "notify.sock"})
    assert not notifier.enabled


# -- the notifier on a real socket -------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_ready_once_status_on_change_and_watchdog_on_the_clock(tmp_path, abstract):
    listener = NotifyListener(tmp_path, abstract=abstract)
    clock = Clock()
    env = listener.env(WATCHDOG_USEC="4000000", WATCHDOG_PID=str(os.getpid()))
    notifier = notify.Notifier.from_environment(clock, env)
    try:
        assert env == {}  # consumed: children do not inherit it
        assert notifier.watchdog_every == 2.0
        notifier.ready("listening on 127.0.0.1:1")
        notifier.ready("listening on 127.0.0.1:1")  # READY only once
        notifier.status("listening on 127.0.0.1:1")  # unchanged: not sent
        notifier.status("session running for client:k")
        notifier.start_watchdog()  # pings at once, then every 2 s
        clock.advance(2.0)
        clock.advance(2.0)
        notifier.stopping()
        notifier.stopping()
        got = listener.pending()
        assert got == [
            {"READY": "1", "STATUS": "listening on 127.0.0.1:1"},
            {"STATUS": "session running for client:k"},
            {"WATCHDOG": "1"},
            {"WATCHDOG": "1"},
            {"WATCHDOG": "1"},
            {"STOPPING": "1", "STATUS": "stopping"},
        ]
        notifier.stop_watchdog()
        assert clock.getDelayedCalls() == []
    finally:
        listener.close()


def test_listening_status_names_ip_and_unix_addresses():
    from twisted.internet.address import IPv4Address, UNIXAddress

    class Port:
        def __init__(self, address):
            self.address = address

        def getHost(self):
            return self.address

    assert notify.listening_status(Port(IPv4Address("TCP", "10.0.0.1", 9190))) == (
        "listening on 10.0.0.1:9190"
    )
    assert notify.listening_status(Port(UNIXAddress(b"/run/tvm/tracker.sock"))) == (
        "listening on unix:/run/tvm/tracker.sock"
    )


def test_unreachable_manager_is_logged_not_raised(tmp_path):
    notifier = notify.Notifier(Clock(), str(tmp_path / "nobody-listens"))
    assert notifier.send(ready=1) is False


# -- the daemons ---------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path):
    sock = NotifyListener(tmp_path)
    yield sock
    sock.close()


def _daemon(plugin, args, log_dir, listener, name, **env):
    return Daemon(plugin, args, log_dir / f"{name}.log", env=stock_env(**listener.env(**env)))


def test_tracker_ready_when_listening_watchdog_and_stopping_on_sigterm(log_dir, listener):
    tracker = _daemon(
        "tvm-tracker",
        ["--listen", "tcp:0:interface=127.0.0.1"],
        log_dir,
        listener,
        "tracker",
        WATCHDOG_USEC="400000",
    )
    with running(tracker):
        ready = listener.wait_for("READY")
        port = tracker.wait_listening()
        assert ready["STATUS"] == f"listening on 127.0.0.1:{port}"
        # READY means served: a stock-wire tracker connection is answered now.
        sock = stock_tracker_socket(port)
        sock.close()
        pings = sum(1 for m in listener.messages if m.get("WATCHDOG") == "1")
        while pings < 3:  # every 0.2 s (half of WATCHDOG_USEC)
            message = listener.receive(10)
            assert message is not None, f"WATCHDOG=1 stopped after {pings}: {listener.messages}"
            pings += message.get("WATCHDOG") == "1"
        os.kill(tracker.proc.pid, signal.SIGTERM)
        stopping = listener.wait_for("STOPPING")
        assert stopping["STATUS"] == "stopping"
        assert tracker.proc.wait(30) == STOPPED_BY_SIGTERM


def test_proxy_ready_when_listening_and_stopping(log_dir, listener):
    proxy = _daemon(
        "tvm-proxy", ["--listen", "tcp:0:interface=127.0.0.1"], log_dir, listener, "proxy"
    )
    with running(proxy):
        ready = listener.wait_for("READY")
        port = int(proxy.wait_for(r"tvm-proxy listening on \S+:(\d+)").group(1))
        assert ready["STATUS"] == f"listening on 127.0.0.1:{port}"
        assert not [m for m in listener.pending() if "WATCHDOG" in m]  # not asked for
        os.kill(proxy.proc.pid, signal.SIGTERM)
        listener.wait_for("STOPPING")
        assert proxy.proc.wait(30) == STOPPED_BY_SIGTERM


def _summary(port: int) -> dict:
    sock = stock_tracker_socket(port)
    try:
        payload = json.dumps([6]).encode()
        sock.sendall(struct.pack("<i", len(payload)) + payload)
        size = struct.unpack("<i", _recv(sock, 4))[0]
        return json.loads(_recv(sock, size))
    finally:
        sock.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "tracker closed"
        data += chunk
    return data


@pytest.mark.stock
def test_server_ready_only_once_registered_with_a_real_tracker(log_dir, listener):
    tracker_port = free_port()
    server = _daemon(
        "tvm-server",
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--key",
            "notified",
            "--tracker",
            f"127.0.0.1:{tracker_port}",
        ],
        log_dir,
        listener,
        "server",
    )
    with running(server):
        server.wait_listening()
        server.wait_for(r"worker zygote \d+ warm")
        # Listening and warm, but no tracker yet: not ready.
        assert not [m for m in listener.pending() if "READY" in m]
        late_tracker = Daemon(
            "tvm-tracker",
            ["--listen", f"tcp:{tracker_port}:interface=127.0.0.1"],
            log_dir / "tracker.log",
        )
        with running(late_tracker) as tracker:
            tracker.wait_listening()
            ready = listener.wait_for("READY")
            assert (
                ready["STATUS"]
                == f"registered with tracker 127.0.0.1:{tracker_port} as server:notified"
            )
            summary = _summary(tracker_port)[1]
            assert summary["queue_info"]["notified"]["free"] == 1
            assert any(s["key"] == "server:notified" for s in summary["server_info"])

            # A stock client's session shows up as a status line, and idle again after it.
            session = rpc.connect_tracker("127.0.0.1", tracker_port).request(
                "notified", session_timeout=60
            )
            assert session.get_function("tvm.rpc.server.workpath")(".")
            listener.wait_for("STATUS", "session running for 127.0.0.1:", prefix=True)
            del session
            gc.collect()  # the stock client closes its session when collected
            listener.wait_for("STATUS", "idle after 1 sessions")
            os.kill(server.proc.pid, signal.SIGTERM)
            listener.wait_for("STOPPING")
            assert server.proc.wait(60) == STOPPED_BY_SIGTERM


@pytest.mark.stock
def test_server_through_a_proxy_is_ready_once_it_waits_there(log_dir, listener):
    from tests.proxy_support import start_proxy

    with running(start_proxy(log_dir)) as proxy:
        server = _daemon(
            "tvm-server",
            ["--through-proxy", "--host", "127.0.0.1", "--port", str(proxy.port), "--key", "far"],
            log_dir,
            listener,
            "server",
        )
        with running(server):
            ready = listener.wait_for("READY")
            assert ready["STATUS"] == f"waiting at proxy 127.0.0.1:{proxy.port} as server:far"
            proxy.wait_for(r"waits as server far\b")
            session = rpc.connect("127.0.0.1", proxy.port, key="far", session_timeout=60)
            assert session.get_function("tvm.rpc.server.workpath")(".")
            listener.wait_for("STATUS", "session running for client:far via proxy", prefix=True)
            del session
            gc.collect()
            listener.wait_for("STATUS", "idle after 1 sessions")
