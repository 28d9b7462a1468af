"""``tvmrpc query``: print a tracker's summary as stock ``query_rpc_tracker`` does.

The text output is byte-for-byte what ``python -m tvm.exec.query_rpc_tracker``
prints for the same tracker state; ``--json`` prints the raw summary instead,
with our tracker's ``"tvmrpc"`` field (expected waits) when the tracker is ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectError, ConnectionLost

from .client import MAGIC_TIMEOUT, TrackerError, connect_tracker
from .codec import CodecError
from .summary import format_query_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default=os.environ.get("TVM_TRACKER_HOST") or "127.0.0.1",
        help="tracker host (default $TVM_TRACKER_HOST, else 127.0.0.1; as stock's query)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env_port(),
        help="tracker port (default $TVM_TRACKER_PORT, else 9190; as stock's query)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the tracker (default 10)"
    )


def _env_port() -> int:
    value = os.environ.get("TVM_TRACKER_PORT") or "9190"
    if not value.isdigit():
        raise SystemExit(f"tvmrpc query: TVM_TRACKER_PORT must be a port number, got {value!r}")
    return int(value)


async def fetch_summary(
    reactor: Any, host: str, port: int, timeout: float, extended: bool = False
) -> dict[str, Any]:
    """Connect, ask for SUMMARY, close; fail with TrackerError on anything unexpected."""

    async def call() -> dict[str, Any]:
        # Half the time for the magic, so a non-tracker is named as such before the timeout.
        magic_timeout = max(0.5, min(MAGIC_TIMEOUT, timeout / 2))
        client = await connect_tracker(reactor, host, port, timeout, magic_timeout)
        try:
            summary = await client.summary(extended)
        finally:
            client.close()
        if not isinstance(summary, dict) or "queue_info" not in summary:
            raise TrackerError(f"unexpected SUMMARY reply {summary!r}")
        return summary

    d = defer.ensureDeferred(call())
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise TrackerError(f"no tracker answer from {host}:{port} within {timeout:g} s") from None
    except (ConnectError, ConnectionLost, CodecError) as exc:
        raise TrackerError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Print the summary; one-line error and exit status 1 when it cannot be had."""
    outcome: dict[str, Any] = {}

    async def main(reactor: Any) -> None:
        try:
            outcome["summary"] = await fetch_summary(
                reactor, args.host, args.port, args.timeout, extended=args.json
            )
        except Exception as exc:  # noqa: BLE001 - reported as one line below
            outcome["error"] = exc

        raise SystemExit(_report(args, outcome))

    # react() never returns: it stops the reactor and exits with main's SystemExit code.
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)), [])
    return 1  # not reached


def _report(args: argparse.Namespace, outcome: dict[str, Any]) -> int:
    if "error" in outcome:
        exc = outcome["error"]
        message = str(exc) or type(exc).__name__
        print(
            f"tvmrpc query: cannot query tracker at {args.host}:{args.port}: {message}",
            file=sys.stderr,
        )
        return 1
    summary = outcome["summary"]
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_query_output(args.host, args.port, summary))
    return 0
