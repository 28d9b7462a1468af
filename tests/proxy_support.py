"""Helpers for the proxy tests: start our proxy and stock peers, speak the handshake raw."""

from __future__ import annotations

import re
import select
import socket
import sys
from pathlib import Path

from twisted.internet.testing import StringTransport

from tests.support import Process, subprocess_env
from tvmrpc.codec import encode_handshake
from tvmrpc.harness.sockets import raw_leg, raw_pair, read_reply, recvall, send_handshake
from tvmrpc.harness.starters import WEB_LISTENING, start_proxied_server, start_proxy
from tvmrpc.proxy.protocol import ProxyFactory

__all__ = [  # what the proxy tests import from here (most from tvmrpc.harness)
    "WEB_LISTENING",
    "Wire",
    "raw_leg",
    "raw_pair",
    "read_reply",
    "recvall",
    "send_handshake",
    "start_proxied_server",
    "start_proxy",
]


class Wire:
    """One proxy-side protocol on a string transport (unit tests of the proxy)."""

    def __init__(self, factory: ProxyFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self) -> None:
        self.proto.connectionLost()


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
