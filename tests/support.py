"""Helpers for integration tests: start real daemons and wait for what they log.

The harness itself is :mod:`tvmrpc.harness` (shared with the demo and the
bench); this module keeps the names the tests import.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tvmrpc.harness import (
    DEFAULT_TIMEOUT,
    LISTENING,
    Daemon,
    Process,
    child_env,
    free_port,
    run_module,
    running,
    start_stock_server,
    start_stock_tracker,
    start_tracker,
    stock_tracker_socket,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent

#: The tests' name for :func:`tvmrpc.harness.child_env`.
subprocess_env = child_env

__all__ = [
    "BIN_DIR",
    "DEFAULT_TIMEOUT",
    "LISTENING",
    "REPO_ROOT",
    "Daemon",
    "Process",
    "free_port",
    "run_module",
    "running",
    "start_stock_server",
    "start_stock_tracker",
    "start_tracker",
    "stock_tracker_socket",
    "subprocess_env",
]
