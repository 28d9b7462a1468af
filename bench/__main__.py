"""Run benchmarks: ``python -m bench [tracker|scale|server|proxy ...] [FLAGS]`` (default: all).

Each benchmark module has ``main(argv) -> int``; it starts the stock
component and ours (through :mod:`tvmrpc.harness`), drives both the same
way, and prints figures and ratios. FLAGS (``--quick``, ...) go to every
benchmark named; ``python -m bench NAME --help`` lists a benchmark's own.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("tracker", "scale", "server", "proxy")
HELP = ("-h", "--help")


def usage() -> str:
    """The overview: every benchmark with the first line of its docstring."""
    lines = [
        "usage: python -m bench [BENCHMARK ...] [FLAGS]",
        "",
        "Stock TVM and tvmrpc side by side; with no BENCHMARK, all of them.",
        "FLAGS (e.g. --quick) go to each; python -m bench BENCHMARK --help lists them.",
        "",
        "benchmarks:",
    ]
    for name in BENCHMARKS:
        doc = (importlib.import_module(f"bench.{name}").__doc__ or "").strip()
        summary = doc.splitlines()[0].replace("``", "") if doc else ""  # no reST in help
        lines.append(f"  {name:<8} {summary}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(
            f"python -m bench: no benchmark {unknown[0]!r}; one of {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    if not names and any(flag in HELP for flag in flags):
        print(usage())
        return 0
    status = 0
    for name in names or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        print(f"=== bench {name} ===", flush=True)
        status |= module.main(flags)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
