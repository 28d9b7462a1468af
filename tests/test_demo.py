"""``tvmrpc demo`` end to end, run as a newcomer runs it: a subprocess, its output read."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.support import run_module
from tvmrpc.demo import tracker_state

pytestmark = [pytest.mark.stock, pytest.mark.slow]

SUMMARY_ROW = re.compile(r"^  (\S+)\s+(tracker -> .+?)\s+(\d+) ms\s+(OK|WRONG|not run)$", re.M)
PID = re.compile(r"^  (\S+)\s+pid (\d+)", re.M)


def demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_module("tvmrpc.cli", "demo", *args, timeout=timeout, check=False)


def pids_in(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in PID.findall(output)}


def test_demo_runs_a_model_on_each_key_and_cleans_up(tmp_path: Path) -> None:
    done = demo("--log-dir", str(tmp_path / "logs"), "--direct-key", "dk", "--proxied-key", "pk")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"daemon logs go to {tmp_path / 'logs'}" in out
    rows = {key: (path, result) for key, path, _ms, result in SUMMARY_ROW.findall(out)}
    assert rows["dk"][0].startswith("tracker -> server 127.0.0.1:")
    assert re.fullmatch(r"tracker -> proxy 127\.0\.0\.1:\d+ -> server", rows["pk"][0])
    assert rows["dk"][1] == rows["pk"][1] == "OK"
    # the query table was shown while both servers were registered
    assert "server:dk" in out
    assert "server:proxy[pk]" in out
    assert "dk free 1 pending 0, pk free 1 pending 0" in out
    assert out.rstrip().endswith("tvmrpc demo: OK, every session's result matched numpy")
    # every daemon was stopped, and each left a log
    pids = pids_in(out.split("Stopping the daemons", 1)[1])
    assert set(pids) == {"tracker", "proxy", "server-direct", "server-proxied"}
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", name
        assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0


def test_busy_tracker_port_fails_naming_the_step(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = demo("--tracker-port", str(port), "--log-dir", str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED at step 'start the tracker (twistd tvm-tracker)'" in done.stdout
    assert "tracker cannot listen on tcp:" in done.stdout
    assert "proxy" not in pids_in(done.stdout)  # nothing after the failed step was started


def test_keep_leaves_daemons_running_and_says_how_to_stop_them(tmp_path: Path) -> None:
    done = demo("--keep", "--log-dir", str(tmp_path))
    out = done.stdout
    kept = pids_in(out.split("--keep:", 1)[-1])
    try:
        assert done.returncode == 0, out + done.stderr
        assert set(kept) == {"tracker", "proxy", "server-direct", "server-proxied"}
        port = int(re.search(r"tvmrpc query --host 127\.0\.0\.1 --port (\d+)", out).group(1))
        state = tracker_state.wait_until(
            ("127.0.0.1", port),
            lambda s: all(
                tracker_state.queue(s, k)[0] == 1 for k in ("demo-direct", "demo-proxied")
            ),
            30,
            "both servers registered again after the demo's sessions",
        )
        assert len(state["server_info"]) == 2
        stop = re.search(r"kill -TERM -- ((?:-\d+ ?)+)", out).group(1).split()
        assert sorted(-int(p) for p in stop) == sorted(kept.values())
    finally:
        for pid in kept.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    for name, pid in kept.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(15)
        assert not psutil.pid_exists(pid), name
