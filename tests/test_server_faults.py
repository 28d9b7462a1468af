"""Our server under faults: session timeouts, crashing workers, bad handshakes, SIGTERM."""

from __future__ import annotations

import signal
import struct

import pytest
from tvm import rpc

from tests.server_support import (
    alive,
    answer,
    closed_by_peer,
    handshake_bytes,
    init_module_dir,
    raw_connect,
    server_env,
    start_server,
)
from tests.support import running
from tvmrpc.codec import RPC_CODE_MISMATCH, RPC_CODE_SUCCESS, RPC_MAGIC

pytestmark = pytest.mark.stock


@pytest.fixture(scope="module")
def init_server(tmp_path_factory):
    """A server whose workers import a module with slow and crashing functions."""
    root = tmp_path_factory.mktemp("init-server")
    path, module = init_module_dir(root / "init")
    log_dir = root / "logs"
    log_dir.mkdir()
    server = start_server(
        log_dir, "faulty", "--init", module, "--handshake-timeout", "1", env=server_env(path)
    )
    with running(server):
        yield server


def served(port: int, key: str) -> bool:
    session = rpc.connect("127.0.0.1", port, key=key, session_timeout=60)
    session.upload(bytearray(b"ok"), "ok")
    return bytes(session.download("ok")) == b"ok"


def test_session_timeout_kills_the_worker_and_frees_the_board(init_server):
    server = init_server
    mark = server.mark()
    session = rpc.connect("127.0.0.1", server.port, key="faulty", session_timeout=1)
    pid = session.get_function("tvmrpc_test.pid")()
    with pytest.raises(Exception, match="RPCSessionTimeoutError"):
        session.get_function("tvmrpc_test.sleep")(60)
    server.wait_for(r"session ended .*worker exit -9", start=mark)
    assert not alive(pid)
    assert served(server.port, "faulty")


def test_crashing_worker_ends_only_its_session(init_server):
    server = init_server
    mark = server.mark()
    session = rpc.connect("127.0.0.1", server.port, key="faulty")
    with pytest.raises(Exception):  # noqa: B017, PT011 - the stock client's error varies
        session.get_function("tvmrpc_test.crash")()
    server.wait_for(r"session ended .*worker exit 3", start=mark)
    assert served(server.port, "faulty")


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<i", 0x1234),  # wrong magic
        struct.pack("<ii", RPC_MAGIC, -5),  # negative length
        struct.pack("<ii", RPC_MAGIC, 1 << 30),  # huge length
        handshake_bytes(b"client:\xff\xfe"),  # not UTF-8
        handshake_bytes("nonsense"),  # no role
    ],
    ids=["magic", "negative", "huge", "utf8", "role"],
)
def test_bad_handshakes_are_closed(init_server, payload):
    with raw_connect(init_server.port) as sock:
        sock.sendall(payload)
        assert answer(sock) in (b"", struct.pack("<i", RPC_CODE_MISMATCH))
    assert served(init_server.port, "faulty")


def test_wrong_key_gets_mismatch_and_early_close_is_harmless(init_server):
    with raw_connect(init_server.port) as sock:
        sock.sendall(handshake_bytes("client:other"))
        assert sock.recv(4) == struct.pack("<i", RPC_CODE_MISMATCH)
        assert closed_by_peer(sock)
    with raw_connect(init_server.port) as sock:
        sock.sendall(struct.pack("<i", RPC_MAGIC))  # then hang up
    assert served(init_server.port, "faulty")


def test_stalled_half_handshake_blocks_nobody(init_server):
    server = init_server
    mark = server.mark()
    with raw_connect(init_server.port) as stalled:
        stalled.sendall(struct.pack("<ii", RPC_MAGIC, 20) + b"client:")
        assert served(server.port, "faulty")  # served while the stalled one is open
        server.wait_for(r"handshake from .* timed out", start=mark)
        assert closed_by_peer(stalled)


def test_raw_handshake_answer_is_success_and_server_key(init_server):
    with raw_connect(init_server.port) as sock:
        sock.sendall(handshake_bytes("client:faulty -timeout=5"))
        code, length = struct.unpack("<ii", sock.recv(8, 0x100))  # MSG_WAITALL
        assert code == RPC_CODE_SUCCESS
        assert sock.recv(length, 0x100) == b"server:faulty"


def test_sigterm_leaves_no_worker(log_dir):
    server = start_server(log_dir, "term", "--grace", "1")
    with running(server):
        zygote = int(server.wait_for(r"worker zygote (\d+) warm").group(1))
        session = rpc.connect("127.0.0.1", server.port, key="term")
        worker = int(server.wait_for(r"worker (\d+) serving session").group(1))
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"tvm-server stopped")
        server.proc.wait(30)  # twistd re-raises SIGTERM on its way out
        del session
        assert not alive(zygote)
        assert not alive(worker)
