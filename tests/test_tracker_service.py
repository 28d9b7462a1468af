"""``twistd tvm-tracker`` options that reach the protocol (plain calls)."""

from __future__ import annotations

import pytest
from twisted.python import usage

from tvmrpc.tracker.protocol import DEFAULT_HANDSHAKE_TIMEOUT
from tvmrpc.tracker.service import Options, makeService


def parsed(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def factory_of(options: Options):
    (listener,) = [svc for svc in makeService(options) if hasattr(svc, "factory")]
    return listener.factory


def test_handshake_timeout_default_and_flag():
    assert DEFAULT_HANDSHAKE_TIMEOUT == 5.0
    assert factory_of(parsed()).handshake_timeout == 5.0
    assert factory_of(parsed("--handshake-timeout", "0.5")).handshake_timeout == 0.5


@pytest.mark.parametrize("value", ["0", "-1"])
def test_handshake_timeout_must_be_positive(value):
    with pytest.raises(usage.UsageError, match="--handshake-timeout must be positive"):
        parsed("--handshake-timeout", value)


def test_make_service_uses_the_reactor_it_is_given():
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    top = makeService(parsed("--port", "9190", "--handshake-timeout", "2"), reactor=reactor)
    (listener,) = [svc for svc in top if hasattr(svc, "factory")]
    assert listener.factory.clock is reactor
    top.startService()
    try:
        (port, _factory, _backlog, interface) = reactor.tcpServers[0]
        assert (port, interface) == (9190, "0.0.0.0")
        assert reactor.getDelayedCalls() == []  # nothing waits on the global reactor's time
        listener.factory.greeting.add("someone")
        assert [call.getTime() for call in reactor.getDelayedCalls()] == [2.0]
    finally:
        listener.factory.greeting.stop()
        top.stopService()
