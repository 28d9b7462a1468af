"""Run benchmarks: ``python -m bench [tracker|scale|server|proxy ...]`` (default: all).

Each benchmark module has ``main(argv) -> int``; it starts the stock
component and ours, drives both the same way, and prints figures and ratios.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("tracker", "scale", "server", "proxy")


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    flags = [a for a in argv if a.startswith("-")]
    status = 0
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"=== bench {name} ===", flush=True)
        status |= module.main(flags)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
