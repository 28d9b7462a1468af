"""SIGHUP reopens the log file and the daemon keeps serving (tracker, proxy, server)."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from tvm import rpc

from tests.proxy_support import start_proxied_server, start_proxy
from tests.server_support import start_server
from tests.support import LISTENING, Process, running, subprocess_env
from tvmrpc.harness import twistd_argv

pytestmark = pytest.mark.stock


def test_tracker_reopens_its_log_file_after_rotation(log_dir, tmp_path):
    """What logrotate does: rename the file, SIGHUP; new lines go to a new file at the path."""
    log_file = tmp_path / "tracker.log"
    argv = twistd_argv("tvm-tracker", "--listen", "tcp:0:interface=127.0.0.1")
    argv.insert(argv.index("tvm-tracker"), f"--logfile={log_file}")
    tracker = Process(argv, log_dir / "tracker.out")
    log_file.touch()
    # tail -F follows the path across the rename: the test waits on its lines, not on time.
    tail = Process(["tail", "-F", "-n", "+1", str(log_file)], log_dir / "tail.out")
    with running(tracker), running(tail):
        port = int(tail.wait_for(LISTENING).group(2))
        assert rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"] == {}
        rotated = tmp_path / "tracker.log.1"
        log_file.rename(rotated)
        mark = tail.mark()
        tracker.signal(signal.SIGHUP)
        tail.wait_for(rf"SIGHUP: reopened log file {log_file}; still serving", start=mark)
        # Still serving a stock client, still logging to the new file.
        assert rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"] == {}
        assert tracker.proc.poll() is None
        new_text = log_file.read_text()
        old_text = rotated.read_text()
    assert "SIGHUP: reopened" in new_text
    assert "listening on" not in new_text
    assert "listening on" in old_text
    assert "SIGHUP" not in old_text


def test_proxy_and_server_survive_sighup_without_a_log_file(log_dir):
    """Under ``-n`` the log is stdout: nothing to reopen, and the daemon keeps serving."""
    with running(start_proxy(log_dir)) as proxy, running(start_server(log_dir, "hup")) as server:
        for daemon in (proxy, server):
            mark = daemon.mark()
            daemon.signal(signal.SIGHUP)
            daemon.wait_for(r"SIGHUP: no log file to reopen .*; still serving", start=mark)
        with running(start_proxied_server(log_dir, proxy, "viaproxy")):
            session = rpc.connect("127.0.0.1", proxy.port, key="viaproxy", session_timeout=60)
            assert session.get_function("testing.echo")(7) == 7
            del session
        session = rpc.connect("127.0.0.1", server.port, key="hup", session_timeout=60)
        assert session.get_function("testing.echo")(8) == 8
        del session
        assert proxy.proc.poll() is None
        assert server.proc.poll() is None


def test_daemonized_tracker_survives_sighup(tmp_path):
    """Without -n (a daemon with a pidfile, as init scripts run it) SIGHUP used to kill it."""
    log_file, pid_file = tmp_path / "d.log", tmp_path / "d.pid"
    argv = [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        f"--pidfile={pid_file}",
        f"--logfile={log_file}",
        "tvm-tracker",
        "--listen",
        "tcp:0:interface=127.0.0.1",
    ]
    log_file.touch()
    tail = Process(["tail", "-F", "-n", "+1", str(log_file)], tmp_path / "tail.out")
    with running(tail):
        launcher = Process(argv, tmp_path / "launcher.out", env=subprocess_env())
        try:
            assert launcher.proc.wait(60) == 0  # the parent returns once the daemon started
            port = int(tail.wait_for(LISTENING).group(2))
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGHUP)
            tail.wait_for(r"SIGHUP: reopened log file")
            assert rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"] == {}
            assert pid_file.exists()  # still the running daemon's
        finally:
            if pid_file.exists():  # never leave the daemon behind, whatever failed
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        tail.wait_for(r"Server Shut Down")
