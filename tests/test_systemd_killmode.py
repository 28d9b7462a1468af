"""``systemctl stop`` with the server unit's KillMode=mixed while a stock client is mid-call.

systemd sends SIGTERM to the main process only, waits up to TimeoutStopSec,
then SIGKILLs whatever is left in the unit's cgroup. The daemon must let the
running session finish within ``--grace``: the call in flight completes, so
does a next call, and when the client closes the daemon leaves by itself with
no process left for the final SIGKILL. (The bundle's old unit, without
KillMode=mixed, had the worker killed at once: the client's second call failed
with kShutdown.)
"""

from __future__ import annotations

import gc
import os
import signal
import threading

import psutil
import pytest
from tvm import rpc

from tests.server_support import server_env, start_server
from tests.support import running
from tvmrpc.systemd import units

pytestmark = pytest.mark.stock

INIT_MODULE = """
import time
import tvm_ffi

@tvm_ffi.register_global_func("tvmrpc_killmode.slow_echo", override=True)
def _slow_echo(value, seconds):
    print("tvmrpc_killmode: call started", flush=True)  # the zygote's stdout: the daemon logs it
    time.sleep(seconds)
    return value
"""


def _timeout_stop_sec() -> float:
    for line in units.shipped()["tvm-server@.service"].splitlines():
        if line.startswith("TimeoutStopSec="):
            return float(line.partition("=")[2])
    raise AssertionError("tvm-server@.service has no TimeoutStopSec")


def test_sigterm_to_the_main_process_lets_the_call_in_flight_complete(log_dir, tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    (init / "tvmrpc_killmode_init.py").write_text(INIT_MODULE)
    server = start_server(
        log_dir,
        "mixed",
        "--init",
        "tvmrpc_killmode_init",
        "--grace",
        "20",  # as the unit's ExecStart
        env=server_env(init),
    )
    with running(server):
        session = rpc.connect("127.0.0.1", server.port, key="mixed", session_timeout=120)
        slow_echo = session.get_function("tvmrpc_killmode.slow_echo")
        outcome: list[object] = []

        def call(function) -> None:
            try:
                outcome.append(function(42, 1.5))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome.append(exc)

        thread = threading.Thread(target=call, args=(slow_echo,), daemon=True)
        thread.start()
        server.wait_for(r"worker: tvmrpc_killmode: call started")
        # The unit's cgroup as systemd sees it: the daemon and everything below it.
        cgroup = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        assert cgroup, "no zygote or worker under the daemon"

        os.kill(server.proc.pid, signal.SIGTERM)  # KillMode=mixed: the main process only
        server.wait_for(r"Received SIGTERM")
        thread.join(60)
        assert outcome == [42]
        assert slow_echo(43, 0.1) == 43  # the session still runs within --grace
        del slow_echo, session
        gc.collect()  # the stock client closes its session when collected

        # The daemon leaves by itself, well before TimeoutStopSec...
        assert server.proc.wait(_timeout_stop_sec()) == -signal.SIGTERM
        server.wait_for(r"tvm-server stopped")
        # ... then systemd SIGKILLs what is left in the cgroup: nothing.
        left = [pid for pid in cgroup if psutil.pid_exists(pid) and _not_zombie(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == []
        assert "grace period over" not in server.output
        assert "worker exit 0" in server.output


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
