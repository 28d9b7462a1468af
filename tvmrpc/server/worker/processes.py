"""Process plumbing for the zygote: forking a worker, killing its tree, capping its memory.

Invariants:
- A child made by :func:`fork_worker` leads its own process group (so
  :func:`kill_group` ends everything it started), runs its body with the
  zygote's signal handlers and descriptors gone, and never returns into the
  zygote's loop: it leaves through ``os._exit`` with the body's code (1 and a
  traceback on stderr if the body raised).
- :func:`kill_group` never raises: the group or process may be gone already.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable


def fork_worker(reset: Callable[[], None], body: Callable[[], int]) -> int:
    """Fork; in the child call ``reset`` then ``body`` and exit with its code. Return the pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        os.setsid()
        reset()
        code = body()
    except BaseException:  # noqa: BLE001 - report, then exit below
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a worker called setsid), and the process."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def limit_memory(limit: int) -> None:
    """Cap this worker's address space (RLIMIT_AS): allocations past it fail cleanly."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
