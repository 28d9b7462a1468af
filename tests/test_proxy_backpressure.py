"""Backpressure: a reader that stops reading pauses the writer; the proxy's memory stays flat."""

from __future__ import annotations

import hashlib
import select
import threading

import psutil
import pytest

from tests.proxy_support import raw_pair, start_proxy
from tests.support import running

MiB = 1 << 20
BLOCK = bytes((i * 7919) % 251 for i in range(MiB))  # 1 MiB, not a multiple of 256 in period
STALL_SECONDS = 3.0  # no writability for this long means the writer is held back


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def expected_digest(total: int) -> str:
    digest = hashlib.sha256()
    for _ in range(total // MiB):
        digest.update(BLOCK)
    return digest.hexdigest()


def push_to_stalled_reader(log_dir, total: int, path: str) -> None:
    extra = ["--no-splice"] if path == "userspace" else []
    with running(start_proxy(log_dir, *extra)) as proxy:
        server, client = raw_pair(proxy.port, "bp")
        assert proxy.wait_for(r"forwarding \S+ and \S+ by (\w+)").group(1) == path
        with server, client:
            baseline = rss(proxy.proc.pid)
            # Push without blocking until the proxy stops taking bytes.
            client.setblocking(False)
            sent = 0
            view = memoryview(BLOCK)
            while sent < total:
                _, writable, _ = select.select([], [client], [], STALL_SECONDS)
                if not writable:
                    break
                offset = sent % MiB
                sent += client.send(view[offset:])
            held_back_at = sent
            growth = rss(proxy.proc.pid) - baseline
            assert held_back_at < 64 * MiB, "the proxy kept reading a writer it could not flush"
            assert growth < 16 * MiB, f"proxy RSS grew {growth / MiB:.1f} MiB"

            # Now read everything; the writer finishes.
            result: dict[str, object] = {}

            def read_all() -> None:
                digest, got = hashlib.sha256(), 0
                while got < total:
                    chunk = server.recv(4 * MiB)
                    if not chunk:
                        break
                    digest.update(chunk)
                    got += len(chunk)
                result.update(got=got, digest=digest.hexdigest())

            reader = threading.Thread(target=read_all)
            reader.start()
            client.setblocking(True)
            client.settimeout(120)
            next_sample = sent
            while sent < total:
                offset = sent % MiB
                sent += client.send(view[offset:])
                if sent >= next_sample:
                    growth = max(growth, rss(proxy.proc.pid) - baseline)
                    next_sample += 32 * MiB
            reader.join(300)
            print(
                f"{path}: held back at {held_back_at / MiB:.1f} MiB, "
                f"RSS growth {growth / MiB:.1f} MiB"
            )
            assert result == {"got": total, "digest": expected_digest(total)}
            assert growth < 16 * MiB, f"proxy RSS grew {growth / MiB:.1f} MiB"


PATHS = pytest.mark.parametrize("path", ["splice", "userspace"])


@PATHS
def test_stalled_reader_256mib(log_dir, path):
    push_to_stalled_reader(log_dir, 256 * MiB, path)


@pytest.mark.slow
@PATHS
def test_stalled_reader_1gib(log_dir, path):
    push_to_stalled_reader(log_dir, 1024 * MiB, path)
