"""Follow a daemon's log file: its new lines, and a wake-up when it grows or the daemon exits.

A daemon writes straight into its log file (no pipe, no reader thread), so
the file survives the harness and a ``--keep`` daemon keeps logging after
the demo exits. Waiting is event driven: Linux ``inotify`` says the file was
written, a ``pidfd`` says the process exited; ``select`` waits on both with
the caller's deadline. This module is the one place that knows those two
Linux interfaces (inotify through libc, as the stdlib has no binding).

Invariants:
- :class:`LineReader` returns every complete line exactly once, in order,
  and a final unterminated line only when asked (the writer has exited).
- :meth:`Wakeup.wait` returns when the file may have grown, the process may
  have exited, or ``timeout`` passed, whichever is first; callers re-check
  what they wait for after every return.
- :func:`wait_exit` waits for any process's exit on a pidfd (a zombie has exited).
- Where inotify or a pidfd cannot be had (the per-user inotify instance
  limit is reached, an old kernel), the wait degrades to re-checking every
  :data:`FALLBACK_SECONDS`: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from pathlib import Path

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
#: How often to re-check when inotify is unavailable (never used otherwise).
FALLBACK_SECONDS = 0.05

_libc = ctypes.CDLL(None, use_errno=True)


class LineReader:
    """The lines appended to ``path`` since the last call, decoded leniently."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self, final: bool = False) -> list[str]:
        """New complete lines; with ``final``, an unterminated last line too."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            data = b""
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if final and self._partial:
            complete.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in complete]


class Wakeup:
    """Wake when ``path`` is written to or the process behind ``pidfd`` exits."""

    def __init__(self, path: Path, pidfd: int | None) -> None:
        self._pidfd = pidfd
        self._inotify: int | None = None
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return  # EMFILE (instance limit) or ENOSYS: fall back to re-checking
        if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY | IN_CLOSE_WRITE) < 0:
            os.close(fd)
            return
        self._inotify = fd

    def wait(self, timeout: float) -> None:
        """Block until a write, an exit or ``timeout`` seconds, then drain the events."""
        fds = [fd for fd in (self._inotify, self._pidfd) if fd is not None]
        if self._inotify is None or self._pidfd is None:
            timeout = min(timeout, FALLBACK_SECONDS)
        readable, _, _ = select.select(fds, [], [], max(timeout, 0.0))
        if self._inotify is not None and self._inotify in readable:
            try:
                while os.read(self._inotify, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        if self._inotify is not None:
            os.close(self._inotify)
            self._inotify = None

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.ESRCH):
            return None
        raise


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (any, not only a child) has exited or exits within ``timeout``.

    Waits on a pidfd, so a zombie counts as exited and nothing sleeps.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
