"""Profile our tracker at scale: where its memory and its SUMMARY time go.

``python -m bench.scale_profile [--boards=N] [--memory] [--cpu]`` starts our
tracker under ``twistd`` (as ``bench scale`` does), registers N boards on N
connections with ``bench scale``'s helpers, then asks the tracker (SIGUSR1) to
write, into a file read here:

- its RSS (``/proc/self/statm``, what ``bench scale`` reads with psutil);
- with ``--memory``: the top allocation sites by line (tracemalloc, started
  before Twisted is imported; RSS is then inflated by tracemalloc itself, so
  read RSS from a run without it);
- with ``--cpu``: the top functions of 20 SUMMARY rebuilds (cProfile), the
  cache invalidated before each, and the top functions of everything the
  tracker did until then (accepting and registering every board).

``SCALE_PROFILE_DEPTH=N`` keeps N frames per allocation (default 1).
The hook lives in this module's ``serve`` entry, which installs the signal
handler and then runs twistd: nothing of it is in tvmrpc.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

TOP = 25


def _dump(out: Path, profiler) -> None:  # runs in the tracker process
    import cProfile
    import gc
    import io
    import pstats
    import tracemalloc

    gc.unfreeze()  # the tracker froze what start-up made; get_objects() must see it
    lines = []
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    lines.append(f"RSS {rss:.1f} MiB")
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(TOP)
        lines.append("== cProfile, start-up and registration (by own time) ==")
        lines.append(text.getvalue())
        from tvmrpc.tracker.protocol import TrackerFactory

        factory = next(o for o in gc.get_objects() if isinstance(o, TrackerFactory))
        t0 = time.perf_counter()
        for _ in range(20):
            factory.info_changed()
            factory.summary_frame()
        lines.append(
            f"SUMMARY rebuild, no profiler: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms"
        )
        t0 = time.perf_counter()
        for _ in range(20):
            factory.scheduler.generation += 1  # queue counts only: the server list is reused
            factory.summary_frame()
        lines.append(
            f"SUMMARY, queue counts changed: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms"
        )
        summary = cProfile.Profile()
        t0 = time.perf_counter()
        for _ in range(20):
            factory.info_changed()
            summary.runcall(factory.summary_frame)
        lines.append(
            f"== cProfile, 20 SUMMARY rebuilds ({(time.perf_counter() - t0) / 20 * 1e3:.2f} ms "
            f"each under the profiler, frame {len(factory.summary_frame())} bytes) =="
        )
        text = io.StringIO()
        pstats.Stats(summary, stream=text).sort_stats("cumulative").print_stats(TOP)
        lines.append(text.getvalue())
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")
        total = sum(s.size for s in stats)
        lines.append(f"== tracemalloc by line: {total / (1 << 20):.1f} MiB traced ==")
        for stat in stats[:TOP]:
            frame = stat.traceback[0]
            lines.append(
                f"{stat.size / 1024:10.1f} KiB {stat.count:8d} blocks  "
                f"{frame.filename}:{frame.lineno}"
            )
        by_file = snapshot.statistics("filename")
        lines.append("== tracemalloc by file ==")
        for stat in by_file[:15]:
            lines.append(f"{stat.size / 1024:10.1f} KiB  {stat.traceback[0].filename}")
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    lines.append("== gc-tracked objects by type ==")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:TOP]:
        lines.append(f"{n:10d}  {name}")
    out.write_text("\n".join(lines) + "\n")
    print("scale-profile written", flush=True)


def serve(argv: list[str]) -> None:
    """Run twistd with the profiling hook (``argv``: the twistd arguments)."""
    out = Path(os.environ["SCALE_PROFILE_OUT"])
    if os.environ.get("SCALE_PROFILE_MEMORY"):
        import tracemalloc

        tracemalloc.start(int(os.environ.get("SCALE_PROFILE_DEPTH", "1")))
    profiler = None
    if os.environ.get("SCALE_PROFILE_CPU"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    signal.signal(signal.SIGUSR1, lambda *_: _dump(out, profiler))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


def main(flags: list[str]) -> int:
    from bench import scale
    from tvmrpc.harness import LISTENING, Process, running

    parser = argparse.ArgumentParser(prog="python -m bench.scale_profile")
    parser.add_argument("--boards", type=int, default=10000)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args, _ = parser.parse_known_args(flags)
    scale.raise_nofile()
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        out = Path(tmp) / "profile.txt"
        env = dict(os.environ, SCALE_PROFILE_OUT=str(out), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
        )
        if args.memory:
            env["SCALE_PROFILE_MEMORY"] = "1"
        if args.cpu:
            env["SCALE_PROFILE_CPU"] = "1"
        argv = [sys.executable, "-m", "bench.scale_profile", "serve", "-n", "--pidfile="]
        argv += ["tvm-tracker", "--listen", "tcp:0:interface=127.0.0.1:backlog=4096"]
        argv += ["--max-connections-per-peer", "0"]
        daemon = Process(argv, Path(tmp) / "tracker.log", env=env)
        with running(daemon):
            port = int(daemon.wait_for(LISTENING).group(2))
            ctx = multiprocessing.get_context("fork")
            ready, done, lock = ctx.Queue(), ctx.Event(), ctx.Lock()
            each = args.boards // scale.HELPERS
            helpers = [
                ctx.Process(target=scale._boards, args=(port, h * each, each, lock, ready, done))
                for h in range(scale.HELPERS)
            ]
            t0 = time.perf_counter()
            for helper in helpers:
                helper.start()
            registered = sum(scale._next(ready, helpers) for _ in helpers)
            print(f"{registered} boards registered in {time.perf_counter() - t0:.1f} s")
            os.kill(daemon.proc.pid, signal.SIGUSR1)
            daemon.wait_for("scale-profile written", timeout=1200)
            print(out.read_text())
            done.set()
            for helper in helpers:
                helper.join(timeout=60)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
