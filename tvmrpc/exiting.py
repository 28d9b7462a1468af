"""Ending a twistd daemon with a meaningful exit status.

``twistd`` exits 0 however the reactor was stopped, so a daemon that cannot
do its job (port taken, duplicate key at the proxy) would look like a clean
stop to systemd. :func:`stop_with_exit_code` stops the reactor (once it runs,
if it has not started yet) and leaves with ``code`` after shutdown finished.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def stop_with_exit_code(reactor: Any, code: int) -> None:
    """Stop the reactor, let shutdown triggers run, then exit with ``code``."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
