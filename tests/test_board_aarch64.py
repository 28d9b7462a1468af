"""The seed's whole journey with the board emulated: an arm64 Debian chroot as board C.

Tracker and proxy run on the lab host (namespace B of tests/netns.py); the
board is an arm64 root filesystem (mmdebstrap, cached) in namespace C, which
reaches only B, its programs run by qemu-user through binfmt_misc. The
bundle is made with the project's own ``python -m crossbuild bundle
--from-wheel`` and installed on the board offline by its ``install.sh``; the
installed ``tvm-server`` registers through B's proxy (and, in a second case,
with the tracker directly). A stock client compiles a relax MLP for aarch64
on the host, requests the key, runs it on the board, checks it against numpy
and times it with ``time_evaluator``; then the board's server gets SIGTERM
and must leave no process on the board.

A reaches only B, so the directly registered server (whose address the
tracker hands out as C's) is requested from B, the lab host, where C is
reachable; the proxied one from A, as a developer would.

Caches (keyed by their inputs, in pytest's cache directory, which pytest.ini
puts outside the checkout so a fresh clone reuses them): the root filesystem
tarball and the board's wheels (the 95 MB aarch64 apache-tvm wheel included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from crossbuild import emulate, rootfs
from crossbuild.wheels import keep_wheels
from tests import netns
from tests.netns import Topology
from tests.support import Process, subprocess_env
from tvmrpc import demo
from tvmrpc.demo import daemons, runner, tracker_state
from tvmrpc.demo.board import EmulatedBoard, host_tvm_version
from tvmrpc.harness import Group
from tvmrpc.mlp import AARCH64_CC, AARCH64_TARGET, build_mlp

TRACKER_PORT = 9190
PROXY_PORT = 9090
SERVER_PORT = 9091  # the directly registered board's port, in C
START = 120.0  # seconds for a daemon under emulation to come up or register
STOP = 60.0  # seconds for the board to stop after SIGTERM (sessions end, workers exit)
TIME_RUNS = 20


def existing(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    return procs


def timed(what: str, func: Any) -> Any:
    started = time.monotonic()
    result = func()
    print(f"\n[board-aarch64] {what}: {time.monotonic() - started:.1f} s: {result}")
    return result


# -- pure parts of the emulation (no root needed) -------------------------------------


def test_registration_gets_the_f_flag_and_keeps_the_rest() -> None:
    conf = "# comment\n:qemu-aarch64:M::\\x7fELF:\\xff\\xff:/usr/libexec/qemu-binfmt/a-P:OP\n"
    line = emulate.registration_line(conf)
    assert line == ":qemu-aarch64:M::\\x7fELF:\\xff\\xff:/usr/libexec/qemu-binfmt/a-P:OPF"
    assert emulate.registration_line(line) == line  # F already there: unchanged
    assert emulate.entry_name(line) == "qemu-aarch64"
    with pytest.raises(emulate.CrossbuildError, match="no binfmt_misc registration"):
        emulate.registration_line("# nothing\n")


def test_missing_packages_give_the_apt_line(monkeypatch: pytest.MonkeyPatch) -> None:
    board = emulate.emulated("aarch64-linux-gnu")
    have = {"unshare", "chroot", "aarch64-linux-gnu-g++"}
    missing = emulate.missing_packages(
        board, which=lambda tool: tool if tool in have else None, exists=lambda path: False
    )
    assert missing == ["qemu-user-static", "mmdebstrap"]
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulate, "missing_packages", lambda *a, **k: missing)
    with pytest.raises(emulate.MissingPackages) as info:
        emulate.check_host(board)
    assert str(info.value).endswith(": apt-get install -y qemu-user-static mmdebstrap")
    assert "\n" not in str(info.value)


def test_without_root_the_reason_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 1000)
    with pytest.raises(emulate.EmulationUnavailable, match="needs root"):
        emulate.check_host(emulate.emulated("aarch64-linux-gnu"))


# -- the journey ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    # Its own names: tests/test_topology.py builds one in this same process.
    with netns.created_or_skip(tag=f"{netns.PREFIX}{os.getpid()}-arm") as topology:
        yield topology


@pytest.fixture(scope="module")
def board(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, topo: Topology
) -> Iterator[EmulatedBoard]:
    """Board C: root filesystem, bundle made by the project's command, installed (plain)."""
    cache = Path(request.config.cache.mkdir("board-aarch64"))
    emulated = EmulatedBoard(tmp_path_factory.mktemp("board-aarch64"), cache_dir=cache)
    try:
        emulated.check()
    except emulate.MissingPackages as exc:
        pytest.fail(str(exc))  # CI installs them (.ci/run): missing is a failure, not a skip
    except emulate.EmulationUnavailable as exc:
        pytest.skip(str(exc))
    timed("root filesystem", emulated.make_root)
    # What mmdebstrap's hooks add (extract runs no maintainer scripts): users, /proc.
    assert emulated.shell("id -un; cat /proc/self/comm").split() == ["root", "cat"]
    timed("bundle", emulated.make_bundle)
    timed("install.sh --plain on the board", emulated.install)
    yield emulated
    assert emulated.processes() == [], "processes left on the board"
    emulated.remove()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP compiled on the host for the board, as a user would."""
    out = tmp_path_factory.mktemp("mlp-aarch64")
    return timed(
        "compile the MLP for aarch64", lambda: build_mlp(out, target=AARCH64_TARGET, cc=AARCH64_CC)
    )


class Lab:
    """Tracker and proxy in B; board servers in C; stock clients in A (or B)."""

    def __init__(self, topo: Topology, log_dir: Path) -> None:
        self.topo = topo
        self.log_dir = log_dir
        self.group = Group(log_dir)
        self.tracker_from_a = (topo.B_A_ADDR, TRACKER_PORT)

    def spawn(self, ns: Any, name: str, argv: list[str]) -> Process:
        return self.group.start(name, ns.argv(*argv))

    def start(self) -> None:
        tracker = self.spawn(self.topo.b, "tracker", daemons.tracker_argv("0.0.0.0", TRACKER_PORT))
        tracker.wait_for(r"tvm-tracker listening on", START)
        proxy = self.spawn(
            self.topo.b,
            "proxy",
            daemons.proxy_argv(
                "0.0.0.0",
                ("127.0.0.1", TRACKER_PORT),
                custom_addr=self.topo.B_A_ADDR,
                port=PROXY_PORT,
            ),
        )
        proxy.wait_for(r"tvm-proxy listening on", START)

    def stop(self) -> None:
        self.group.stop()

    def wait_free(self, key: str) -> dict[str, Any]:
        return tracker_state.wait_until(
            self.tracker_from_a,
            lambda s: tracker_state.queue(s, key)[0] >= 1,
            START,
            f"{key} free at the tracker",
            connect=self.topo.a.connect,
        )

    def session(self, ns: Any, tracker: tuple[str, int], key: str, library: Path) -> dict:
        """A stock client in ``ns``: request, upload, run, check, time_evaluator."""
        proc = self.spawn(
            ns,
            f"client-{key}",
            [
                sys.executable,
                "-m",
                "tvmrpc.demo.session",
                "--tracker",
                f"{tracker[0]}:{tracker[1]}",
                "--key",
                key,
                "--library",
                str(library),
                "--session-timeout",
                str(START),
                "--time-runs",
                str(TIME_RUNS),
            ],
        )
        result = json.loads(proc.wait_for(r'^\{"key"', START).string)
        proc.stop()
        return result


@pytest.fixture(scope="module")
def lab(topo: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(topo, tmp_path_factory.mktemp("board-lab"))
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def serve_and_stop(
    lab: Lab,
    board: EmulatedBoard,
    key: str,
    flags: list[str],
    client_ns: Any,
    tracker: tuple[str, int],
    library: Path,
) -> None:
    """Start the board's server, run a session from ``client_ns``, SIGTERM it, check the board
    is empty."""
    started = time.monotonic()
    server = lab.spawn(lab.topo.c, f"board-{key}", board.server_argv("--key", key, *flags))
    try:
        state = lab.wait_free(key)
        print(
            f"\n[board-aarch64] {key}: registered {time.monotonic() - started:.1f} s after "
            f"start; tracker: {state['queue_info']}"
        )
        result = lab.session(client_ns, tracker, key, library)
        print(f"[board-aarch64] {key}: session {json.dumps(result)}")
        assert result["ok"], result
        assert result["max_error"] < 1e-4
        runs = result["run_seconds"]
        assert len(runs) == 3, runs
        assert all(t > 0 for t in runs), runs
        print(
            f"[board-aarch64] {key}: forward on the emulated board "
            f"{min(runs) * 1e6:.0f} us (best of 3 means of {TIME_RUNS})"
        )
        on_board = board.processes()
        assert server.proc.pid in on_board, (server.proc.pid, on_board)
    except BaseException:
        server.stop()
        raise
    stopping = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)  # the server only, as an init system would
    code = server.proc.wait(STOP)
    assert code in (0, -signal.SIGTERM), f"exit status {code}:\n{server.output[-2000:]}"
    # The zygote and its workers are not our children: wait for them through psutil.
    _gone, alive = psutil.wait_procs(existing(on_board), timeout=STOP)
    assert alive == [], "processes left on the board after SIGTERM"
    assert board.processes() == [], "processes started on the board after SIGTERM"
    print(
        f"[board-aarch64] {key}: stopped on SIGTERM in {time.monotonic() - stopping:.1f} s, "
        "no process left on the board"
    )
    server.stop()


@pytest.mark.netns  # the journey: namespaces and an emulated board
@pytest.mark.slow
def test_board_serves_through_the_proxy(
    lab: Lab, board: EmulatedBoard, library: Path, topo: Topology
) -> None:
    serve_and_stop(
        lab,
        board,
        "aarch64-proxied",
        ["--through-proxy", "--host", topo.B_C_ADDR, "--port", str(PROXY_PORT)],
        topo.a,
        lab.tracker_from_a,
        library,
    )


@pytest.mark.netns  # the journey: namespaces and an emulated board
@pytest.mark.slow
def test_board_registered_with_the_tracker_directly(
    lab: Lab, board: EmulatedBoard, library: Path, topo: Topology
) -> None:
    serve_and_stop(
        lab,
        board,
        "aarch64-direct",
        ["--tracker", f"{topo.B_C_ADDR}:{TRACKER_PORT}", "--port", str(SERVER_PORT)],
        topo.b,
        ("127.0.0.1", TRACKER_PORT),
        library,
    )
    tracker_state.wait_until(
        lab.tracker_from_a,
        lambda s: (
            all(i["key"] != "server:aarch64-direct" for i in s["server_info"])
            and tracker_state.queue(s, "aarch64-direct") == (0, 0)
        ),
        START,
        "the stopped board gone from the tracker",
        connect=topo.a.connect,
    )


@pytest.mark.netns  # the journey: namespaces and an emulated board
@pytest.mark.slow
def test_venv_install_serves_too(
    lab: Lab, board: EmulatedBoard, library: Path, topo: Topology
) -> None:
    """install.sh --venv: pip under emulation, so slow (90-110 s measured)."""
    line = timed(
        "install.sh --venv on the board", lambda: board.install("venv", prefix="/opt/tvmrpc-venv")
    )
    assert re.match(r"installed \(venv\) in /opt/tvmrpc-venv", line), line
    flags = ["--through-proxy", "--host", topo.B_C_ADDR, "--port", str(PROXY_PORT)]
    started = time.monotonic()
    argv = board.server_argv("--key", "aarch64-venv", *flags, prefix="/opt/tvmrpc-venv")
    server = lab.spawn(topo.c, "board-venv", argv)
    try:
        lab.wait_free("aarch64-venv")
        print(f"[board-aarch64] venv: registered {time.monotonic() - started:.1f} s after start")
        result = lab.session(topo.a, lab.tracker_from_a, "aarch64-venv", library)
        assert result["ok"], result
    finally:
        server.stop()


@pytest.mark.netns  # the journey: namespaces and an emulated board
@pytest.mark.slow
def test_the_wheels_are_fetched_once(board: EmulatedBoard, tmp_path: Path) -> None:
    """The bundle's --wheel-dir kept the index's wheels (not the checkout's tvmrpc wheel), and
    the runtime comes from there with the index switched off."""
    wheel_dir = board.cache_dir / "wheels"
    names = sorted(p.name for p in wheel_dir.glob("*.whl"))
    assert any(n.startswith("apache_tvm-") and "aarch64" in n for n in names), names
    assert not any(n.startswith("tvmrpc-") for n in names), names
    argv = [
        sys.executable,
        "-m",
        "crossbuild",
        "runtime",
        "--from-wheel",
        "--target",
        "aarch64-linux-gnu",
        "--tvm-version",
        host_tvm_version(),
        "--python",
        "3.11",
        "--glibc",
        "2.36",
        "--wheel-dir",
        str(wheel_dir),
        "-o",
        str(tmp_path / "rt"),
    ]
    env = subprocess_env({"PIP_NO_INDEX": "1"})  # nothing from the network
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "libtvm_runtime.so  AArch64" in done.stdout


def demo_args(tmp_path: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(
        [
            "--board",
            "aarch64",
            "--log-dir",
            str(tmp_path / "logs"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )


def test_demo_without_root_fails_in_one_line_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 1000)
    out = io.StringIO()
    assert runner.main(demo_args(tmp_path), out) == 1
    text = out.getvalue()
    assert (
        "tvmrpc demo: FAILED at step 'check that this machine can emulate an aarch64 board'"
        ": an emulated board needs root" in text
    ), text
    assert "start the tracker" not in text
    assert not (tmp_path / "cache").exists()


def test_demo_names_the_apt_line_for_missing_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulate.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulate, "missing_packages", lambda *a, **k: ["mmdebstrap"])
    out = io.StringIO()
    assert runner.main(demo_args(tmp_path), out) == 1
    last = [line for line in out.getvalue().splitlines() if "FAILED at step" in line]
    assert last == [
        "tvmrpc demo: FAILED at step 'check that this machine can emulate an "
        "aarch64 board': an emulated aarch64-linux-gnu board needs mmdebstrap: "
        "apt-get install -y mmdebstrap"
    ]


def test_rootfs_cache_key_follows_every_input() -> None:
    base = rootfs.RootfsSpec()
    variants = [
        rootfs.RootfsSpec(packages=(*rootfs.PACKAGES, "curl")),
        rootfs.RootfsSpec(suite="trixie"),
        rootfs.RootfsSpec(arch="armhf"),
        rootfs.RootfsSpec(mirror="http://mirror.example/debian"),
    ]
    keys = {base.key(), *(v.key() for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert base.key() == rootfs.RootfsSpec().key()
    argv = rootfs.mmdebstrap_argv(base, Path("/x/out.tar"))
    assert argv[:3] == ["mmdebstrap", "--arch=arm64", "--variant=extract"]
    # extract runs only extract hooks: customize hooks would be skipped silently
    assert not [a for a in argv if a.startswith("--customize-hook")]
    assert len([a for a in argv if a.startswith("--extract-hook=")]) >= 3
    assert argv[-3:] == ["bookworm", "/x/out.tar", rootfs.DEFAULT_MIRROR]
    assert "--include=" + ",".join(rootfs.PACKAGES) in argv
    with pytest.raises(rootfs.CrossbuildError, match="unknown suite"):
        rootfs.RootfsSpec(suite="hamm")


def test_a_given_bundle_picks_the_suite_of_its_python(tmp_path: Path) -> None:
    def bundle(target: str, python: str) -> Path:
        path = tmp_path / f"b-{target}-{python}.tar.gz"
        data = json.dumps({"target": target, "python": python}).encode()
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("tvmrpc-server/manifest.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return path

    board = EmulatedBoard(tmp_path / "work", cache_dir=tmp_path / "cache")
    assert board.use_bundle(bundle("aarch64-linux-gnu", "3.13")).endswith("runs Debian trixie")
    assert board.spec.suite == "trixie"
    assert board.use_bundle(bundle("aarch64-linux-gnu", "3.11")).endswith("runs Debian bookworm")
    with pytest.raises(
        emulate.CrossbuildError,
        match=r"no emulated board has Python 3\.12; "
        r"there are: bookworm 3\.11, trixie 3\.13",
    ):
        board.use_bundle(bundle("aarch64-linux-gnu", "3.12"))
    with pytest.raises(emulate.CrossbuildError, match="a bundle for riscv64-linux-gnu, the board"):
        board.use_bundle(bundle("riscv64-linux-gnu", "3.11"))
    (tmp_path / "junk.tar.gz").write_text("not a tar file")
    with pytest.raises(emulate.CrossbuildError, match=r"cannot read .* as a bundle"):
        board.use_bundle(tmp_path / "junk.tar.gz")


def test_wheel_dir_keeps_only_what_an_index_served(tmp_path: Path) -> None:
    got = tmp_path / "got"
    got.mkdir()
    for name in ("a-1-py3-none-any.whl", "tvmrpc-0.1.0-py3-none-any.whl", "b-1.tar.gz"):
        (got / name).write_text(name)
    kept_dir = tmp_path / "wheels"
    kept_dir.mkdir()
    (kept_dir / "c-1-py3-none-any.whl").write_text("old")
    (got / "c-1-py3-none-any.whl").write_text("new")
    kept = keep_wheels(sorted(got.iterdir()), kept_dir, skip={"tvmrpc-0.1.0-py3-none-any.whl"})
    assert [p.name for p in kept] == ["a-1-py3-none-any.whl"]
    assert sorted(p.name for p in kept_dir.iterdir()) == [
        "a-1-py3-none-any.whl",
        "c-1-py3-none-any.whl",
    ]
    assert (kept_dir / "c-1-py3-none-any.whl").read_text() == "old"


def test_host_registration_without_a_private_binfmt_misc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 6.7: the host's table, registered once; an entry without F is refused."""
    table = tmp_path / "binfmt_misc"
    table.mkdir()
    (table / "register").write_text("")
    monkeypatch.setattr(emulate, "BINFMT_DIR", table)
    line = ":qemu-aarch64:M::\\x7fELF:\\xff:/usr/bin/qemu-aarch64-static:OCF"
    assert emulate.register_on_host(line).startswith("registered qemu-aarch64 in ")
    assert (table / "register").read_text() == line
    (table / "qemu-aarch64").write_text("enabled\ninterpreter /q\nflags: OCF\n")
    assert "already registered" in emulate.register_on_host(line)
    (table / "qemu-aarch64").write_text("enabled\ninterpreter /q\nflags: OC\n")
    with pytest.raises(emulate.EmulationUnavailable, match="without the F flag") as info:
        emulate.register_on_host(line)
    assert str(info.value).endswith(f"echo -1 > {table / 'qemu-aarch64'} and run again")


@pytest.mark.slow
def test_demo_board_aarch64_prints_ok(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """``tvmrpc demo --board aarch64`` as a user runs it (a subprocess), sharing the caches."""
    try:
        emulate.check_host(emulate.emulated("aarch64-linux-gnu"))
    except emulate.MissingPackages as exc:
        pytest.fail(str(exc))
    except emulate.EmulationUnavailable as exc:
        pytest.skip(str(exc))
    cache = Path(request.config.cache.mkdir("board-aarch64"))
    argv = [
        sys.executable,
        "-m",
        "tvmrpc.cli",
        "demo",
        "--board",
        "aarch64",
        "--log-dir",
        str(tmp_path / "logs"),
        "--cache-dir",
        str(cache),
        "--step-timeout",
        str(START),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    out = done.stdout
    print(out)
    assert done.returncode == 0, out + done.stderr
    for step in (
        "root filesystem: Debian bookworm arm64",
        "bundle: the server for aarch64",
        "install the bundle on the board offline: install.sh --plain",
        "start tvm-server on the emulated aarch64 board",
        "compile the MLP for aarch64",
    ):
        assert re.search(rf"^\[ *[\d.]+s\] \d+\. {re.escape(step)}", out, re.M), step
    assert re.search(
        r"^  demo-proxied +tracker -> proxy 127\.0\.0\.1:\d+ -> server on the "
        r"emulated aarch64 board +\d+ ms  OK$",
        out,
        re.M,
    ), out
    assert "board: no process left; removed " in out
    assert out.rstrip().endswith("tvmrpc demo: OK, every session's result matched numpy")
    assert (tmp_path / "logs" / "board" / "tvmrpc-server-aarch64-linux-gnu.tar.gz").is_file()
    assert not (tmp_path / "logs" / "board" / "root").exists()
