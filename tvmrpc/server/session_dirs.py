"""Where session directories live, and clearing those a killed daemon left behind.

Each daemon makes one parent directory ``tvm-server-XXXXXXXX`` under the
work directory (``--workdir`` or ``$TMPDIR``) and keeps an exclusive
``flock`` on its ``.lock`` file for as long as it runs; its sessions'
directories are made inside it.

Invariants:
- :func:`remove_stale` removes only ``tvm-server-*`` directories whose lock
  it can take, i.e. whose daemon is gone (a SIGKILLed daemon's lock is
  released by the kernel). A live daemon's directory is never touched, nor
  anything that lacks the lock file (not ours).
- :meth:`SessionRoot.close` removes the daemon's own directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "tvm-server-"
LOCK = ".lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if someone else holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(parent: str) -> list[str]:
    """Remove the session directories of daemons that are gone; return what was removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(Path(parent).iterdir()):
            if not entry.name.startswith(PREFIX) or not entry.is_dir() or entry.is_symlink():
                continue
            fd = _try_lock(entry / LOCK)
            if fd is None:
                continue  # a live daemon's, or not ours
            try:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
            finally:
                os.close(fd)
    return removed


class SessionRoot:
    """This daemon's locked parent directory for its sessions."""

    def __init__(self, parent: str) -> None:
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
        lock = Path(self.path) / LOCK
        lock.touch()
        fd = _try_lock(lock)
        if fd is None:  # cannot happen: the directory is brand new
            raise RuntimeError(f"cannot lock {lock}")
        self._fd: int | None = fd

    def new_session(self) -> str:
        return tempfile.mkdtemp(prefix="session-", dir=self.path)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
