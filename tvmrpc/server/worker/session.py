"""One session in one worker: wait for the socket, serve it with the runtime's loop, exit.

Invariants:
- A worker runs exactly one session (``rpc.ServerLoop`` on the socket it
  was handed) with its session directory as cwd, then exits.
- Every path a client names (upload, load, list, download) resolves inside
  the session directory; absolute paths and ``..`` escapes are refused.
- When the loop ends the worker shuts the connection down itself (FIN), so
  the client is not kept waiting by the daemon's duplicate of the socket.
- The session socket arrives in the same record as its directory (one
  ``SOCK_SEQPACKET`` record from the zygote): no socket is ever paired with
  another session's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from .processes import limit_memory
from .runtime import NotReadyError, WorkerOptions, prepare_worker

#: Exit code of a spare whose libraries or ``--init`` modules failed to load.
EXIT_NOT_READY = 4
#: Exit code of a spare handed a record it cannot use.
EXIT_BAD_HANDOFF = 3


class PathEscapeError(ValueError):
    """A client path that would leave the session directory."""


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


def hand_over(channel: socket.socket, root: str, fd: int) -> None:
    """Zygote side: send a spare its session directory and socket in one record."""
    socket.send_fds(channel, [json.dumps({"dir": root}).encode()], [fd])


def receive_session(channel: socket.socket) -> tuple[str, int] | None:
    """Spare side: the directory and socket of its session (None: the zygote went away).

    Raises ValueError (one line) for a record it cannot use, having closed
    any descriptor that came with it.
    """
    data, fds, _flags, _addr = socket.recv_fds(channel, 65536, 1)
    if not data and not fds:
        return None
    try:
        root = json.loads(data)["dir"]
        if not isinstance(root, str) or len(fds) != 1:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"unusable hand-off record {data[:120]!r} with {len(fds)} fds") from None
    return root, fds[0]


def spare_main(tvm_ffi: Any, channel: socket.socket, done_w: int, options: WorkerOptions) -> int:
    """Body of a forked worker: prepare, wait for a session socket, serve it, say done."""
    try:
        prepare_worker(options)
    except NotReadyError as exc:  # report and exit; the zygote retries later
        print(f"worker not ready: {exc}", file=sys.stderr)
        return EXIT_NOT_READY
    try:
        handed = receive_session(channel)
    except ValueError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_BAD_HANDOFF
    finally:
        channel.close()
    if handed is None:
        return 0  # the zygote went away before a session came
    root, fd = handed
    if options.memory_limit:
        limit_memory(options.memory_limit)
    code = run_session(tvm_ffi, fd, root)
    os.write(done_w, b"d")
    return code
