"""Unit tests for the server parts that need no worker: paths, options, board, handshake."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tvmrpc.codec import (
    RPC_CODE_MISMATCH,
    RPC_MAGIC,
    TRACKER_MAGIC,
    TrackerCode,
    encode_frame,
    encode_handshake,
    encode_int32,
)
from tvmrpc.server import worker
from tvmrpc.server.adapter import IDeviceRuntime, WorkerConfig, ZygoteRuntime
from tvmrpc.server.board import Board
from tvmrpc.server.handshake import HandshakeFactory
from tvmrpc.server.registrar import Registrar
from tvmrpc.server.service import Options, parse_hostport

# -- session paths --------------------------------------------------------------


@pytest.mark.parametrize("path", ["a.so", "sub/a.so", "sub/../a.so", ".", "./x"])
def test_session_path_inside_root(tmp_path, path):
    root = str(tmp_path)
    resolved = worker.session_path(root, path)
    assert resolved == os.path.normpath(os.path.join(root, path))
    assert resolved == root or resolved.startswith(root + os.sep)


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "..", "sub/../../x"])
def test_session_path_refuses_escapes(tmp_path, path):
    with pytest.raises(worker.PathEscapeError, match=r"session directory|session-relative"):
        worker.session_path(str(tmp_path), path)


def test_session_path_refuses_sibling_with_common_prefix(tmp_path):
    root = tmp_path / "sess"
    with pytest.raises(worker.PathEscapeError):
        worker.session_path(str(root), "../sess-other/x")


# -- the runtime library ---------------------------------------------------------


def test_find_runtime_library_explicit_file_and_dir(tmp_path):
    lib = tmp_path / worker.RUNTIME_NAME
    lib.write_bytes(b"")
    assert worker.find_runtime_library(str(lib)) == lib
    assert worker.find_runtime_library(str(tmp_path)) == lib


def test_find_runtime_library_from_env(tmp_path, monkeypatch):
    lib = tmp_path / worker.RUNTIME_NAME
    lib.write_bytes(b"")
    monkeypatch.setenv("TVM_LIBRARY_PATH", f"/nonexistent{os.pathsep}{tmp_path}")
    assert worker.find_runtime_library() == lib


def test_find_runtime_library_explicit_missing_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("TVM_LIBRARY_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        worker.find_runtime_library(str(tmp_path / "nothing-here"))


def test_worker_finds_and_loads_runtime_without_importing_tvm_or_numpy():
    """The installed tvm package's lib/ is found without importing tvm (which imports numpy)."""
    code = (
        "import sys\n"
        "from tvmrpc.server import worker\n"
        "ffi = worker.load_runtime(worker.find_runtime_library())\n"
        "print(worker.probe_str_type_index(ffi))\n"
        "print(sorted(m for m in ('tvm', 'numpy', 'cloudpickle', 'tornado', 'twisted')"
        " if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_LIBRARY_PATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.split("\n")
    assert out[0] == "8"  # tvm-ffi runtimes write raw strings with type index 8
    assert out[1] == "[]"


# -- options ---------------------------------------------------------------------


def test_parse_hostport():
    assert parse_hostport("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert parse_hostport("[::1]:9190") == ("::1", 9190)
    for bad in ("9190", "host:", ":9190", "host:port"):
        with pytest.raises(usage.UsageError):
            parse_hostport(bad)


def test_options_collect_init_modules_and_libraries(tmp_path):
    a, b = tmp_path / "a.so", tmp_path / "b.so"
    a.write_bytes(b"")
    b.write_bytes(b"")
    options = Options()
    options.parseOptions(
        [
            "--key",
            "k",
            "--init",
            "m1",
            "--init",
            "m2",
            "--load-library",
            f"{a}:{b}",
            "--tracker",
            "localhost:9190",
        ]
    )
    assert options["init-modules"] == ["m1", "m2"]
    assert options["load-libraries"] == [str(a), str(b)]
    assert options["tracker"] == ("localhost", 9190)
    argv = WorkerConfig(
        load_libraries=tuple(options["load-libraries"]), init_modules=("m1", "m2")
    ).argv()
    assert argv[1:3] == ["-m", "tvmrpc.server.worker"]
    assert argv.count("--load-library") == 2
    assert argv.count("--init") == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--key", "k", "--load-library", "/nonexistent/lib.so"],
        ["--key", "k", "--handshake-timeout", "0"],
        ["--key", "k", "--through-proxy"],
        ["--key", "k", "--through-proxy", "--port", "9090", "--listen", "tcp:0"],
    ],
)
def test_options_refuse(args):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


# -- the board, with a fake runtime ------------------------------------------------


@implementer(IDeviceRuntime)
class FakeRuntime:
    """Serves sessions until the test ends them; an abort ends the session a moment later
    (as a killed worker is reaped later), on ``clock``."""

    str_type_index = 8

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.is_ready = True
        self.sessions: list[tuple[socket.socket, str, defer.Deferred[int]]] = []
        self.aborted: list[defer.Deferred[int]] = []
        self.warm_observers: list = []
        self.lost_observers: list = []

    def start(self) -> None:
        pass

    def check(self) -> defer.Deferred[str | None]:
        return defer.succeed(None)

    def abandon(self, reason: str) -> None:
        self.abandoned = reason

    def ready(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def serve(self, sock: socket.socket, session_dir: str) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        self.sessions.append((sock, session_dir, d))
        return d

    def abort(self, session: defer.Deferred[int]) -> None:
        self.aborted.append(session)
        self.clock.callLater(0, session.callback, -9)

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class FakeTicket:
    def __init__(self, label: str, timeout: float | None = None) -> None:
        self.label = label
        self.timeout = timeout
        self.ours, self.theirs = socket.socketpair()
        self.rejected = False

    def accept(self) -> socket.socket:
        return self.ours

    def reject(self) -> None:
        self.rejected = True


def test_fake_runtime_provides_the_interface():
    verifyObject(IDeviceRuntime, FakeRuntime())
    verifyObject(IDeviceRuntime, ZygoteRuntime(Clock(), WorkerConfig()))


def test_board_serves_one_at_a_time_in_order_with_fresh_dirs(tmp_path):
    runtime = FakeRuntime()
    board = Board(Clock(), runtime, workdir=str(tmp_path))
    idle: list[int] = []
    board.idle_observers.append(lambda: idle.append(1))
    tickets = [FakeTicket(f"t{i}") for i in range(3)]
    for ticket in tickets:
        board.offer(ticket)
    assert len(runtime.sessions) == 1
    assert board.busy
    dirs = []
    for i in range(3):
        sock, session_dir, d = runtime.sessions[i]
        assert sock is tickets[i].ours
        assert os.path.isdir(session_dir)
        dirs.append(session_dir)
        assert idle == []
        d.callback(0)
        assert not os.path.exists(session_dir)
    assert len(set(dirs)) == 3
    assert not board.busy
    assert idle == [1]
    assert board.sessions_served == 3


def test_board_timeout_aborts_and_sends_the_stock_exception(tmp_path):
    clock = Clock()
    runtime = FakeRuntime(clock)
    board = Board(clock, runtime, workdir=str(tmp_path))
    ticket = FakeTicket("slow", timeout=3)
    board.offer(ticket)
    clock.advance(2.9)
    assert runtime.aborted == []
    clock.advance(0.2)
    assert len(runtime.aborted) == 1
    clock.advance(0)
    assert not board.busy
    length = struct.unpack("<Q", ticket.theirs.recv(8))[0]
    payload = ticket.theirs.recv(length)
    code, nargs, type_index, _size = struct.unpack_from("<iiiQ", payload)
    assert (code, nargs, type_index) == (5, 1, 8)
    assert payload[20:].decode().startswith("RPCSessionTimeoutError:")


def test_board_close_rejects_waiting_and_aborts_after_grace(tmp_path):
    clock = Clock()
    runtime = FakeRuntime(clock)
    board = Board(clock, runtime, workdir=str(tmp_path))
    running_ticket, waiting = FakeTicket("a"), FakeTicket("b")
    board.offer(running_ticket)
    board.offer(waiting)
    closed = board.close(grace=5)
    assert waiting.rejected
    assert not closed.called
    clock.advance(5)
    assert len(runtime.aborted) == 1
    clock.advance(0)
    assert closed.called
    late = FakeTicket("late")
    board.offer(late)
    assert late.rejected


def test_board_withdrawn_ticket_is_not_served(tmp_path):
    runtime = FakeRuntime()
    board = Board(Clock(), runtime, workdir=str(tmp_path))
    first, gone = FakeTicket("first"), FakeTicket("gone")
    board.offer(first)
    board.offer(gone)
    board.withdraw(gone)
    runtime.sessions[0][2].callback(0)
    assert len(runtime.sessions) == 1
    assert not board.busy


def test_board_subscribers_hear_idle_until_they_unsubscribe(tmp_path):
    runtime = FakeRuntime()
    board = Board(Clock(), runtime, workdir=str(tmp_path))
    heard: list[str] = []

    def first() -> None:
        heard.append("first")

    def second() -> None:
        heard.append("second")

    board.subscribe(first)
    board.subscribe(second)
    board.subscribe(first)  # once per observer
    board.offer(FakeTicket("a"))
    runtime.sessions[-1][2].callback(0)
    assert heard == ["first", "second"]
    board.unsubscribe(first)
    board.unsubscribe(first)  # not subscribed any more: ignored
    board.offer(FakeTicket("b"))
    runtime.sessions[-1][2].callback(0)
    assert heard == ["first", "second", "second"]


def test_board_re_offers_before_it_logs_the_session_end(tmp_path):
    runtime = FakeRuntime()
    board = Board(Clock(), runtime, workdir=str(tmp_path))
    order: list[str] = []
    board.subscribe(lambda: order.append("idle"))

    def logged(event: dict) -> None:
        if "session ended" in event.get("log_format", ""):
            order.append("logged")

    globalLogPublisher.addObserver(logged)
    try:
        board.offer(FakeTicket("a"))
        runtime.sessions[0][2].callback(0)
    finally:
        globalLogPublisher.removeObserver(logged)
    assert order == ["idle", "logged"]


def test_board_makes_the_next_session_dir_while_idle(tmp_path):
    runtime = FakeRuntime()
    board = Board(Clock(), runtime, workdir=str(tmp_path))
    board.offer(FakeTicket("a"))
    runtime.sessions[0][2].callback(0)
    root = board.session_root.path
    ready = [name for name in os.listdir(root) if name.startswith("session-")]
    assert len(ready) == 1  # made after the re-offer, not when the next client comes
    board.offer(FakeTicket("b"))
    assert runtime.sessions[1][1] == os.path.join(root, ready[0])


@implementer(IReactorThreads)
class ThreadRecordingClock(Clock):
    """A clock whose thread pool only records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.in_thread: list[tuple] = []

    def callInThread(self, f, *args, **kwargs) -> None:
        self.in_thread.append((f, args, kwargs))

    def getThreadPool(self):
        raise NotImplementedError

    def callFromThread(self, f, *args, **kwargs) -> None:
        raise NotImplementedError

    def suggestThreadPoolSize(self, size: int) -> None:
        raise NotImplementedError


def test_board_removes_session_dirs_in_the_thread_pool(tmp_path):
    """A runtime that does not remove session dirs: the board never walks one on this thread."""
    clock = ThreadRecordingClock()
    runtime = FakeRuntime(clock)
    board = Board(clock, runtime, workdir=str(tmp_path))
    board.offer(FakeTicket("a"))
    _sock, session_dir, d = runtime.sessions[0]
    Path(session_dir, "kernel.so").write_bytes(b"x")
    d.callback(0)
    assert os.path.isdir(session_dir)  # not removed here...
    [(remove, args, kwargs)] = clock.in_thread
    remove(*args, **kwargs)  # ...but by what was handed to the thread pool
    assert not os.path.exists(session_dir)


def _registrar(tmp_path, reactor):
    runtime = FakeRuntime()
    board = Board(reactor, runtime, workdir=str(tmp_path))
    registrar = Registrar(reactor, board, "k", ("127.0.0.1", 9), 9000)
    return registrar, board, runtime


def test_registrar_observes_the_board_only_while_running(tmp_path):
    registrar, board, _runtime = _registrar(tmp_path, MemoryReactorClock())
    assert board.idle_observers == []  # constructing it plugged nothing in
    registrar.startService()
    assert board.idle_observers == [registrar._register]
    registrar.stopService()
    assert board.idle_observers == []


def test_registrar_re_offers_with_update_info_and_put_in_one_round_trip(tmp_path):
    reactor = MemoryReactorClock()
    registrar, board, runtime = _registrar(tmp_path, reactor)
    outcome = {"sessions": 0}
    registrar.extension = lambda: dict(outcome)
    registrar.startService()
    factory = reactor.tcpClients[0][2]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode_int32(TRACKER_MAGIC))
    proto.dataReceived(encode_frame(TrackerCode.SUCCESS))  # the first UPDATE_INFO
    proto.dataReceived(encode_frame(TrackerCode.SUCCESS))  # the first PUT
    assert registrar.matchkey is not None
    assert registrar.claim(registrar.matchkey)
    board.offer(FakeTicket("client"))
    transport.clear()
    outcome["sessions"] = 1  # the session's outcome goes out with the re-offer
    runtime.sessions[0][2].callback(0)
    sent = transport.value()
    codes = []
    while sent:
        (length,) = struct.unpack_from("<i", sent)
        codes.append(json.loads(sent[4 : 4 + length])[0])
        sent = sent[4 + length :]
    assert codes == [TrackerCode.UPDATE_INFO, TrackerCode.PUT]  # before any answer
    registrar.stopService()


# -- the handshake protocol, on a string transport -----------------------------------


@pytest.fixture
def handshake(tmp_path):
    """Builds a handshake protocol on a string transport; its board's dirs live in tmp_path."""

    def make(clock: Clock, matcher=lambda key: key == "k"):
        board = Board(clock, FakeRuntime(), workdir=str(tmp_path))
        offered: list[object] = []
        board.offer = offered.append  # type: ignore[method-assign]
        factory = HandshakeFactory(clock, board, "k", matcher, handshake_timeout=5)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5555))
        proto.makeConnection(transport)
        return proto, transport, offered

    return make


def test_handshake_accepted_key_waits_on_the_board_with_its_timeout(handshake):
    proto, transport, offered = handshake(Clock())
    data = encode_handshake("client:k -timeout=7")
    for i in range(len(data)):  # byte by byte, as a slow peer might send it
        proto.dataReceived(data[i : i + 1])
    assert offered == [proto]
    assert proto.timeout == 7
    assert transport.value() == b""  # answered only when its session starts


def test_handshake_mismatch_answers_and_closes(handshake):
    proto, transport, offered = handshake(Clock())
    proto.dataReceived(encode_handshake("client:other"))
    assert transport.value() == struct.pack("<i", RPC_CODE_MISMATCH)
    assert transport.disconnecting
    assert offered == []


def test_handshake_bad_magic_closes_silently(handshake):
    proto, transport, offered = handshake(Clock())
    proto.dataReceived(struct.pack("<i", RPC_MAGIC + 7))
    assert transport.value() == b""
    assert offered == []
    assert transport.disconnecting or transport.disconnected


def test_handshake_stalled_peer_is_dropped_after_the_timeout(handshake):
    clock = Clock()
    proto, transport, offered = handshake(clock)
    proto.dataReceived(encode_handshake("client:k")[:6])
    clock.advance(4.9)
    assert not (transport.disconnecting)
    assert not (transport.disconnected)
    clock.advance(0.2)
    assert transport.disconnecting or transport.disconnected
    assert offered == []


def test_handshake_timer_stops_once_complete(handshake):
    clock = Clock()
    proto, _transport, offered = handshake(clock)
    proto.dataReceived(encode_handshake("client:k"))
    assert clock.getDelayedCalls() == []
    assert offered == [proto]


def test_worker_module_imports_no_twisted(tmp_path: Path):
    code = "import sys, tvmrpc.server.worker; print('twisted' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_zygote_output_is_logged_as_whole_nonblank_lines(monkeypatch):
    """Reads split the zygote's output anywhere; the log gets whole lines, no blank ones."""
    from twisted.logger import Logger

    from tvmrpc.server import adapter

    events: list[dict] = []
    monkeypatch.setattr(adapter, "log", Logger(observer=events.append))
    proc = adapter._ZygoteProcess(runtime=None)  # type: ignore[arg-type]
    proc.outReceived(b"Download 1 KiB\n\nhal")
    proc.errReceived(b"warning: x\n")
    proc.outReceived(b"f a line\n")
    proc._lines(1, b"no newline yet")
    proc._lines(1, b"\n")
    assert [e["line"] for e in events] == [
        "Download 1 KiB",
        "warning: x",
        "half a line",
        "no newline yet",
    ]
