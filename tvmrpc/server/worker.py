"""The worker zygote: ``python -m tvmrpc.server.worker`` (spawned by the daemon).

One process loads ``tvm_ffi`` and the TVM runtime library once, then forks a
fresh worker per session. It imports nothing of tvmrpc besides this module
and nothing heavy: numpy, ml_dtypes, cloudpickle and tornado are blocked
while ``tvm_ffi`` loads (it only tries numpy optionally), so the zygote has
no threads and forking it is safe and fast.

Control channel: the daemon passes a connected UNIX stream socket as fd 3
(``--control-fd``). Lines of JSON flow both ways:

- zygote → daemon: ``{"event": "ready", "pid": P, "str_type_index": N}``
  once warm; ``{"event": "started", "id": I, "pid": P}`` after each fork;
  ``{"event": "exited", "id": I, "pid": P, "code": C}`` when a worker is reaped
  (``C`` is negative for a signal, as :func:`os.waitstatus_to_exitcode`).
- daemon → zygote: ``{"cmd": "serve", "id": I, "dir": D}``, with the session
  socket attached (SCM_RIGHTS) to bytes of the same line.

Invariants: a worker runs exactly one session (``rpc.ServerLoop`` on the fd)
in its own process group (so the daemon can kill its whole tree) with its
session directory as cwd, then exits. When the control channel closes the
zygote kills the workers it still has and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path
from typing import Any

#: Modules kept out of the zygote while tvm_ffi loads (it imports numpy if it can).
BLOCKED_WHILE_LOADING = ("numpy", "ml_dtypes", "torch", "cloudpickle", "tornado")
RUNTIME_NAME = "libtvm_runtime.so"


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


def run_session(
    tvm_ffi: Any, fd: int, root: str, load_libraries: list[str], init_modules: list[str]
) -> int:
    """Body of a forked worker: one ``rpc.ServerLoop`` on ``fd`` in ``root``; return exit code."""
    try:
        os.chdir(root)
        register_session_functions(tvm_ffi, root)
        for library in load_libraries:
            ctypes.CDLL(library, ctypes.RTLD_GLOBAL)
        for module in init_modules:
            importlib.import_module(module)
        tvm_ffi.get_global_func("rpc.ServerLoop")(fd)
        return 0
    except BaseException:  # noqa: BLE001 - a worker reports and exits, whatever happened
        traceback.print_exc()
        return 1
    finally:
        end_connection(fd)


def end_connection(fd: int) -> None:
    """Send FIN now: the daemon's duplicate of the socket must not keep the client waiting."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class Zygote:
    """The fork server loop (see the module docstring for the protocol)."""

    def __init__(self, control: socket.socket, tvm_ffi: Any, args: argparse.Namespace) -> None:
        self.control = control
        self.tvm_ffi = tvm_ffi
        self.args = args
        self.buffer = b""
        self.fds: list[int] = []
        self.children: dict[int, int] = {}  # pid -> session id

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
            readable, _, _ = select.select([self.control, wake_r], [], [])
            if wake_r in readable:
                os.read(wake_r, 4096)
                self.reap()
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
        return True

    def serve(self, session_id: int, root: str, fd: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                for signum in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                self.control.close()
                for other in self.fds:
                    os.close(other)
                code = run_session(self.tvm_ffi, fd, root, self.args.load_library, self.args.init)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        self.children[pid] = session_id
        self.send({"event": "started", "id": session_id, "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            session_id = self.children.pop(pid, None)
            if session_id is not None:
                code = os.waitstatus_to_exitcode(status)
                self.send({"event": "exited", "id": session_id, "pid": pid, "code": code})

    def shutdown(self, code: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tvmrpc.server.worker")
    parser.add_argument("--control-fd", type=int, default=3)
    parser.add_argument("--runtime-library", default=None)
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--init", action="append", default=[])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    try:
        tvm_ffi = load_runtime(find_runtime_library(args.runtime_library))
    except BaseException as exc:  # noqa: BLE001 - tell the daemon why, then exit
        traceback.print_exc()
        with contextlib.suppress(OSError):
            control.sendall(json.dumps({"event": "failed", "error": str(exc)}).encode() + b"\n")
        return 2
    Zygote(control, tvm_ffi, args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
