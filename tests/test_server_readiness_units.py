"""Unit tests for the server's readiness parts: life cycle, supervisor, board gating,
proxy retry policy, session directories and options (plain calls, ``Clock`` for time)."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure

from tests.test_server_units import FakeRuntime, FakeTicket
from tvmrpc import sockopts
from tvmrpc.server.board import Board
from tvmrpc.server.lifecycle import (
    Announcement,
    InvalidTransitionError,
    Lifecycle,
    Readiness,
    State,
)
from tvmrpc.server.service import Options, parse_bytes
from tvmrpc.server.session_dirs import LOCK, PREFIX, SessionRoot, remove_stale
from tvmrpc.server.supervisor import Supervisor
from tvmrpc.server.through_proxy import (
    DuplicateKeyError,
    NotAProxyError,
    describe_failure,
)

# -- life cycle -------------------------------------------------------------------


def _recorded() -> tuple[Lifecycle, list[tuple[str, str]]]:
    life = Lifecycle()
    seen: list[tuple[str, str]] = []
    life.observers.append(lambda old, new, reason: seen.append((old.value, new.value)))
    return life, seen


def test_lifecycle_start_check_advertise_busy():
    life, seen = _recorded()
    assert not life.serving
    life.warm()
    life.check_passed()
    assert life.ready
    life.session_started()
    assert life.serving
    assert not life.ready
    life.session_ended()
    assert seen == [
        ("starting", "checking"),
        ("checking", "advertised"),
        ("advertised", "busy"),
        ("busy", "advertised"),
    ]


def test_lifecycle_failure_before_ready_fails_after_ready_withdraws():
    life, _ = _recorded()
    life.zygote_lost("cannot find libtvm_runtime.so")
    assert life.state is State.FAILED
    life, _ = _recorded()
    life.warm()
    life.check_failed("--init x failed")
    assert life.state is State.FAILED
    life, seen = _recorded()
    life.warm()
    life.check_passed()
    life.zygote_lost("died")
    assert life.state is State.WITHDRAWN
    life.zygote_lost("died again")  # still down: no new change, nobody told
    assert seen[-1] == ("advertised", "withdrawn")
    assert len(seen) == 3
    life.warm()
    life.check_failed("health check failed")
    assert life.state is State.WITHDRAWN


def test_lifecycle_crash_means_check_and_invalid_events_raise():
    life, _ = _recorded()
    with pytest.raises(InvalidTransitionError):
        life.session_started()
    life.warm()
    with pytest.raises(InvalidTransitionError):
        life.session_started()  # not before the health check passed
    life.check_passed()
    life.session_started()
    life.session_ended("killed by signal 11")
    assert life.state is State.CHECKING
    life.stop()
    life.check_passed()  # moot once stopping
    assert life.state is State.STOPPING


# -- supervisor ---------------------------------------------------------------------


class FakeZygote(FakeRuntime):
    """A runtime whose zygote warms up, dies and answers health checks on command."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.is_ready = False
        self.starts = 0
        self.checks: list[defer.Deferred[str | None]] = []

    def start(self) -> None:  # FakeRuntime's does nothing; this one counts
        self.starts += 1

    def warm(self) -> None:
        self.is_ready = True
        for observer in self.warm_observers:
            observer()

    def die(self, reason: str) -> None:
        self.is_ready = False
        for observer in self.lost_observers:
            observer(reason)

    def check(self) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.Deferred()
        self.checks.append(d)
        return d

    def abandon(self, reason: str) -> None:
        self.die(reason)  # the kill is reported as the zygote's loss


def _supervised() -> tuple[Clock, FakeZygote, Lifecycle, Supervisor, list[str]]:
    clock = Clock()
    clock.addSystemEventTrigger = lambda *args: None  # type: ignore[attr-defined]
    runtime = FakeZygote(clock)
    life = Lifecycle()
    failed: list[str] = []
    supervisor = Supervisor(clock, runtime, life, on_failed=failed.append)  # type: ignore[arg-type]
    supervisor.startService()
    return clock, runtime, life, supervisor, failed


def test_supervisor_advertises_only_after_the_health_check():
    _clock, runtime, life, _, failed = _supervised()
    assert runtime.starts == 1
    runtime.warm()
    assert life.state is State.CHECKING
    assert len(runtime.checks) == 1
    runtime.checks[0].callback(None)
    assert life.ready
    assert failed == []


def test_supervisor_start_up_failure_calls_on_failed_once():
    clock, runtime, life, _, failed = _supervised()
    runtime.die("cannot find libtvm_runtime.so: install apache-tvm")
    assert life.state is State.FAILED
    assert failed == ["cannot find libtvm_runtime.so: install apache-tvm"]
    clock.advance(3600)
    assert runtime.starts == 1  # never restarted


def test_supervisor_restarts_with_backoff_and_re_advertises():
    clock, runtime, life, supervisor, failed = _supervised()
    runtime.warm()
    runtime.checks[-1].callback(None)
    delays = []
    for _ in range(4):
        starts = runtime.starts
        runtime.die("worker zygote died (signal 9)")
        assert life.state is State.WITHDRAWN
        delays.append(supervisor._timer.getTime() - clock.seconds())
        clock.advance(delays[-1])
        assert runtime.starts == starts + 1
    print(f"restart delays: {', '.join(f'{d:.2f}s' for d in delays)}")
    assert delays[-1] > delays[0]  # backoff grows
    runtime.warm()
    runtime.checks[-1].callback(None)
    assert life.ready
    assert supervisor.attempts == 0
    assert failed == []


def test_supervisor_crash_runs_a_check_before_the_next_client():
    clock, runtime, life, supervisor, _ = _supervised()
    runtime.warm()
    runtime.checks[-1].callback(None)
    life.session_started()
    life.session_ended("the last session's worker was killed by signal 11")
    assert life.state is State.CHECKING
    assert len(runtime.checks) == 2
    runtime.checks[-1].callback("health check failed: the RPC loop did not answer")
    assert life.state is State.WITHDRAWN
    clock.advance(120)  # the check is retried with backoff while the zygote is warm
    assert len(runtime.checks) == 3
    runtime.checks[-1].callback(None)
    assert life.ready
    assert supervisor.health == {"checks": 3, "ok": True}


# -- board gating -------------------------------------------------------------------


def test_board_starts_no_session_until_advertised(tmp_path):
    runtime = FakeRuntime()
    life = Lifecycle()
    board = Board(Clock(), runtime, workdir=str(tmp_path), lifecycle=life)
    board.offer(FakeTicket("early"))
    life.warm()
    assert runtime.sessions == []
    life.check_passed()
    assert len(runtime.sessions) == 1
    assert life.state is State.BUSY
    runtime.sessions[0][2].callback(-11)
    assert life.state is State.CHECKING  # a crash: check before the next client
    board.offer(FakeTicket("next"))
    assert len(runtime.sessions) == 1
    life.check_passed()
    assert len(runtime.sessions) == 2


def test_board_caps_sessions_without_timeout(tmp_path):
    clock = Clock()
    runtime = FakeRuntime(clock)
    board = Board(clock, runtime, workdir=str(tmp_path), max_session_seconds=5)
    board.offer(FakeTicket("no-timeout"))
    clock.advance(4.9)
    assert runtime.aborted == []
    clock.advance(0.2)
    assert len(runtime.aborted) == 1
    board.offer(FakeTicket("own-timeout", timeout=60))  # its own timeout wins
    clock.advance(10)
    assert len(runtime.aborted) == 1


# -- session directories ------------------------------------------------------------


def test_remove_stale_takes_only_unlocked_dirs_of_ours(tmp_path):
    live = SessionRoot(str(tmp_path))
    live_session = live.new_session()
    stale = tmp_path / f"{PREFIX}dead"
    (stale / "session-x").mkdir(parents=True)
    (stale / LOCK).touch()
    foreign = tmp_path / f"{PREFIX}no-lock"  # not made by us: no lock file
    foreign.mkdir()
    other = tmp_path / "tvm-session-abc"  # another program's
    other.mkdir()
    removed = remove_stale(str(tmp_path))
    assert removed == [str(stale)]
    assert os.path.isdir(live_session)
    assert foreign.is_dir()
    assert other.is_dir()
    live.close()
    assert not os.path.exists(live.path)


def test_session_root_lock_is_held_while_open(tmp_path):
    root = SessionRoot(str(tmp_path))
    fd = os.open(os.path.join(root.path, LOCK), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        root.close()


# -- proxy link ---------------------------------------------------------------------


def test_failures_are_described_for_the_operator():
    dup = describe_failure(Failure(DuplicateKeyError("key server:k is already in use")))
    assert "retried until that one leaves" in dup
    assert "not a TVM proxy" in describe_failure(Failure(NotAProxyError("not a TVM proxy (x)")))
    from twisted.internet.error import ConnectionRefusedError

    refused = describe_failure(Failure(ConnectionRefusedError()))
    assert refused.startswith("unreachable")
    assert "tvm-proxy running" in refused


# -- options and sockets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("2G", 2 << 30), ("512M", 512 << 20), ("100000000", 100000000)]
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "1K", "-5G"])
def test_parse_bytes_refuses(text):
    with pytest.raises(usage.UsageError, match="--session-memory-limit"):
        parse_bytes(text)


@pytest.mark.parametrize(
    "args",
    [
        ["--tracker", "127.0.0.1:9190"],
        ["--through-proxy", "--port", "9090"],
        ["--key", "k", "--max-session-seconds", "0"],
    ],
)
def test_options_refuse_missing_key_and_bad_cap(args):
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


def test_options_accept_stock_no_fork():
    options = Options()
    options.parseOptions(["--key", "k", "--no-fork", "--tracker", "127.0.0.1:9190"])
    assert options["no-fork"]
    assert "sessions always run in a worker process" in " ".join(str(Options()).split())


def test_accepted_client_socket_has_keepalive():
    """The session socket (a duplicate of the accepted one) keeps SO_KEEPALIVE."""
    from tvmrpc.server.handshake import HandshakeFactory, ServerHandshake

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()

    class Transport:
        def getHandle(self) -> socket.socket:
            return server_side

        def getPeer(self) -> object:
            return "peer"

    proto = ServerHandshake()
    keepalive = sockopts.Keepalive.for_timeout(20)
    proto.factory = HandshakeFactory(Clock(), None, "k", lambda _: True, 5, keepalive)  # type: ignore[arg-type]
    proto.transport = Transport()
    proto.connectionMade()
    duplicate = socket.socket(fileno=os.dup(server_side.fileno()))
    with listener, client, server_side, duplicate:
        assert duplicate.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert duplicate.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    proto._cancel_timer()


def test_readiness_needs_a_checked_board_and_its_announcement():
    life = Lifecycle()
    announcement = Announcement()
    readiness = Readiness(life, announcement)
    seen: list[tuple[bool, str]] = []
    readiness.observers.append(lambda ready, reason: seen.append((ready, reason)))
    life.warm()
    announcement.set(True, "tracker t:9190")  # cannot happen before advertised; still not ready
    assert not readiness.ready
    life.check_passed()
    assert readiness.ready
    life.session_started()
    life.session_ended()
    assert seen == [(True, "health check passed")]  # busy is still ready
    life.zygote_lost("worker zygote died (signal 9)")
    announcement.set(False, "tracker t:9190")
    assert seen[-1] == (False, "worker zygote died (signal 9)")
    assert len(seen) == 2
    plain = Readiness(Lifecycle())  # listening only: ready once checked
    plain.lifecycle.warm()
    plain.lifecycle.check_passed()
    assert plain.ready


def test_proxy_ending_a_long_wait_is_routine_a_quick_close_is_a_failure(tmp_path):
    from tvmrpc.server.through_proxy import ConnectorPhase, ProxyConnector

    clock = Clock()
    board = Board(clock, FakeRuntime(clock), workdir=str(tmp_path))
    connector = ProxyConnector(clock, board, "k", ("127.0.0.1", 9))
    connector.running = True
    attempts: list[float] = []
    connector._maybe_connect = lambda: attempts.append(clock.seconds())  # type: ignore[method-assign]
    leg = object()
    connector.phase = ConnectorPhase.WAITING
    connector._leg, connector._leg_since = leg, clock.seconds()  # type: ignore[assignment]
    clock.advance(600)  # the proxy's --timeout-server let our wait go
    connector._failed(Failure(ConnectionError("proxy has no matching client key")), leg)  # type: ignore[arg-type]
    assert attempts == [600]  # at once, no backoff, not counted
    assert connector.failures == 0
    assert connector.phase is ConnectorPhase.IDLE
    connector.phase = ConnectorPhase.WAITING  # the (patched out) reconnect waits again
    connector._leg, connector._leg_since = leg, clock.seconds()  # type: ignore[assignment]
    clock.advance(0.1)
    connector._failed(Failure(ConnectionError("closed before answering")), leg)  # type: ignore[arg-type]
    assert connector.failures == 1
    assert attempts == [600]
    clock.advance(connector._retry.getTime() - clock.seconds())
    assert len(attempts) == 2  # retried after the backoff delay
    assert connector.phase is ConnectorPhase.IDLE


def test_proxy_connector_phases_refuse_impossible_moves(tmp_path):
    """The connector's life cycle is a table: a stray event is an error, not a flag mix."""
    from tvmrpc.server.through_proxy import ConnectorPhase, ConnectorPhaseError, ProxyConnector

    clock = Clock()
    board = Board(clock, FakeRuntime(clock), workdir=str(tmp_path))
    connector = ProxyConnector(clock, board, "k", ("127.0.0.1", 9))
    assert connector.phase is ConnectorPhase.STOPPED
    with pytest.raises(ConnectorPhaseError, match="stopped -> waiting"):
        connector._move(ConnectorPhase.WAITING)  # a connection made while stopped
    connector._move(ConnectorPhase.IDLE)
    with pytest.raises(ConnectorPhaseError, match="idle -> waiting"):
        connector._move(ConnectorPhase.WAITING)  # made without an attempt
    with pytest.raises(ConnectorPhaseError, match="idle -> backoff"):
        connector._move(ConnectorPhase.BACKOFF)  # failed without an attempt
    connector._move(ConnectorPhase.CONNECTING)
    connector._move(ConnectorPhase.BACKOFF)
    with pytest.raises(ConnectorPhaseError, match="backoff -> connecting"):
        connector._move(ConnectorPhase.CONNECTING)  # retried before the delay ran out


def test_supervisor_kills_a_zygote_that_never_gets_warm():
    clock, runtime, life, supervisor, failed = _supervised()
    clock.advance(supervisor.warm_timeout - 1)
    assert failed == []
    clock.advance(1)
    assert life.state is State.FAILED
    assert "did not get warm within 60s" in failed[0]
    clock, runtime, life, supervisor, failed = _supervised()
    runtime.warm()
    runtime.checks[-1].callback(None)
    clock.advance(3600)  # warm: the timer is gone
    assert life.ready
