"""Helpers for the proxy tests: start our proxy and stock peers, speak the handshake raw."""

from __future__ import annotations

import re
import select
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support import Daemon, Process, subprocess_env
from tvmrpc.codec import RPC_CODE_SUCCESS, RPC_MAGIC, encode_handshake

WEB_LISTENING = re.compile(r"tvm-proxy web listening on (\S+):(\d+)")


def start_proxy(
    log_dir: Path, *extra: str, name: str = "proxy", web: bool = False, verbose: bool = True
) -> Daemon:
    """Our proxy on a kernel-chosen loopback port; ``web_port`` set when ``web``.

    Tests run it ``--verbose`` to wait for its "waits as server" lines.
    """
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--host", "127.0.0.1", *extra]
    if verbose:
        args.append("--verbose")
    if web:
        args += ["--web-port", "0"]
    daemon = Daemon("tvm-proxy", args, log_dir / f"{name}.log")
    daemon.port = int(daemon.wait_for(r"tvm-proxy listening on \S+:(\d+)").group(1))
    if web:
        daemon.web_port = int(daemon.wait_for(WEB_LISTENING).group(2))  # type: ignore[attr-defined]
    return daemon


def start_proxied_server(
    log_dir: Path,
    proxy: Daemon,
    key: str,
    name: str | None = None,
    extra: Sequence[str] = (),
    wait: bool = True,
) -> Process:
    """A stock ``tvm.exec.rpc_server --through-proxy``; with ``wait``, returns once the
    (verbose) proxy holds it."""
    mark = proxy.mark()
    proc = Process(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--through-proxy",
            "--host",
            "127.0.0.1",
            "--port",
            str(proxy.port),
            "--key",
            key,
            *extra,
        ],
        log_dir / f"{name or 'proxied-server-' + key}.log",
        env=subprocess_env(),
    )
    if wait:
        try:
            proxy.wait_for(rf"waits as server {re.escape(key)}\b", start=mark)
        except BaseException:
            proc.stop()  # the caller never gets it, so nobody else would
            raise
    return proc


def start_websocket_server(log_dir: Path, url: str, key: str) -> Process:
    """A stock WebSocket RPC server (``tvm.rpc.proxy.websocket_proxy_server``)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from tvm.rpc.proxy import websocket_proxy_server;"
        "websocket_proxy_server(sys.argv[1], sys.argv[2])"
    )
    return Process(
        [sys.executable, "-c", code, url, key],
        log_dir / f"ws-server-{key}.log",
        env=subprocess_env(),
    )


def recvall(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or fewer if the peer closed."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_handshake(sock: socket.socket, key: str) -> None:
    """The connecting side's handshake, in the stock client's three writes."""
    data = key.encode()
    sock.sendall(struct.pack("<i", RPC_MAGIC))
    sock.sendall(struct.pack("<i", len(data)))
    sock.sendall(data)


def read_reply(sock: socket.socket) -> tuple[int | None, str | None]:
    """The proxy's answer: (code, peer key); code None if it closed first."""
    head = recvall(sock, 4)
    if len(head) < 4:
        return None, None
    (code,) = struct.unpack("<i", head)
    if code != RPC_CODE_SUCCESS:
        return code, None
    (length,) = struct.unpack("<i", recvall(sock, 4))
    return code, recvall(sock, length).decode()


def raw_leg(port: int, key: str, timeout: float = 60) -> socket.socket:
    """A connected socket that has sent ``key`` (the answer is left unread)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    send_handshake(sock, key)
    return sock


def raw_pair(port: int, key: str) -> tuple[socket.socket, socket.socket]:
    """A fake server and client paired by ``key`` (whichever arrives first waits)."""
    server = raw_leg(port, f"server:{key}")
    client = raw_leg(port, f"client:{key}")
    assert read_reply(server) == (RPC_CODE_SUCCESS, f"client:{key}")
    assert read_reply(client) == (RPC_CODE_SUCCESS, f"server:{key}")
    return server, client


def loopback_source(index: int) -> str:
    """A distinct loopback source address per junk connection (127.0.x.y, never 127.0.0.1).

    Junk from many addresses models many careless peers, and keeps per-peer
    connection caps (a separate limit) out of what the proxy's own bounds are tested on.
    """
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def junk_leg(port: int, key: str, index: int, timeout: float = 60) -> socket.socket:
    """A connection from ``loopback_source(index)`` that has sent the handshake for ``key``."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(loopback_source(index), 0)
    )
    sock.sendall(encode_handshake(key))
    return sock


def push_until_blocked(sock: socket.socket, data: bytes) -> int:
    """Send as much of ``data`` as the socket takes without blocking; return the count."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent:])
    except (BlockingIOError, ConnectionError):
        pass
    return sent


def wait_closed(sock: socket.socket, timeout: float = 60) -> bool:
    """Read until the proxy closes ``sock`` (EOF or reset); False if it stays open."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def is_closed_now(sock: socket.socket) -> bool:
    """Whether the proxy has already closed ``sock`` (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    sock.setblocking(False)
    try:
        while sock.recv(1 << 16):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def wait_lines(proc: Process, pattern: str, count: int, start: int = 0) -> list[str]:
    """Block until ``count`` lines from index ``start`` match ``pattern``; return them."""
    regex = re.compile(pattern)
    index, found = start, []
    while len(found) < count:
        proc.wait_for(regex, start=index)
        for offset, line in enumerate(proc.lines[index:]):
            if regex.search(line):
                found.append(line)
                index += offset + 1
                break
    return found


def rss(pid: int) -> int:
    """Resident memory of process ``pid``, bytes."""
    import psutil

    return psutil.Process(pid).memory_info().rss
