"""``tvmrpc demo``: the whole system on this machine in one command.

Starts our tracker, a proxy registered with it, one server registered with
the tracker directly and one that reaches it through the proxy (all as
``twistd -n`` subprocesses on loopback), compiles a small relax MLP, and
runs it on each key with the stock TVM client, checking against numpy.
``--board aarch64`` puts the proxied server on an emulated aarch64 board.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_STEP_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address every daemon binds to (default 127.0.0.1)"
    )
    parser.add_argument(
        "--tracker-port",
        type=int,
        default=0,
        help="tracker port (default 0: a free port the kernel picks)",
    )
    parser.add_argument(
        "--direct-key",
        default="demo-direct",
        help="key of the server registered with the tracker directly",
    )
    parser.add_argument(
        "--proxied-key", default="demo-proxied", help="key of the server behind the proxy"
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="where daemon logs and the compiled model go (default: new temp dir)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=DEFAULT_STEP_TIMEOUT,
        help=f"seconds any one step may take (default {DEFAULT_STEP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the daemons running and print how to use and stop them",
    )
    parser.add_argument(
        "--board",
        choices=["aarch64"],
        default=None,
        help="run the proxied server on an emulated board of this architecture "
        "(needs root, binfmt_misc, qemu-user-static and mmdebstrap)",
    )
    parser.add_argument(
        "--bundle",
        default=None,
        metavar="FILE.tar.gz",
        help="with --board: try this crossbuild bundle on the board instead of "
        "making one from this checkout",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where --board keeps its root filesystem and wheels "
        "(default: $TVMRPC_CACHE_DIR, else ~/.cache/tvmrpc)",
    )


def run(args: argparse.Namespace) -> int:
    from .board import default_cache_dir
    from .runner import main

    if args.bundle and not args.board:
        print("tvmrpc demo: --bundle needs --board aarch64", file=sys.stderr)
        return 2
    if args.cache_dir is None:
        args.cache_dir = str(default_cache_dir())

    return main(args)
