"""``tvmrpc demo``: the whole system on this machine in one command.

Starts our tracker, a proxy registered with it, one server registered with
the tracker directly and one that reaches it through the proxy (all as
``twistd -n`` subprocesses on loopback), compiles a small relax MLP, and
runs it on each key with the stock TVM client, checking against numpy.
"""

from __future__ import annotations

import argparse

DEFAULT_STEP_TIMEOUT = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address every daemon binds to (default 127.0.0.1)")
    parser.add_argument("--tracker-port", type=int, default=0,
                        help="tracker port (default 0: a free port the kernel picks)")
    parser.add_argument("--direct-key", default="demo-direct",
                        help="key of the server registered with the tracker directly")
    parser.add_argument("--proxied-key", default="demo-proxied",
                        help="key of the server behind the proxy")
    parser.add_argument("--log-dir", default=None,
                        help="where daemon logs and the compiled model go (default: new temp dir)")
    parser.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT,
                        help=f"seconds any one step may take (default {DEFAULT_STEP_TIMEOUT:g})")
    parser.add_argument("--keep", action="store_true",
                        help="leave the daemons running and print how to use and stop them")


def run(args: argparse.Namespace) -> int:
    from .runner import main

    return main(args)
