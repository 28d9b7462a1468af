"""The health check: a fresh worker serves one loopback RPC session to itself.

Invariants:
- :func:`run_check` runs in a forked check worker; it returns 0 when the
  worker could load everything (``--load-library``, ``--init``, under
  ``--session-memory-limit``) and the runtime's RPC loop answered a packed
  call, else writes one line (cause and fix) to its verdict pipe and
  returns 1.
- A check that hangs dies by SIGALRM after :data:`CHECK_ALARM_SECONDS`,
  before the daemon's own timeout; :func:`verdict` then says so.
- The check's server side is a child of the check worker: it is reaped or
  killed before :func:`self_test` returns.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from typing import Any

from .processes import kill_group, limit_memory
from .runtime import NotReadyError, WorkerOptions, one_line, prepare_worker

#: A health-check worker still running after this long is killed by SIGALRM.
CHECK_ALARM_SECONDS = 25
#: The most of a verdict line that travels through the pipe.
MAX_VERDICT = 4000


def recv_exactly(conn: socket.socket, size: int) -> bytes:
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
            _serve_one(tvm_ffi, listener)
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
            f"({type(exc).__name__}: {one_line(exc)}){hint}"
        ) from None
    finally:
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NotReadyError(
            f"health check failed: the RPC server loop exited with "
            f"{os.waitstatus_to_exitcode(status)}"
        )


def _serve_one(tvm_ffi: Any, listener: socket.socket) -> None:
    """The self test's server side: answer the handshake, then run the RPC loop."""
    conn, _ = listener.accept()
    conn.settimeout(10)
    # The client writes magic, length and key separately; a socket with a
    # timeout is non-blocking underneath, so MSG_WAITALL may return less.
    magic, length = struct.unpack("<ii", recv_exactly(conn, 8))
    recv_exactly(conn, length)
    key = b"server:health-check"
    conn.sendall(struct.pack("<ii", magic, len(key)) + key)
    conn.setblocking(True)
    tvm_ffi.get_global_func("rpc.ServerLoop")(conn.detach())


def run_check(tvm_ffi: Any, options: WorkerOptions, verdict_w: int) -> int:
    """Body of a check worker: prepare as a session's worker would, then :func:`self_test`."""
    # A check that hangs dies (SIGALRM) before the daemon's own 30 s timeout;
    # the zygote's reaper then kills its whole group.
    signal.alarm(CHECK_ALARM_SECONDS)
    try:
        prepare_worker(options)
        if options.memory_limit:  # a session's limit must leave room to serve
            limit_memory(options.memory_limit)
        self_test(tvm_ffi)
    except NotReadyError as exc:
        message = str(exc)
        if options.memory_limit:
            message += (
                f" (under --session-memory-limit {options.memory_limit}: "
                "if that is too low for the runtime, raise it)"
            )
        os.write(verdict_w, message.encode()[:MAX_VERDICT])
        return 1
    return 0


def verdict(code: int, written: str) -> str:
    """The check's one-line verdict from its exit code and what it wrote ("" = passed)."""
    if code == -signal.SIGALRM and not written:
        return f"health check failed: no answer within {CHECK_ALARM_SECONDS}s"
    if code != 0 and not written:
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        return f"health check failed: the check worker died ({how}); see its output above"
    return written
