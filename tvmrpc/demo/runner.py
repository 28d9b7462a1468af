"""The demo's script: start the daemons, show the tracker, run a model on each key.

Invariants:
- Daemons are started in dependency order (tracker, proxy, servers) and
  stopped in reverse, unless ``--keep``; a failed step stops them too.
- A server counts as up only once the tracker lists its key as free.
- The exit status is 0 only if every session's output matched numpy.
- With ``--board aarch64`` the proxied server runs on an emulated aarch64
  board (:mod:`tvmrpc.demo.board`), prepared before any daemon starts; a
  machine that cannot emulate fails the first step with one line saying why.
  The board's root is removed at the end (the bundle stays in the log dir).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import attrs

from ..harness import DaemonError, Group, Process, run_module
from . import daemons, tracker_state
from .board import EmulatedBoard
from .steps import StepError, Steps, bounded


@attrs.define
class Row:
    """One line of the closing summary."""

    key: str
    path: str
    seconds: float | None = None
    ok: bool | None = None
    board: bool = False  # served by the emulated aarch64 board


@attrs.define
class Demo:
    """State of one demo run: its options, its daemons and what they did."""

    args: argparse.Namespace
    out: IO[str]
    log_dir: Path
    steps: Steps
    group: Group
    tracker: tuple[str, int] | None = None
    proxy: tuple[str, int] | None = None
    rows: list[Row] = attrs.Factory(list)
    board: EmulatedBoard | None = None

    # -- helpers ----------------------------------------------------------------

    def launch(self, name: str, argv: list[str]) -> Process:
        return self.group.start(name, argv)

    def check_alive(self) -> None:
        for daemon in self.group.procs:
            if not daemon.alive():
                raise DaemonError(
                    f"{daemon.name} exited with status {daemon.proc.returncode}; "
                    f"last lines of {daemon.log_path}:\n{daemon.tail()}"
                )

    def wait_free(self, key: str) -> dict[str, Any]:
        assert self.tracker is not None
        return tracker_state.wait_until(
            self.tracker,
            lambda state: tracker_state.queue(state, key)[0] >= 1,
            self.args.step_timeout,
            f"key {key!r} free at the tracker",
            check=self.check_alive,
        )

    def path_of(self, key: str, state: dict[str, Any]) -> str:
        """How a session for ``key`` travels, read from the tracker's server list."""
        for info in state.get("server_info", []):
            name, addr = info.get("key", ""), ":".join(map(str, info.get("addr", [])))
            if name == f"server:{key}":
                return f"tracker -> server {addr}"
            if name.startswith("server:proxy[") and key in name[13:-1].split(","):
                return f"tracker -> proxy {addr} -> server"
        return "tracker -> ? (not in the server list)"

    # -- the steps ----------------------------------------------------------------

    def start_listening(self, title: str, name: str, argv: list[str]) -> tuple[str, int]:
        """A step that starts a daemon and waits until it listens; its address."""
        with self.steps.step(title):
            daemon = self.launch(name, argv)
            daemon.wait_listening(self.args.step_timeout)
            host, port = daemon.address
            self.steps.note(
                f"listening on {host}:{port} (pid {daemon.pid}, log {daemon.log_path.name})"
            )
        return host, port

    def start_tracker(self) -> None:
        argv = daemons.tracker_argv(self.args.host, self.args.tracker_port)
        self.tracker = self.start_listening(
            "start the tracker (twistd tvm-tracker)", "tracker", argv
        )

    def start_proxy(self) -> None:
        assert self.tracker is not None
        title = "start the proxy, registered with the tracker (twistd tvm-proxy)"
        argv = daemons.proxy_argv(self.args.host, self.tracker)
        self.proxy = self.start_listening(title, "proxy", argv)

    def start_servers(self) -> None:
        assert self.tracker is not None
        assert self.proxy is not None
        key = self.args.direct_key
        with self.steps.step(f"start a server with key {key!r}, registered with the tracker"):
            server = self.launch(
                "server-direct", daemons.server_argv(self.args.host, key, self.tracker)
            )
            state = self.wait_free(key)
            self.rows.append(Row(key, self.path_of(key, state)))
            self.steps.note(
                f"registered: {self.rows[-1].path} (pid {server.pid}, log {server.log_path.name})"
            )
        key = self.args.proxied_key
        if self.board is not None:
            title = (
                f"start tvm-server on the emulated aarch64 board with key {key!r}, "
                "through the proxy"
            )
            host, port = self.proxy
            argv = self.board.server_argv(
                "--through-proxy", "--host", host, "--port", str(port), "--key", key
            )
        else:
            title = f"start a server with key {key!r}, through the proxy"
            argv = daemons.proxied_server_argv(self.proxy, key)
        with self.steps.step(title):
            server = self.launch("server-proxied", argv)
            state = self.wait_free(key)
            path = self.path_of(key, state)
            if self.board is not None:
                path += " on the emulated aarch64 board"
            self.rows.append(Row(key, path, board=self.board is not None))
            self.steps.note(
                f"registered: {self.rows[-1].path} (pid {server.pid}, log {server.log_path.name})"
            )

    def show_query(self) -> None:
        assert self.tracker is not None
        host, port = self.tracker
        with self.steps.step(f"tvmrpc query --host {host} --port {port}"):
            done = run_module(
                "tvmrpc.cli",
                "query",
                "--host",
                host,
                "--port",
                str(port),
                timeout=self.args.step_timeout,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"exit status {done.returncode}: {done.stderr.strip()}")
            self.steps.note(done.stdout.rstrip())
            # Stock's table counts a key's servers by their "server:<key>" line, so keys
            # served through a proxy ("server:proxy[...]") show only when pending; say all.
            state = tracker_state.summary(self.tracker, self.args.step_timeout)
            queue = ", ".join(
                f"{key} free {free} pending {pending}"
                for key in sorted(state["queue_info"])
                for free, pending in [tracker_state.queue(state, key)]
            )
            self.steps.note(f"every key in the tracker's queue: {queue}")

    def compile_model(self) -> Path:
        from ..mlp import build_mlp

        with self.steps.step("compile the MLP with TVM relax on this host"):
            library = bounded(
                lambda: build_mlp(self.log_dir / "model"),
                self.args.step_timeout,
                "compiling the MLP",
            )
            self.steps.note(f"{library} ({library.stat().st_size} bytes)")
        return library

    def compile_for_board(self) -> Path:
        from ..mlp import AARCH64_CC, AARCH64_TARGET, build_mlp

        title = (
            f"compile the MLP for aarch64: target {AARCH64_TARGET}, "
            f"export_library(cc={AARCH64_CC!r})"
        )
        with self.steps.step(title):
            library = bounded(
                lambda: build_mlp(self.log_dir / "model-aarch64", AARCH64_TARGET, AARCH64_CC),
                self.args.step_timeout,
                "compiling the MLP for aarch64",
            )
            self.steps.note(f"{library} ({library.stat().st_size} bytes)")
        return library

    # -- the emulated board ---------------------------------------------------------

    def prepare_board(self) -> None:
        board = EmulatedBoard(self.log_dir / "board", cache_dir=Path(self.args.cache_dir))
        with self.steps.step("check that this machine can emulate an aarch64 board"):
            board.check()
        self.board = board
        if self.args.bundle:
            with self.steps.step(f"bundle: {self.args.bundle} (--bundle)"):
                self.steps.note(board.use_bundle(Path(self.args.bundle)))
        with self.steps.step(
            f"root filesystem: Debian {board.spec.suite} {board.spec.arch} (mmdebstrap, cached)"
        ):
            self.steps.note(board.make_root())
        if not self.args.bundle:
            with self.steps.step("bundle: the server for aarch64, made by crossbuild"):
                self.steps.note(board.make_bundle())
                assert board.bundle is not None
                self.steps.note(
                    f"{board.bundle} ({board.bundle.stat().st_size // 1024} KiB): "
                    "the archive a real board gets"
                )
        with self.steps.step("install the bundle on the board offline: install.sh --plain"):
            self.steps.note(board.install())

    def run_sessions(self, library: Path, board_library: Path | None = None) -> None:
        from .session import request_and_run

        assert self.tracker is not None
        tracker = self.tracker
        for row in self.rows:
            title = (
                f"session for {row.key!r}: stock rpc.connect_tracker().request(), "
                "upload, run, check"
            )
            lib = board_library if row.board and board_library is not None else library
            with self.steps.step(title):
                self.check_alive()
                outcome = bounded(
                    functools.partial(
                        request_and_run, tracker, row.key, lib, self.args.step_timeout
                    ),
                    self.args.step_timeout,
                    f"the session for {row.key!r}",
                )
                row.seconds, row.ok = outcome.total_seconds, outcome.ok
                self.steps.note(
                    f"via {row.path}: session opened in {outcome.request_seconds * 1000:.0f} ms, "
                    f"result in {outcome.total_seconds * 1000:.0f} ms, "
                    f"max |remote - numpy| = {outcome.max_error:.2e}"
                )
                if not outcome.ok:
                    raise RuntimeError("the remote output does not match numpy")

    def summary(self) -> None:
        self.steps.say("")
        self.steps.say("Summary")
        width = max([len(r.key) for r in self.rows] + [3])
        path_width = max([len(r.path) for r in self.rows] + [4])
        self.steps.say(f"  {'key':<{width}}  {'path':<{path_width}}  {'session':>8}  result")
        for row in self.rows:
            seconds = f"{row.seconds * 1000:.0f} ms" if row.seconds is not None else "-"
            seconds = f"{seconds:>8}"
            result = {True: "OK", False: "WRONG", None: "not run"}[row.ok]
            self.steps.say(f"  {row.key:<{width}}  {row.path:<{path_width}}  {seconds}  {result}")

    def shutdown(self) -> None:
        if not self.group.procs:
            return
        self.steps.say("")
        self.steps.say("Stopping the daemons")
        for daemon in self.group.stop():
            self.steps.say(f"  {daemon.name:<15} pid {daemon.pid:<7} {daemon.ended}")
        if self.board is not None and self.board.root.exists():
            left = self.board.processes()
            if left:
                self.steps.say(f"  board: processes still running: {left}")
            else:
                self.board.remove()
                self.steps.say(f"  board: no process left; removed {self.board.root}")

    def keep(self) -> None:
        assert self.tracker is not None
        host, port = self.tracker
        self.steps.say("")
        self.steps.say(f"--keep: the daemons are still running (logs in {self.log_dir})")
        for daemon in self.group.procs:
            self.steps.say(f"  {daemon.name:<15} pid {daemon.pid}")
        self.steps.say("Talk to them:")
        self.steps.say(f"  tvmrpc query --host {host} --port {port}")
        self.steps.say(
            f"  python -c \"from tvm import rpc; s = rpc.connect_tracker('{host}', {port})"
            f".request('{self.args.direct_key}'); print(s.get_function('testing.echo')('hi'))\""
        )
        groups = " ".join(f"-{d.pid}" for d in self.group.procs)
        self.steps.say("Stop them (each leads a process group, so its workers stop too):")
        self.steps.say(f"  kill -TERM -- {groups}")

    def run(self) -> None:
        if self.args.board:
            self.prepare_board()
        self.start_tracker()
        self.start_proxy()
        self.start_servers()
        self.show_query()
        library = self.compile_model()
        board_library = self.compile_for_board() if self.board is not None else None
        self.run_sessions(library, board_library)


def main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run the demo; 0 when every session matched numpy, else 1 naming the failed step."""
    out = out or sys.stdout
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="tvmrpc-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, args.step_timeout)
    # With --keep the daemons must outlive the demo; otherwise they die with it.
    demo = Demo(args, out, log_dir, steps, Group(log_dir, die_with_parent=not args.keep))
    steps.say(f"tvmrpc demo: daemon logs go to {log_dir}")
    failed: StepError | None = None
    try:
        demo.run()
    except StepError as exc:
        failed = exc
    except KeyboardInterrupt:
        failed = StepError("interrupted", "Ctrl-C")
    finally:
        if demo.rows:
            demo.summary()
        if args.keep and failed is None:
            demo.keep()
        else:
            demo.shutdown()
    if failed is not None:
        steps.say("")
        steps.say(f"tvmrpc demo: FAILED at step '{failed.step}': {failed.reason.splitlines()[0]}")
        steps.say(f"tvmrpc demo: logs in {log_dir}")
        return 130 if failed.step == "interrupted" else 1
    steps.say("")
    steps.say("tvmrpc demo: OK, every session's result matched numpy")
    return 0
