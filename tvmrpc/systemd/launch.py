"""The ``tvm-tracker``, ``tvm-proxy`` and ``tvm-server`` commands the units run.

``tvm-server ARGS`` is ``twistd --nodaemon --pidfile= $TVMRPC_TWISTD_ARGS
tvm-server ARGS``: one ExecStart layout (``PREFIX/bin/tvm-<daemon> FLAGS``)
for a virtualenv install and for the crossbuild bundle, whose shell launcher
``bin/tvm-server`` does the same. ``TVMRPC_TWISTD_ARGS`` carries twistd's
own options (they must come before the daemon's name), e.g.
``--logger=tvmrpc.jsonlog.observer``.

Invariants:
- The daemon runs in the foreground (systemd supervises it) and writes no
  pid file; the process that systemd started is the daemon (no fork), so
  ``NOTIFY_SOCKET``, ``LISTEN_PID`` and ``WATCHDOG_PID`` stay valid.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

TWISTD_ARGS_VARIABLE = "TVMRPC_TWISTD_ARGS"


def twistd_argv(
    plugin: str, args: Sequence[str], environ: dict[str, str] | None = None
) -> list[str]:
    """The ``sys.argv`` twistd gets for ``plugin`` (pure)."""
    env = os.environ if environ is None else environ
    extra = shlex.split(env.get(TWISTD_ARGS_VARIABLE, ""))
    return ["twistd", "--nodaemon", "--pidfile=", *extra, plugin, *args]


def _run(plugin: str) -> None:
    from twisted.scripts.twistd import run

    sys.argv = twistd_argv(plugin, sys.argv[1:])
    run()


def tracker() -> None:
    """``tvm-tracker``: the tracker in the foreground."""
    _run("tvm-tracker")


def proxy() -> None:
    """``tvm-proxy``: the proxy in the foreground."""
    _run("tvm-proxy")


def server() -> None:
    """``tvm-server``: the server in the foreground."""
    _run("tvm-server")
