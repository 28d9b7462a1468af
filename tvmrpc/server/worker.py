"""The worker zygote: ``python -m tvmrpc.server.worker`` (spawned by the daemon).

One process loads ``tvm_ffi`` and the TVM runtime library once, then forks a
fresh worker per session, one session ahead: the spare worker is forked as
the previous session ends, has loaded ``--load-library`` libraries and
imported ``--init`` modules, and waits for its socket. It is not forked
while a session runs: the fork and the spare's start-up would compete with
that session for the CPU (on a 2-core board this cost a short session about
a millisecond). It imports nothing of
tvmrpc besides this module and nothing heavy: numpy, ml_dtypes, cloudpickle and tornado are blocked
while ``tvm_ffi`` loads (it only tries numpy optionally), so the zygote has
no threads and forking it is safe and fast.

Control channel: the daemon passes a connected UNIX stream socket as fd 3
(``--control-fd``). Lines of JSON flow both ways:

- zygote → daemon: ``{"event": "ready", "pid": P, "str_type_index": N}``
  once warm; ``{"event": "started", "id": I, "pid": P}`` when a worker got
  its socket; ``{"event": "finished", "id": I, "pid": P}`` when its server
  loop returned (it is exiting; the client already has its FIN);
  ``{"event": "exited", "id": I, "pid": P, "code": C}`` when a worker is reaped
  (``C`` is negative for a signal, as :func:`os.waitstatus_to_exitcode`);
  ``{"event": "spare-failed", "pid": P, "code": C}`` when a spare died before
  its session (a broken ``--init`` module); the next one is forked later.
- daemon → zygote: ``{"cmd": "serve", "id": I, "dir": D}``, with the session
  socket attached (SCM_RIGHTS) to bytes of the same line.

Invariants: a worker runs exactly one session (``rpc.ServerLoop`` on the fd)
in its own process group (so the daemon can kill its whole tree) with its
session directory as cwd, then exits. When a worker (session, spare or
health check) is reaped, its whole process group is killed: nothing a kernel
forked outlives its session. A session's directory is removed by the
zygote once its worker is reaped (before ``exited`` is sent), so the daemon's
reactor never walks it. When the control channel closes the zygote
kills the workers it still has and exits. A start-up failure is reported as
one line (cause and fix), never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: Modules kept out of the zygote while tvm_ffi loads (it imports numpy if it can).
BLOCKED_WHILE_LOADING = ("numpy", "ml_dtypes", "torch", "cloudpickle", "tornado")
RUNTIME_NAME = "libtvm_runtime.so"
#: A health-check worker still running after this long is killed by SIGALRM.
CHECK_ALARM_SECONDS = 25


class PathEscapeError(ValueError):
    """A client path that would leave the session directory."""


def find_runtime_library(explicit: str | None = None) -> Path:
    """Locate libtvm_runtime.so: explicit path, ``TVM_LIBRARY_PATH``, or the tvm package.

    The tvm package is located with :func:`importlib.util.find_spec` without
    importing it (importing tvm would import numpy).
    """
    candidates: list[Path] = []
    if explicit:
        path = Path(explicit)
        candidates.append(path / RUNTIME_NAME if path.is_dir() else path)
    for entry in filter(None, os.environ.get("TVM_LIBRARY_PATH", "").split(os.pathsep)):
        path = Path(entry)
        candidates.append(path / RUNTIME_NAME if path.is_dir() or not path.suffix else path)
    if not explicit:
        spec = importlib.util.find_spec("tvm")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates += [Path(location) / "lib" / RUNTIME_NAME, Path(location) / RUNTIME_NAME]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates) or "nothing"
    raise FileNotFoundError(f"cannot find {RUNTIME_NAME} (tried {tried})")


def load_runtime(library: Path) -> Any:
    """Import tvm_ffi with heavy optional modules blocked, then load the runtime globally."""
    saved = {name: sys.modules.get(name) for name in BLOCKED_WHILE_LOADING}
    for name in BLOCKED_WHILE_LOADING:
        if saved[name] is None:
            sys.modules[name] = None  # type: ignore[assignment] - makes import raise
    try:
        import tvm_ffi
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)  # later imports (--init modules) may try again
    ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
    return tvm_ffi


class NotReadyError(Exception):
    """The runtime, a library or an init module cannot be loaded; the message says what to do."""


def load_runtime_or_explain(explicit: str | None) -> Any:
    """:func:`load_runtime` with every failure turned into one line naming cause and fix."""
    try:
        library = find_runtime_library(explicit)
    except FileNotFoundError as exc:
        raise NotReadyError(
            f"{exc}: install apache-tvm on this board or pass --runtime-library PATH"
        ) from None
    try:
        return load_runtime(library)
    except ImportError as exc:
        raise NotReadyError(
            f"cannot import tvm_ffi ({exc}): install apache-tvm-ffi for {sys.executable}"
        ) from None
    except OSError as exc:
        raise NotReadyError(
            f"cannot load the runtime library {library} ({_one_line(exc)}): install what it "
            "needs (e.g. libstdc++) or pass a --runtime-library built for this board"
        ) from None


def prepare_worker(args: argparse.Namespace) -> None:
    """Load every ``--load-library`` and import every ``--init`` module (errors: one line)."""
    for library in args.load_library:
        try:
            ctypes.CDLL(library, ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise NotReadyError(
                f"--load-library {library} cannot be loaded ({_one_line(exc)}): "
                "pass a shared library built for this board"
            ) from None
    for module in args.init:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - any failure of user code
            raise NotReadyError(
                f"--init {module} failed ({type(exc).__name__}: {_one_line(exc)}): "
                f"fix the module or make it importable (PYTHONPATH), or drop --init {module}"
            ) from None


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``conn`` (its timeout bounds each wait); raise if it closes."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def self_test(tvm_ffi: Any) -> None:
    """Serve one loopback RPC session with ``rpc.ServerLoop`` and call a packed function.

    The server side runs in a forked child (the loop blocks); this process is
    the client (``rpc.Connect``). Raises :class:`NotReadyError` on any failure.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
    except OSError as exc:
        listener.close()
        raise NotReadyError(
            f"health check needs the loopback interface 127.0.0.1 ({exc}): "
            "bring it up (ip link set lo up)"
        ) from None
    listener.settimeout(10)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            # The client writes magic, length and key separately; a socket with a
            # timeout is non-blocking underneath, so MSG_WAITALL may return less.
            magic, length = struct.unpack("<ii", _recv_exactly(conn, 8))
            _recv_exactly(conn, length)
            key = b"server:health-check"
            conn.sendall(struct.pack("<ii", magic, len(key)) + key)
            conn.setblocking(True)
            tvm_ffi.get_global_func("rpc.ServerLoop")(conn.detach())
            code = 0
        finally:
            os._exit(code)
    listener.close()
    try:
        session = tvm_ffi.get_global_func("rpc.Connect")("127.0.0.1", port, "client:check", False)
        echo = session.get_function("ffi.String")
        answer = echo("health-check")
        del echo, session
        if answer != "health-check":
            raise NotReadyError(f"health check: the RPC loop answered {answer!r}")
    except NotReadyError:
        kill_group(pid)
        raise
    except BaseException as exc:  # noqa: BLE001 - any runtime failure
        kill_group(pid)
        hint = ""
        if "Connect to 127.0.0.1" in str(exc):
            hint = ": is the loopback interface up? (ip link set lo up)"
        raise NotReadyError(
            f"health check failed: the runtime's RPC loop did not answer "
            f"({type(exc).__name__}: {_one_line(exc)}){hint}"
        ) from None
    finally:
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NotReadyError(
            f"health check failed: the RPC server loop exited with "
            f"{os.waitstatus_to_exitcode(status)}"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def probe_str_type_index(tvm_ffi: Any) -> int:
    """Ask the runtime which type index it writes for a raw string in an exception packet."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        tvm_ffi.get_global_func("rpc.ReturnException")(ours.fileno(), "probe")
        head = theirs.recv(20, socket.MSG_WAITALL)
    _length, _code, _nargs, type_index = struct.unpack("<Qiii", head)
    return type_index


def session_path(root: str, path: str) -> str:
    """Resolve a client path inside ``root``; refuse absolute paths and ``..`` escapes."""
    if os.path.isabs(path):
        raise PathEscapeError(f"absolute path {path!r} refused: use a session-relative path")
    full = os.path.normpath(os.path.join(root, path))
    if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
        raise PathEscapeError(f"path {path!r} escapes the session directory")
    return full


def register_session_functions(tvm_ffi: Any, root: str) -> None:
    """Register what the stock client calls on the server, confined to ``root``."""
    register = tvm_ffi.register_global_func

    @register("tvm.rpc.server.workpath", override=True)
    def workpath(path: str) -> str:
        return session_path(root, path)

    @register("tvm.rpc.server.load_module", override=True)
    def load_module(path: str) -> Any:
        return tvm_ffi.load_module(session_path(root, path))

    @register("tvm.rpc.server.listdir", override=True)
    def listdir(path: str) -> str:
        return ",".join(sorted(os.listdir(session_path(root, path))))

    @register("tvm.rpc.server.download_linked_module", override=True)
    def download_linked_module(path: str) -> bytearray:
        return bytearray(Path(link_module(session_path(root, path))).read_bytes())


def link_module(path: str) -> str:
    """Link an uploaded ``.o`` or ``.tar`` of objects into a shared library with ``cc``."""
    import shutil
    import subprocess
    import tarfile

    if path.endswith((".so", ".dylib")):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("download_linked_module needs a C compiler on the server")
    if path.endswith(".o"):
        objects = [path]
    elif path.endswith(".tar"):
        out_dir = path[: -len(".tar")]
        os.makedirs(out_dir, exist_ok=True)
        with tarfile.open(path) as tar:
            tar.extractall(out_dir, filter="data")
        objects = [os.path.join(out_dir, name) for name in sorted(os.listdir(out_dir))]
    else:
        raise RuntimeError(f"Do not know how to link {os.path.basename(path)}")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", path + ".so", *objects], check=True)
    return path + ".so"


def run_session(tvm_ffi: Any, fd: int, root: str) -> int:
    """One ``rpc.ServerLoop`` on ``fd`` with ``root`` as session directory; return exit code.

    The runtime closes ``fd`` when its loop ends, so a duplicate is kept to
    shut the connection down afterwards.
    """
    keep = os.dup(fd)
    try:
        os.chdir(root)
        register_session_functions(tvm_ffi, root)
        tvm_ffi.get_global_func("rpc.ServerLoop")(fd)
        return 0
    except BaseException:  # noqa: BLE001 - a worker reports and exits, whatever happened
        traceback.print_exc()
        return 1
    finally:
        end_connection(keep)


def end_connection(fd: int) -> None:
    """Send FIN now: the daemon's duplicate of the socket must not keep the client waiting."""
    sock = socket.socket(fileno=fd)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclasses.dataclass
class Spare:
    """A forked worker waiting for its session: socket in ``channel``, ``done`` pipe."""

    pid: int
    channel: socket.socket
    done: int


class Zygote:
    """The fork server loop (see the module docstring for the protocol).

    A spare worker is forked ahead of time (libraries loaded, ``--init``
    modules imported) so that a session starts with one fd hand-off; the
    fork and its page-table copy happen once the previous session ended,
    not while it runs.
    """

    respawn_delay = 1.0

    def __init__(self, control: socket.socket, tvm_ffi: Any, args: argparse.Namespace) -> None:
        self.control = control
        self.tvm_ffi = tvm_ffi
        self.args = args
        self.buffer = b""
        self.fds: list[int] = []
        self.children: dict[int, int] = {}  # pid -> session id
        self.done_pipes: dict[int, tuple[int, int]] = {}  # read fd -> (session id, pid)
        self.checks: dict[int, tuple[int, int]] = {}  # pid -> (check id, verdict pipe)
        self.session_dirs: dict[int, str] = {}  # pid -> its session directory
        self.spare: Spare | None = None
        self.spare_due: float | None = None  # the first spare follows a passed health check

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(json.dumps(message).encode() + b"\n")

    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown(0))
        self.send(
            {
                "event": "ready",
                "pid": os.getpid(),
                "str_type_index": probe_str_type_index(self.tvm_ffi),
            }
        )
        while True:
            timeout = None
            if self.spare is None and self.spare_due is not None:
                timeout = max(0.0, self.spare_due - time.monotonic())
                if timeout == 0.0:
                    self.fork_spare()
                    continue
            watched = [self.control, wake_r, *self.done_pipes]
            readable, _, _ = select.select(watched, [], [], timeout)
            if wake_r in readable:
                os.read(wake_r, 4096)
                self.reap()
            for fd in readable:
                if fd in self.done_pipes:
                    self.finished(fd)
            if self.control in readable and not self.receive():
                self.shutdown(0)

    def receive(self) -> bool:
        data, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 16)
        self.fds += fds
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if message.get("cmd") == "serve":
                self.serve(message["id"], message["dir"], self.fds.pop(0))
            elif message.get("cmd") == "check":
                self.check(message["id"])
        return True

    def check(self, check_id: int) -> None:
        """Fork a health-check worker; its verdict comes back through a pipe when reaped."""
        verdict_r, verdict_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                self._child_reset()
                os.close(verdict_r)
                # A check that hangs dies (SIGALRM) before the daemon's own 30 s
                # timeout; the reaper then kills its whole group.
                signal.alarm(CHECK_ALARM_SECONDS)
                try:
                    prepare_worker(self.args)
                    if self.args.memory_limit:  # a session's limit must leave room to serve
                        limit_memory(self.args.memory_limit)
                    self_test(self.tvm_ffi)
                    code = 0
                except NotReadyError as exc:
                    message = str(exc)
                    if self.args.memory_limit:
                        message += (
                            f" (under --session-memory-limit {self.args.memory_limit}: "
                            "if that is too low for the runtime, raise it)"
                        )
                    os.write(verdict_w, message.encode()[:4000])
            finally:
                os._exit(code)
        os.close(verdict_w)
        os.set_blocking(verdict_r, False)
        self.checks[pid] = (check_id, verdict_r)

    def _child_reset(self) -> None:
        """In a forked child: default signal handling, none of the zygote's descriptors."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        self.control.close()
        for fd in [*self.fds, *self.done_pipes]:
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, verdict in self.checks.values():
            with contextlib.suppress(OSError):
                os.close(verdict)

    def fork_spare(self) -> None:
        """Fork the next worker; it loads libraries and init modules, then waits."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                self._child_reset()
                ours.close()
                os.close(done_r)
                code = spare_main(self.tvm_ffi, theirs, done_w, self.args)
            except BaseException:  # noqa: BLE001 - report, then exit below
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        theirs.close()
        os.close(done_w)
        self.spare = Spare(pid, ours, done_r)
        self.spare_due = None

    def serve(self, session_id: int, root: str, fd: int) -> None:
        if self.spare is None:
            self.fork_spare()
        spare, self.spare = self.spare, None
        assert spare is not None
        try:
            socket.send_fds(spare.channel, [json.dumps({"dir": root}).encode()], [fd])
        except OSError:
            pass  # the spare died; its exit is reported as this session's end
        finally:
            os.close(fd)
            spare.channel.close()
        self.children[spare.pid] = session_id
        self.session_dirs[spare.pid] = root
        self.done_pipes[spare.done] = (session_id, spare.pid)
        self.send({"event": "started", "id": session_id, "pid": spare.pid})
        # The next spare is forked once this session ends, not while it runs: a
        # fork and a worker's start-up compete with the session for the CPU.
        self.spare_due = None

    def spare_after_session(self) -> None:
        """A session ended: fork the next spare now (unless one is there or due)."""
        if self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic()

    def finished(self, fd: int) -> None:
        session_id, pid = self.done_pipes.pop(fd)
        data = os.read(fd, 16)
        os.close(fd)
        self.spare_after_session()
        if data:
            self.send({"event": "finished", "id": session_id, "pid": pid})

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            kill_group(pid)  # whatever the worker forked dies with it
            if pid in self.checks:
                self.checked(pid, code)
                continue
            if self.spare is not None and pid == self.spare.pid:
                self.spare.channel.close()
                os.close(self.spare.done)
                self.spare = None
                self.spare_due = time.monotonic() + self.respawn_delay
                self.send({"event": "spare-failed", "pid": pid, "code": code})
                continue
            session_dir = self.session_dirs.pop(pid, None)
            if session_dir is not None:  # here, not in the daemon's reactor thread
                shutil.rmtree(session_dir, ignore_errors=True)
            session_id = self.children.pop(pid, None)
            if session_id is not None:
                self.spare_after_session()
                self.send({"event": "exited", "id": session_id, "pid": pid, "code": code})

    def checked(self, pid: int, code: int) -> None:
        check_id, verdict_r = self.checks.pop(pid)
        try:
            error = os.read(verdict_r, 4096).decode("utf-8", "replace")
        except OSError:
            error = ""
        os.close(verdict_r)
        if code == -signal.SIGALRM and not error:
            error = f"health check failed: no answer within {CHECK_ALARM_SECONDS}s"
        elif code != 0 and not error:
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            error = f"health check failed: the check worker died ({how}); see its output above"
        if code == 0 and self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic()
        self.send({"event": "checked", "id": check_id, "ok": code == 0, "error": error})

    def shutdown(self, code: int) -> None:
        pids = [*self.children, *self.checks] + ([self.spare.pid] if self.spare else [])
        for pid in pids:
            kill_group(pid)
        os._exit(code)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a worker called setsid), or the process."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def spare_main(tvm_ffi: Any, channel: socket.socket, done_w: int, args: argparse.Namespace) -> int:
    """Body of a forked worker: prepare, wait for a session socket, serve it, say done."""
    try:
        prepare_worker(args)
    except NotReadyError as exc:  # report and exit; the zygote retries later
        print(f"worker not ready: {exc}", file=sys.stderr)
        return 4
    data, fds, _flags, _addr = socket.recv_fds(channel, 65536, 1)
    channel.close()
    if not data or not fds:
        return 0  # the zygote went away before a session came
    if args.memory_limit:
        limit_memory(args.memory_limit)
    code = run_session(tvm_ffi, fds[0], json.loads(data)["dir"])
    os.write(done_w, b"d")
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tvmrpc.server.worker")
    parser.add_argument("--control-fd", type=int, default=3)
    parser.add_argument("--runtime-library", default=None)
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--init", action="append", default=[])
    parser.add_argument("--memory-limit", type=int, default=0)
    return parser.parse_args(argv)


def limit_memory(limit: int) -> None:
    """Cap this worker's address space (RLIMIT_AS): allocations past it fail cleanly."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    try:
        tvm_ffi = load_runtime_or_explain(args.runtime_library)
    except NotReadyError as exc:  # tell the daemon why in one line, then exit
        with contextlib.suppress(OSError):
            control.sendall(json.dumps({"event": "failed", "error": str(exc)}).encode() + b"\n")
        return 2
    Zygote(control, tvm_ffi, args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
