"""``tvmrpc drain`` and ``tvmrpc resume``: steer a tracker's boards through its admin API.

``tvmrpc drain --tracker-status URL BOARD`` (``addr:port``) or ``--key KEY``;
the token comes from ``--token-file`` (or ``$TVMRPC_ADMIN_TOKEN_FILE``), the
same file the tracker reads with ``--admin-token-file``. Plain HTTP through
the standard library: no reactor needed for one request.

Exit statuses: 0 done, 1 the tracker refused or could not be reached (one
line says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from .tracker.admin import AdminTokenError, read_token

TOKEN_ENV = "TVMRPC_ADMIN_TOKEN_FILE"

WHAT_HAPPENS = {
    "drain": "gets no new sessions; a running session finishes, then it shows as maintenance",
    "resume": "is handed out again",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracker-status",
        required=True,
        metavar="URL",
        help="the tracker's status endpoint, e.g. http://labhost:9180",
    )
    parser.add_argument("board", nargs="?", help="the board as addr:port (as the status shows)")
    parser.add_argument("--key", help="every board of this key instead of one board")
    parser.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_ENV),
        help=f"file holding the admin token (default ${TOKEN_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def run(args: argparse.Namespace) -> int:
    action = args.command
    if (args.board is None) == (args.key is None):
        print(f"tvmrpc {action}: name one BOARD (addr:port) or --key KEY", file=sys.stderr)
        return 2
    if not args.token_file:
        print(f"tvmrpc {action}: pass --token-file FILE or set ${TOKEN_ENV}", file=sys.stderr)
        return 2
    try:
        token = read_token(args.token_file)
    except AdminTokenError as exc:
        print(f"tvmrpc {action}: {exc}", file=sys.stderr)
        return 2
    target = {"board": args.board} if args.board is not None else {"key": args.key}
    url = args.tracker_status.rstrip("/") + f"/api/v1/admin/{action}"
    request = urllib.request.Request(
        url,
        data=json.dumps(target).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            json.load(response)
    except urllib.error.HTTPError as exc:
        reason = _error_text(exc)
        if exc.code == 404:
            reason = "no admin API there: start the tracker with --status and --admin-token-file"
        print(f"tvmrpc {action}: the tracker refused ({exc.code}): {reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"tvmrpc {action}: cannot reach {url}: {why}", file=sys.stderr)
        return 1
    name = f"board {args.board}" if args.board is not None else f"every board of key {args.key}"
    print(f"{action}: {name} {WHAT_HAPPENS[action]}")
    return 0


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except ValueError:
        return str(exc.reason)
