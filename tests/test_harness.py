"""The daemon harness itself: PYTHONPATH building, log following, waits, group stop, orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tvmrpc.harness import LIVE, DaemonError, Group, Process, running, wait_exit
from tvmrpc.harness.logwatch import LineReader
from tvmrpc.pythonpath import PACKAGE_ROOT, with_package_on_path

# -- PYTHONPATH (pure) -----------------------------------------------------------------


def test_package_first_once_and_the_rest_in_order() -> None:
    env = {"PYTHONPATH": f"/a::{PACKAGE_ROOT}:/b", "HOME": "/h"}
    got = with_package_on_path(env)
    assert got["PYTHONPATH"] == f"{PACKAGE_ROOT}:/a:/b"
    assert got["HOME"] == "/h"
    assert env["PYTHONPATH"] == f"/a::{PACKAGE_ROOT}:/b"  # the input is not changed


def test_package_last_only_when_absent() -> None:
    assert with_package_on_path({"PYTHONPATH": "/a"}, first=False)["PYTHONPATH"] == (
        f"/a:{PACKAGE_ROOT}"
    )
    already = {"PYTHONPATH": f"{PACKAGE_ROOT}:/a"}
    assert with_package_on_path(already, first=False)["PYTHONPATH"] == f"{PACKAGE_ROOT}:/a"
    assert with_package_on_path({})["PYTHONPATH"] == PACKAGE_ROOT


# -- following a log file --------------------------------------------------------------


def test_line_reader_returns_each_complete_line_once(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    reader = LineReader(path)
    assert reader.read() == []  # not there yet
    path.write_bytes(b"one\ntw")
    assert reader.read() == ["one"]
    with open(path, "ab") as log:
        log.write(b"o\nthree\r\nfour")
    assert reader.read() == ["two", "three"]
    assert reader.read(final=True) == ["four"]
    assert reader.read(final=True) == []


# -- processes -------------------------------------------------------------------------


def script(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_wait_for_wakes_on_a_line_written_later(tmp_path: Path) -> None:
    # The child blocks on a FIFO until the test writes to it, then logs: the
    # wait cannot have seen the line at its first look.
    go = tmp_path / "go"
    os.mkfifo(go)
    code = f"""
        import time
        print("started", flush=True)
        open({str(go)!r}).read()
        print("ready on 42", flush=True)
        time.sleep(600)
    """
    with running(Process(script(code), tmp_path / "a.log")) as proc:
        proc.wait_for("started")
        mark = proc.mark()
        go.write_text("go")
        assert proc.wait_for(r"ready on (\d+)", start=mark).group(1) == "42"
        assert proc.lines[0] == "started"
        assert proc.log_path.read_text().startswith("$ ")  # the command line heads the log
        assert "$ " not in proc.output  # ...but is not the daemon's output


def test_an_exit_fails_the_wait_at_once_with_the_log_tail(tmp_path: Path) -> None:
    proc = Process(script("print('about to fail'); raise SystemExit(3)"), tmp_path / "b.log")
    with pytest.raises(DaemonError, match=r"exited with status 3 before .*\n.*about to fail"):
        proc.wait_for("never logged", timeout=600)
    assert proc.stop() == 3
    assert proc.ended == "had already exited with status 3"


def test_a_failure_line_fails_the_wait_naming_it(tmp_path: Path) -> None:
    code = "import time; print('x cannot listen on tcp:1', flush=True); time.sleep(600)"
    with (
        running(Process(script(code), tmp_path / "c.log", name="thing")) as proc,
        pytest.raises(DaemonError, match=r"^thing cannot listen on tcp:1 \(see .*c\.log\)$"),
    ):
        proc.wait_listening(timeout=600)


def test_timeout_says_what_was_awaited(tmp_path: Path) -> None:
    code = "import time; print('hello', flush=True); time.sleep(600)"
    with running(Process(script(code), tmp_path / "d.log", name="slow")) as proc:
        proc.wait_for("hello")
        with pytest.raises(DaemonError, match=r"slow did not log 'nope' within 0\.2 s"):
            proc.wait_for("nope", timeout=0.2)


def test_stop_ends_the_whole_group_and_leaves_the_live_set(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM, and a child of it that would outlive it.
    code = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("child", child.pid, flush=True)
        time.sleep(600)
    """
    proc = Process(script(code), tmp_path / "e.log")
    assert proc in LIVE
    child = int(proc.wait_for(r"child (\d+)").group(1))
    assert os.getpgid(child) == proc.pid  # its own process group, led by it
    assert os.getsid(proc.pid) == proc.pid  # and its own session
    assert proc.stop(timeout=0.5) == -signal.SIGKILL
    assert proc.ended == "killed: still running 0.5 s after SIGTERM"
    assert proc not in LIVE
    assert wait_exit(child, 60)
    assert proc.stop() == -signal.SIGKILL  # again: harmless


def test_a_killed_parent_takes_its_daemons_with_it(tmp_path: Path) -> None:
    """SIGKILL to a test run (no cleanup runs) still ends the daemons it started."""
    code = f"""
        import sys, time
        from pathlib import Path
        from tvmrpc.harness import Process
        proc = Process([sys.executable, "-c", "import time; time.sleep(600)"],
                       Path({str(tmp_path / "child.log")!r}))
        print(proc.pid, flush=True)
        time.sleep(600)
    """
    with running(Process(script(code), tmp_path / "parent.log")) as parent:
        daemon = int(parent.wait_for(r"^(\d+)$").group(1))
        assert not wait_exit(daemon, 0)
        parent.proc.kill()  # the parent only: its daemon leads a group of its own
        assert wait_exit(daemon, 60)


def test_kept_daemons_outlive_their_parent(tmp_path: Path) -> None:
    """The demo's --keep: ``die_with_parent=False`` leaves the daemon running."""
    code = f"""
        import sys
        from pathlib import Path
        from tvmrpc.harness import Process
        proc = Process([sys.executable, "-c", "import time; time.sleep(600)"],
                       Path({str(tmp_path / "kept.log")!r}), die_with_parent=False)
        print(proc.pid, flush=True)
    """
    done = subprocess.run(script(code), capture_output=True, text=True, timeout=60, check=True)
    kept = int(done.stdout.strip())
    try:
        # With die_with_parent the kernel's SIGTERM went out as the parent exited.
        assert not wait_exit(kept, 2)
    finally:
        os.killpg(kept, signal.SIGKILL)


def test_two_live_processes_never_share_a_log(tmp_path: Path) -> None:
    code = "import sys, time; print(sys.argv[1], flush=True); time.sleep(600)"
    first = Process([*script(code), "first"], tmp_path / "same.log")
    second = Process([*script(code), "second"], tmp_path / "same.log")
    with running(first), running(second):
        assert second.log_path == tmp_path / "same-2.log"
        assert second.wait_for("first|second").group(0) == "second"
        assert first.wait_for("first|second").group(0) == "first"
    again = Process([*script(code), "again"], tmp_path / "same.log")  # the name is free again
    with running(again):
        assert again.log_path == tmp_path / "same.log"
        assert again.wait_for("first|second|again").group(0) == "again"  # not the old lines


def test_importing_the_harness_starts_nothing_heavy() -> None:
    """The bench and the demo import it before anything else: no Twisted, no tvm."""
    code = "import sys, tvmrpc.harness; print([m for m in ('twisted', 'tvm') if m in sys.modules])"
    done = subprocess.run(script(code), capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_a_group_stops_newest_first(tmp_path: Path) -> None:
    code = "import time; print('up', flush=True); time.sleep(600)"
    group = Group(tmp_path)
    first, second = group.start("first", script(code)), group.start("second", script(code))
    assert (first.log_path.name, second.log_path.name) == ("first.log", "second.log")
    second.wait_for("up")
    assert group.stop() == [second, first]
    assert [proc.ended for proc in (first, second)] == ["stopped on SIGTERM"] * 2
