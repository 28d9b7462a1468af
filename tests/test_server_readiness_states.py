"""The server's explicit states: the zygote's phase, the runtime driven by its events,
and the handshake's phase (plain calls, a fake reactor, string transports)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.test_server_units import FakeRuntime
from tvmrpc.codec import encode_handshake
from tvmrpc.server.adapter import WorkerConfig, WorkerError, ZygoteRuntime
from tvmrpc.server.board import Board
from tvmrpc.server.handshake import HandshakeFactory, HandshakeStateError, Phase
from tvmrpc.server.worker.control import (
    MAX_FDS,
    Exited,
    Ready,
    Refused,
    Serve,
    encode_event,
    parse_command,
)
from tvmrpc.server.zygote_phase import Phase as ZPhase
from tvmrpc.server.zygote_phase import ZygotePhase, ZygotePhaseError

# -- the zygote's phase (pure) ----------------------------------------------------------


def test_zygote_phase_start_warm_lost_restart_stop():
    phase = ZygotePhase()
    assert phase.spawn()
    assert phase.became_warm()
    assert phase.warm
    phase.control_lost()
    assert phase.phase is ZPhase.ENDING
    assert phase.ended()  # a loss: the supervisor restarts it
    assert phase.phase is ZPhase.IDLE
    assert phase.spawn()
    assert phase.stop()  # a zygote is still to exit
    assert not phase.ended()  # part of stopping, not a loss
    assert phase.phase is ZPhase.STOPPED
    assert not phase.spawn()  # nothing restarts a stopped runtime


@pytest.mark.parametrize(
    ("steps", "event", "message"),
    [
        (["spawn"], "spawn", "'spawn' cannot happen while starting"),
        (["spawn", "became_warm"], "became_warm", "'ready' cannot happen while warm"),
        ([], "became_warm", "'ready' cannot happen while idle"),
        ([], "ended", "'exit' cannot happen while idle"),
        ([], "control_lost", "'control lost' cannot happen while idle"),
        (["spawn", "became_warm", "control_lost", "ended"], "ended", "while idle"),
    ],
)
def test_zygote_phase_impossible_events_raise(steps, event, message):
    phase = ZygotePhase()
    for step in steps:
        getattr(phase, step)()
    before = phase.phase
    with pytest.raises(ZygotePhaseError, match=message):
        getattr(phase, event)()
    assert phase.phase is before  # an impossible event changes nothing


def test_zygote_phase_races_are_not_errors():
    phase = ZygotePhase()
    phase.spawn()
    phase.became_warm()
    assert not phase.abandon()  # got warm just before the warm timeout fired
    assert phase.warm
    phase.stop()
    assert not phase.became_warm()  # ready while stopping: ignored
    assert phase.phase is ZPhase.STOPPING


# -- the runtime, driven by zygote events on a fake reactor -------------------------------


class FakeProcessTransport:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class FakeReactor(Clock):
    """Records spawned zygotes; keeps the zygote's end of the command channel."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], FakeProcessTransport]] = []
        self.commands: list[socket.socket] = []
        self.controls: list[Any] = []

    def spawnProcess(self, proc, executable, argv, env, childFDs):
        transport = FakeProcessTransport()
        self.spawned.append((proc, argv, transport))
        self.commands.append(socket.socket(fileno=os.dup(childFDs[4])))
        return transport

    def adoptStreamConnection(self, fd, family, factory):
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        self.controls.append(proto)


def _runtime() -> tuple[FakeReactor, ZygoteRuntime]:
    reactor = FakeReactor()
    return reactor, ZygoteRuntime(reactor, WorkerConfig())


def test_runtime_second_start_while_a_zygote_lives_raises():
    reactor, runtime = _runtime()
    runtime.start()
    argv = reactor.spawned[0][1]
    assert argv[argv.index("--command-fd") + 1] == "4"
    with pytest.raises(ZygotePhaseError, match="'spawn' cannot happen while starting"):
        runtime.start()
    assert len(reactor.spawned) == 1


def test_runtime_ready_twice_raises_and_over_the_wire_is_one_warning():
    reactor, runtime = _runtime()
    runtime.start()
    runtime._event(Ready(100, 8))
    assert runtime.is_ready
    with pytest.raises(ZygotePhaseError):
        runtime._event(Ready(100, 8))
    # From the zygote's channel the same impossible event is logged, not a crash.
    control = reactor.controls[0]
    control.dataReceived(encode_event(Ready(100, 8)) + b'{"event": "nonsense"}\n')
    assert runtime.is_ready
    assert control.transport.connected


def test_runtime_sends_the_socket_in_its_serve_record_and_a_refusal_fails_the_session(tmp_path):
    reactor, runtime = _runtime()
    runtime.start()
    control = reactor.controls[0]
    control.dataReceived(encode_event(Ready(100, 8)))
    session_dir = tmp_path / "sess-a"
    session_dir.mkdir()
    client, served = socket.socketpair()
    with client, served:
        d = runtime.serve(served, str(session_dir))
        record, fds, _flags, _ = socket.recv_fds(reactor.commands[0], 65536, MAX_FDS)
        command = parse_command(record, fds)
        assert isinstance(command, Serve)
        assert command.dir == str(session_dir)
        handed = socket.socket(fileno=command.fd)  # the very socket, paired with its record
        handed.sendall(b"x")
        assert client.recv(1) == b"x"
        handed.close()
        failures: list[Any] = []
        d.addErrback(failures.append)
        control.dataReceived(encode_event(Refused(command.id, "serve needs one socket, got 0")))
        assert failures[0].check(WorkerError)
        assert not session_dir.exists()  # no worker will reap it: the runtime removed it
        d2 = runtime.serve(served, "/tmp/sess-b")
        record, fds, _flags, _ = socket.recv_fds(reactor.commands[0], 65536, MAX_FDS)
        second = parse_command(record, fds)
        os.close(second.fd)  # type: ignore[union-attr]
        codes: list[int] = []
        d2.addCallback(codes.append)
        control.dataReceived(encode_event(Exited(second.id, 123, -11)))
        assert codes == [-11]


def test_runtime_serve_before_warm_fails_and_exit_without_zygote_is_ignored():
    reactor, runtime = _runtime()
    failures: list[Any] = []
    runtime.serve(socket.socket(), "/tmp/x").addErrback(failures.append)
    assert failures[0].check(WorkerError)
    runtime.start()
    proc = reactor.spawned[0][0]
    lost: list[str] = []
    runtime.lost_observers.append(lost.append)
    proc.processEnded(_ended())
    assert runtime.phase.phase is ZPhase.IDLE
    assert lost == ["worker zygote died (exit 1); see its output above"]
    runtime.start()  # the supervisor restarts it
    runtime._zygote_ended(proc, "exit 1")  # the old zygote's news: not ours any more
    assert runtime.phase.phase is ZPhase.STARTING
    assert len(lost) == 1


def _ended() -> Any:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    return Failure(ProcessTerminated(exitCode=1))


# -- the handshake's phase ------------------------------------------------------------------


def _handshake() -> tuple[Any, StringTransport, list[object], list[object]]:
    clock = Clock()
    board = Board(clock, FakeRuntime())
    offered: list[object] = []
    withdrawn: list[object] = []
    board.offer = offered.append  # type: ignore[method-assign]
    board.withdraw = withdrawn.append  # type: ignore[method-assign]
    factory = HandshakeFactory(clock, board, "k", lambda key: key == "k", 5)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5555))
    proto.makeConnection(transport)
    return proto, transport, offered, withdrawn


def test_handshake_phases_move_only_through_their_events():
    proto, _transport, offered, withdrawn = _handshake()
    assert proto.phase is Phase.HANDSHAKE
    with pytest.raises(HandshakeStateError, match="'accept' cannot happen while handshake"):
        proto.accept()  # the board never saw it: accepting it is a bug
    with pytest.raises(HandshakeStateError, match="'reject' cannot happen while handshake"):
        proto.reject()
    proto.dataReceived(encode_handshake("client:k"))
    assert proto.phase is Phase.WAITING
    assert offered == [proto]
    proto.connectionLost()
    assert proto.phase is Phase.CLOSED
    assert withdrawn == [proto]
    assert proto.accept() is None  # gone meanwhile: the board skips it
    proto.reject()  # and dropping it again is harmless
    assert withdrawn == [proto]


def test_handshake_data_while_waiting_closes_and_withdraws():
    proto, transport, _offered, withdrawn = _handshake()
    proto.dataReceived(encode_handshake("client:k"))
    proto.dataReceived(b"early session bytes")
    assert proto.phase is Phase.CLOSED
    assert withdrawn == [proto]
    assert transport.disconnecting or transport.disconnected
