"""One client session as a stock TVM user runs it: ask the tracker, upload, run, check.

Host side (needs the TVM compiler's Python package and numpy). Also a small
command, ``python -m tvmrpc.demo.session --tracker H:P --key K --library L``,
that prints one JSON line: the topology test runs it inside a network
namespace, where a stock client is what a developer machine would run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs


@attrs.frozen
class SessionOutcome:
    """What one session did; ``ok`` is numpy's verdict on the remote output."""

    key: str
    ok: bool
    request_seconds: float  # tracker REQUEST until the RPC session is open
    total_seconds: float  # REQUEST until the checked result (upload and run included)
    max_error: float
    #: seconds per forward call measured on the device by time_evaluator (when asked)
    run_seconds: list[float] | None = None

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))


def request_and_run(
    tracker: tuple[str, int],
    key: str,
    library: Path,
    session_timeout: float = 60.0,
    max_retry: int = 5,
    time_runs: int = 0,
) -> SessionOutcome:
    """Request ``key`` with the stock ``connect_tracker``; run the MLP in ``library`` there.

    ``max_retry`` is stock's: how many resources the client tries before it
    gives up. With 1, being handed a dead resource fails the session.
    ``time_runs`` > 0 also times ``forward`` there with TVM's ``time_evaluator``
    (3 means of that many runs each).
    """
    import numpy as np
    from tvm import rpc

    from ..mlp import run_mlp

    started = time.monotonic()
    client = rpc.connect_tracker(tracker[0], tracker[1])
    session = client.request(
        key, priority=1, session_timeout=int(session_timeout), max_retry=max_retry
    )
    opened = time.monotonic()
    try:
        result = run_mlp(session, library, time_runs=time_runs)
    finally:
        del session
    finished = time.monotonic()
    error = float(np.max(np.abs(result.output - result.expected)))
    return SessionOutcome(
        key,
        result.ok,
        opened - started,
        finished - started,
        error,
        list(result.run_seconds) if result.run_seconds else None,
    )


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvmrpc.demo.session",
        description="One client session as a stock TVM user runs it: ask the tracker, "
        "upload, run, check; prints one JSON line.",
    )
    parser.add_argument("--tracker", type=_hostport, required=True, help="tracker HOST:PORT")
    parser.add_argument("--key", required=True, help="device key to request")
    parser.add_argument("--library", type=Path, required=True, help="compiled MLP (build_mlp)")
    parser.add_argument("--session-timeout", type=float, default=60.0)
    parser.add_argument(
        "--max-retry",
        type=int,
        default=5,
        help="resources to try before giving up (stock's max_retry; 1: no retry)",
    )
    parser.add_argument(
        "--time-runs",
        type=int,
        default=0,
        help="also time forward with time_evaluator, N runs per mean (0: no)",
    )
    args = parser.parse_args(argv)
    outcome: Any = request_and_run(
        args.tracker,
        args.key,
        args.library,
        args.session_timeout,
        args.max_retry,
        args.time_runs,
    )
    print(outcome.to_json(), flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
