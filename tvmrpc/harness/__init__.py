"""One harness to run daemons: the demo, the tests and the bench start them all through it.

- :mod:`.process`: :class:`Process` (any command) and :class:`Daemon` (ours
  under ``twistd -n``): own session, log file, waits on log lines, group stop.
- :mod:`.commands`: command lines, :func:`child_env` (the environment every
  child gets) and :func:`run_module` (``python -m X`` to completion).
- :mod:`.logwatch`: following a log file and awaiting an exit without
  sleeping (inotify, pidfd).
- :mod:`.starters`: ours and stock daemons on loopback, returned once ready.
- :mod:`.sockets`: free ports and the raw handshakes stock peers send.

Invariants:
- Importing this package starts nothing and imports neither Twisted nor tvm.
- The PYTHONPATH every child gets comes from :mod:`tvmrpc.pythonpath`, the
  one builder the server's workers use too.
"""

from __future__ import annotations

from .commands import DEFAULT_TIMEOUT, child_env, module_argv, run_module, twistd_argv
from .logwatch import wait_exit
from .process import (
    CANNOT_LISTEN,
    LISTENING,
    LIVE,
    Daemon,
    DaemonError,
    Group,
    Process,
    running,
)
from .sockets import free_port, raw_pair, stock_tracker_socket
from .starters import (
    start_proxied_server,
    start_proxy,
    start_server,
    start_stock_proxy,
    start_stock_server,
    start_stock_tracker,
    start_tracker,
)

__all__ = [
    "CANNOT_LISTEN",
    "DEFAULT_TIMEOUT",
    "LISTENING",
    "LIVE",
    "Daemon",
    "DaemonError",
    "Group",
    "Process",
    "child_env",
    "free_port",
    "module_argv",
    "raw_pair",
    "run_module",
    "running",
    "start_proxied_server",
    "start_proxy",
    "start_server",
    "start_stock_proxy",
    "start_stock_server",
    "start_stock_tracker",
    "start_tracker",
    "stock_tracker_socket",
    "twistd_argv",
    "wait_exit",
]
