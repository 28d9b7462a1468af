"""Sockets for driving daemons the way stock peers do: free ports, raw handshakes.

Invariants:
- Every connection here writes exactly the bytes a stock peer writes, in the
  stock peer's separate writes (so Nagle and delayed-ACK behave as with stock).
- Nothing here starts a process or imports tvm at module level.
"""

from __future__ import annotations

import socket
import struct

from tvmrpc.codec import RPC_CODE_SUCCESS, RPC_MAGIC, TRACKER_MAGIC

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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


def stock_tracker_socket(
    port: int, host: str = LOOPBACK, source: str | None = None, timeout: float | None = 30
) -> socket.socket:
    """A tracker connection opened as the stock client opens it: magic out, magic back.

    ``source`` binds the client's end to that loopback address, so one caller
    can play several client hosts (127.0.0.1, 127.0.0.2, ...).
    """
    source_address = (source, 0) if source is not None else None
    sock = socket.create_connection((host, port), timeout=timeout, source_address=source_address)
    sock.sendall(struct.pack("<i", TRACKER_MAGIC))
    answer = recvall(sock, 4)
    if answer != struct.pack("<i", TRACKER_MAGIC):
        sock.close()
        raise ConnectionError(f"{host}:{port} answered the tracker magic with {answer!r}")
    return sock


def send_handshake(sock: socket.socket, key: str) -> None:
    """The connecting side's RPC handshake, in the stock client's three writes."""
    data = key.encode()
    sock.sendall(struct.pack("<i", RPC_MAGIC))
    sock.sendall(struct.pack("<i", len(data)))
    sock.sendall(data)


def read_reply(sock: socket.socket) -> tuple[int | None, str | None]:
    """The handshake's answer: (code, peer key); code None if the peer closed first."""
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
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    send_handshake(sock, key)
    return sock


def raw_pair(port: int, key: str) -> tuple[socket.socket, socket.socket]:
    """A fake server and client paired by ``key`` at a proxy (whichever arrives first waits)."""
    server = raw_leg(port, f"server:{key}")
    client = raw_leg(port, f"client:{key}")
    for sock, expected in ((server, f"client:{key}"), (client, f"server:{key}")):
        got = read_reply(sock)
        if got != (RPC_CODE_SUCCESS, expected):
            server.close()
            client.close()
            raise ConnectionError(f"pairing {key!r}: expected {expected!r}, got {got!r}")
    return server, client
