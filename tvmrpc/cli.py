"""The ``tvmrpc`` command: ``tvmrpc query``, ``tvmrpc demo``, ``tvmrpc systemd-units``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; this module only dispatches, importing the one chosen.

Invariant: what ``--help`` prints is plain text (``DESCRIPTION`` and the
subcommands' help), never this docstring's reST markup.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = (
    "Commands around tvmrpc's daemons. The daemons themselves run under twistd:\n"
    "twistd -n tvm-tracker, twistd -n tvm-proxy, twistd -n tvm-server (each takes --help)."
)
SUBCOMMANDS = {
    "query": ("tvmrpc.query", "print a tracker's server list and queue status"),
    "demo": ("tvmrpc.demo", "tracker, proxy and servers; a stock client runs a compiled model"),
    "drain": ("tvmrpc.labctl", "stop handing out a board (or a key) for maintenance"),
    "resume": ("tvmrpc.labctl", "hand a drained or quarantined board out again"),
    "systemd-units": ("tvmrpc.systemd.units", "write the systemd units for an install prefix"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tvmrpc",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if command == [name]:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
