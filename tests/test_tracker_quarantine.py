"""Quarantine end to end: our servers report crashes, our tracker stops handing out
the board that keeps failing, and a healthy board of the same key keeps serving.

Stock clients drive the sessions; a packed function from an --init module
segfaults the session's worker (our server then runs a health check, passes
it, and registers again with its report).
"""

from __future__ import annotations

import gc

import pytest
from tvm import rpc

from tests.server_support import init_module_dir, server_env, start_server
from tests.status_support import STATUS_FLAG, status, status_port
from tests.support import running, start_tracker

pytestmark = pytest.mark.stock

KEY = "flaky"


def boards(port: int) -> dict[str, dict]:
    return {b["address"]: b for b in status(port)["boards"] if b["key"] == KEY}


def test_three_crashes_quarantine_a_board_and_a_healthy_one_keeps_serving(log_dir, tmp_path):
    path, module = init_module_dir(tmp_path / "init")
    tracker = start_tracker(log_dir, *STATUS_FLAG)
    with running(tracker):
        web = status_port(tracker)
        addr = f"127.0.0.1:{tracker.port}"
        flaky = start_server(
            log_dir, KEY, "--tracker", addr, "--init", module, name="flaky", env=server_env(path)
        )
        with running(flaky):
            tracker.wait_for(rf"server:{KEY} registered")
            (flaky_board,) = boards(web)
            for crash in range(1, 4):
                mark = flaky.mark()
                session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                    KEY, session_timeout=60
                )
                with pytest.raises(Exception):  # noqa: B017, PT011 - the connection just dies
                    session.get_function("tvmrpc_test.segfault")()
                del session
                gc.collect()
                flaky.wait_for(r"board ready: health check passed", start=mark)
                print(f"crash {crash}: health check passed, the board registers again")
            tracker.wait_for(rf"board {flaky_board}.* quarantined after 3 failed sessions in a row")
            doc = boards(web)[flaky_board]
            print(f"flaky board after three crashes: {doc['state']}, failures {doc['failures']}")
            assert doc["state"] == "quarantined"
            assert doc["failures"] == ["crashed"] * 3

            healthy = start_server(log_dir, KEY, "--tracker", addr, name="healthy")
            with running(healthy):
                mark = flaky.mark()
                for _ in range(2):
                    session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                        KEY, session_timeout=60
                    )
                    session.upload(bytearray(b"fine"), "f")
                    assert bytes(session.download("f")) == b"fine"
                    held = boards(web)
                    assert held[flaky_board]["state"] == "quarantined"
                    (healthy_board,) = [a for a in held if a != flaky_board]
                    assert held[healthy_board]["state"] == "busy"
                    del session
                    gc.collect()
                assert not [line for line in flaky.lines[mark:] if "session started" in line]


def test_drained_board_finishes_its_session_and_stays_out_across_a_restart(log_dir, tmp_path):
    import subprocess
    import sys

    from tvm.rpc import base

    from tests.support import free_port, stock_tracker_socket, subprocess_env

    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    tracker = start_tracker(log_dir, *STATUS_FLAG, "--admin-token-file", str(token))
    with running(tracker):
        web = status_port(tracker)
        port = free_port()
        board_args = ("--listen", f"tcp:{port}:interface=127.0.0.1", "--tracker")
        board_args += (f"127.0.0.1:{tracker.port}",)

        def labctl(action: str, board: str) -> None:
            subprocess.run(
                [sys.executable, "-m", "tvmrpc.cli", action, "--tracker-status",
                 f"http://127.0.0.1:{web}", "--token-file", str(token), board],
                env=subprocess_env(), check=True, timeout=60, capture_output=True,
            )  # fmt: skip

        first = start_server(log_dir, KEY, *board_args, name="drained-1", listen=False)
        with running(first):
            tracker.wait_for(rf"server:{KEY} registered")
            session = rpc.connect_tracker("127.0.0.1", tracker.port).request(
                KEY, session_timeout=60
            )
            (board,) = boards(web)
            labctl("drain", board)
            assert boards(web)[board]["state"] == "draining"
            session.upload(bytearray(b"still mine"), "f")  # the running session goes on
            assert bytes(session.download("f")) == b"still mine"
            mark = tracker.mark()
            del session
            gc.collect()
            tracker.wait_for(rf"session on {KEY} board", start=mark)
            waiter = stock_tracker_socket(tracker.port)
            base.sendjson(waiter, [base.TrackerCode.REQUEST, KEY, "patient", 1])
            base.sendjson(waiter, [base.TrackerCode.PING])
            assert base.recvjson(waiter) == base.TrackerCode.SUCCESS  # REQUEST still waits
            assert boards(web)[board]["state"] == "maintenance"
        # the board's server restarts and registers again: it stays out of service
        mark = tracker.mark()
        second = start_server(log_dir, KEY, *board_args, name="drained-2", listen=False)
        with running(second):
            tracker.wait_for(rf"server:{KEY} registered", start=mark)
            base.sendjson(waiter, [base.TrackerCode.PING])
            assert base.recvjson(waiter) == base.TrackerCode.SUCCESS
            assert boards(web)[board]["state"] == "maintenance"
            assert status(web)["queues"][KEY]["waiting"][0]["user"] == "patient"
            labctl("resume", board)
            reply = base.recvjson(waiter)
            assert reply[0] == base.TrackerCode.SUCCESS
            assert reply[1][:2] == ["127.0.0.1", port]
            waiter.close()
