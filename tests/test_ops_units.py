"""Plain-call tests of the ops pieces: rate limits, port ranges, the per-peer cap,
the tracker link's states, and the log observer's SIGHUP reopen."""

from __future__ import annotations

import os
import signal

import pytest
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python import logfile as twisted_logfile
from twisted.python import usage
from zope.interface import implementer

from tvmrpc import logfile
from tvmrpc.client import (
    LinkState,
    NotATrackerError,
    TrackerClientProtocol,
    TrackerLink,
    describe_link_failure,
)
from tvmrpc.listening import PeerCap, describe_address, port_range
from tvmrpc.ratelimit import RateLimit


def test_rate_limit_first_then_once_per_interval_counting_held_events():
    limit = RateLimit(60.0)
    assert limit.event(0.0) == 0
    assert [limit.event(t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert limit.event(60.0) == 3
    assert limit.event(61.0) is None
    assert limit.reset() == 1
    assert limit.event(62.0) == 0


@pytest.mark.parametrize(
    ("port", "end", "expected"),
    [
        (None, None, (9190, 9199)),  # stock's default range
        (39190, None, (39190, 39191)),  # --port alone: that port only
        (39190, 39200, (39190, 39200)),
        (None, 9195, (9190, 9195)),
    ],
)
def test_port_range_is_what_the_flags_say(port, end, expected):
    assert port_range(port, end, 9190, 9199) == expected


def test_port_end_below_port_is_a_usage_error():
    with pytest.raises(usage.UsageError, match=r"--port-end \(5\) must be greater than --port"):
        port_range(10, 5, 9190, 9199)


def test_describe_address_tcp_and_unix():
    assert describe_address(IPv4Address("TCP", "127.0.0.1", 9190)) == "127.0.0.1:9190"
    assert describe_address(UNIXAddress(b"/run/t.sock")) == "unix:/run/t.sock"


class Recording(protocol.Protocol):
    lost = 0

    def connectionLost(self, reason=None):
        type(self).lost += 1


def test_peer_cap_refuses_beyond_the_limit_and_accepts_after_a_close():
    inner = protocol.Factory.forProtocol(Recording)
    cap = PeerCap(inner, 2, "tvm-test", Clock())
    addr = IPv4Address("TCP", "10.0.0.1", 5000)
    first, second = cap.buildProtocol(addr), cap.buildProtocol(addr)
    assert isinstance(first, Recording)
    assert isinstance(second, Recording)
    assert first.factory is inner
    refused = cap.buildProtocol(addr)  # the third is refused: aborted once made
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnected  # aborted, not a graceful close
    assert not isinstance(refused, Recording)
    assert isinstance(cap.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1)), Recording)
    first.connectionLost(None)
    assert Recording.lost == 1  # the protocol's own connectionLost still runs
    assert isinstance(cap.buildProtocol(addr), Recording)
    assert cap.open == {"10.0.0.1": 2, "10.0.0.2": 1}
    # UNIX peers carry no host: never capped.
    assert all(cap.buildProtocol(UNIXAddress(None)) is not None for _ in range(5))


def test_peer_cap_logs_refusals_rate_limited():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        cap = PeerCap(protocol.Factory.forProtocol(Recording), 1, "tvm-test", clock)
        addr = IPv4Address("TCP", "10.0.0.9", 1)
        cap.buildProtocol(addr)
        for _ in range(5):
            assert not isinstance(cap.buildProtocol(addr), Recording)
        clock.advance(61)
        assert not isinstance(cap.buildProtocol(addr), Recording)
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e for e in events if "refused a connection" in e.get("log_format", "")]
    assert len(refusals) == 2
    assert all(e["log_level"] is LogLevel.warn for e in refusals)
    assert refusals[0]["more"] == ""
    assert "4 more refused" in refusals[1]["more"]


def test_silent_peer_is_named_not_a_tracker_after_the_magic_timeout():
    clock = Clock()
    proto = TrackerClientProtocol(magic_timeout=5, clock=clock)
    proto.makeConnection(StringTransport())
    failures = []
    proto.ready.addErrback(failures.append)
    clock.advance(4.9)
    assert not failures
    clock.advance(0.2)
    assert failures
    assert failures[0].check(NotATrackerError)
    assert "not a TVM tracker: no answer to the magic within 5 s" in str(failures[0].value)


def test_wrong_magic_is_named_not_a_tracker():
    proto = TrackerClientProtocol()
    proto.makeConnection(StringTransport())
    failures = []
    proto.ready.addErrback(failures.append)
    proto.dataReceived(b"HTTP/1.0 400 Bad Request\r\n")
    assert "not a TVM tracker: it answered b'HTTP' to the magic" in str(failures[0].value)


def test_describe_link_failure_wording():
    from twisted.internet.error import ConnectionRefusedError, TimeoutError
    from twisted.python.failure import Failure

    assert describe_link_failure(Failure(ConnectionRefusedError()), 10) == (
        "is unreachable: connection refused"
    )
    assert "no answer to connect within 10 s" in describe_link_failure(Failure(TimeoutError()), 10)


def test_link_stop_while_waiting_is_clean():
    clock = Clock()
    link = TrackerLink(clock, ("127.0.0.1", 1), lambda p: None, lambda p: None)
    link.state = LinkState.WAITING
    link._retry = clock.callLater(5, link._retry_now)
    d = link.stopService()
    assert d.called
    assert link.state is LinkState.STOPPED
    clock.advance(10)
    assert link.state is LinkState.STOPPED


def test_sighup_reopens_the_log_file_at_its_path(tmp_path, monkeypatch):
    path = tmp_path / "daemon.log"
    monkeypatch.setattr(logfile, "current_file", twisted_logfile.LogFile.fromFullPath(str(path)))
    logfile.current_file.write("before\n")
    logfile.current_file.flush()
    os.rename(path, tmp_path / "daemon.log.1")
    logfile.reopen()
    logfile.current_file.write("after\n")
    logfile.current_file.flush()
    assert path.read_text() == "after\n"
    assert (tmp_path / "daemon.log.1").read_text() == "before\n"
    logfile.current_file.close()


def test_observer_installs_sighup_and_silent_filters_info(tmp_path, monkeypatch):
    previous = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGUSR1)
    options = {"logfile": str(tmp_path / "x.log"), "nodaemon": True, "logger": None}
    logfile.configure(options, silent=True)
    assert options["logger"] == "tvmrpc.logfile.observer"
    try:
        observer = logfile.observer()
        assert signal.getsignal(signal.SIGHUP) is logfile._on_sighup
        observer(
            {
                "log_level": LogLevel.info,
                "log_format": "hidden",
                "log_time": 0,
                "log_namespace": "t",
            }
        )
        observer(
            {"log_level": LogLevel.warn, "log_format": "shown", "log_time": 0, "log_namespace": "t"}
        )
        logfile.current_file.flush()
        text = (tmp_path / "x.log").read_text()
        assert "shown" in text
        assert "hidden" not in text
    finally:
        signal.signal(signal.SIGHUP, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])
        logfile.current_file.close()
        monkeypatch.setattr(logfile, "current_file", None)


RECORDED: list[dict] = []


@implementer(ILogObserver)
class _Recording:
    def __call__(self, event: dict) -> None:
        RECORDED.append(event)


def recording_observer():
    """A ``--logger`` factory, as tvmrpc.jsonlog.observer is (see test below)."""
    return _Recording()


def test_a_logger_given_to_twistd_is_kept_and_filtered_by_silent(monkeypatch):
    previous = signal.getsignal(signal.SIGHUP)
    options = {"logfile": "", "nodaemon": True, "logger": f"{__name__}.recording_observer"}
    logfile.configure(options, silent=True)
    try:
        observer = logfile.observer()
        observer({"log_level": LogLevel.info, "log_format": "hidden", "log_namespace": "t"})
        observer({"log_level": LogLevel.error, "log_format": "shown", "log_namespace": "t"})
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert [e["log_format"] for e in RECORDED] == ["shown"]
    assert logfile.current_file is None  # nothing to reopen: the given logger owns output


class _Endpoint:
    """A client endpoint whose connections fail (refused) or hang until cancelled."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.attempts = 0
        self.pending: list = []

    def connect(self, factory):
        from twisted.internet import defer
        from twisted.internet.error import ConnectionRefusedError

        self.attempts += 1
        if self.hang:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.fail(ConnectionRefusedError())


def _link_events(run):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [e for e in events if e.get("log_namespace") == "tvmrpc.client"]


def test_unreachable_link_warns_once_then_once_a_minute_with_the_retry_delay():
    clock, endpoint = Clock(), _Endpoint()
    link = TrackerLink(
        clock,
        ("10.0.0.1", 9190),
        lambda p: None,
        lambda p: None,
        retry_policy=lambda attempt: 2.0,
        endpoint=endpoint,
    )

    def run():
        link.startService()
        clock.pump([1.0] * 119)  # two minutes of retries every 2 s

    warnings = _link_events(run)
    print(f"{endpoint.attempts} attempts, {len(warnings)} warning lines")
    assert endpoint.attempts >= 59
    assert [e["log_level"] for e in warnings] == [LogLevel.warn] * 2
    first, later = warnings
    assert first["what"] == "is unreachable: connection refused"
    assert first["delay"] == 2.0
    assert "further failures are logged at most once a minute" in first["log_format"]
    assert "still" in later["log_format"]
    assert later["n"] == 31  # 60 s after the first failure, at 2 s per attempt
    assert link.state is LinkState.WAITING
    link.stopService()
    assert link.state is LinkState.STOPPED


def test_stopping_a_link_while_connecting_cancels_quietly():
    clock, endpoint = Clock(), _Endpoint(hang=True)
    link = TrackerLink(clock, ("10.0.0.1", 9190), lambda p: None, lambda p: None, endpoint=endpoint)

    def run():
        link.startService()
        assert link.state is LinkState.CONNECTING
        d = link.stopService()
        assert d.called
        clock.advance(60)

    assert _link_events(run) == []  # a cancelled attempt is no failure to report
    assert endpoint.pending[0].called  # the attempt was cancelled
    assert endpoint.attempts == 1


@pytest.mark.parametrize("module", ["tracker", "proxy", "server"])
def test_every_daemon_takes_the_shared_flags(module):
    import importlib

    options = importlib.import_module(f"tvmrpc.{module}.service").Options()
    options.parseOptions(
        ["--key", "k", "--silent", "--max-connections-per-peer", "0", "--port", "9300"]
        if module == "server"
        else ["--silent", "--max-connections-per-peer", "0", "--port", "9300"]
    )
    assert options["silent"]
    assert options["max-connections-per-peer"] == 0
    with pytest.raises(usage.UsageError, match="0 \\(unlimited\\) or more"):
        importlib.import_module(f"tvmrpc.{module}.service").Options().parseOptions(
            ["--max-connections-per-peer", "-1"] + (["--key", "k"] if module == "server" else [])
        )
