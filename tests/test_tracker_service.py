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
