"""Unit tests (plain calls, string transports) for the TLS session relay of ``--proxy tls:``
and the proxy connector's observer subscription, plus the mtls: refusal wording."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.test_server_units import FakeRuntime
from tvmrpc import boardtls
from tvmrpc.outgoing import beneath, parse_target
from tvmrpc.server.board import Board
from tvmrpc.server.lifecycle import Lifecycle
from tvmrpc.server.through_proxy import ProxyConnector
from tvmrpc.server.tlsrelay import SessionRelay, relay_session


class Outer(StringTransport):
    """A TLS transport stand-in: records writes, pauses and its close."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


def relayed(early: bytes = b"") -> tuple[SessionRelay, Outer, StringTransport]:
    outer = Outer()
    outer.paused = 1  # the leg paused it after the handshake answer
    relay = SessionRelay(outer, early)
    unix = StringTransport()
    relay.makeConnection(unix)
    return relay, outer, unix


def test_early_bytes_first_then_both_directions_in_order():
    relay, outer, unix = relayed(early=b"first")
    assert outer.resumed == 1  # reading the client again only once the relay exists
    relay.from_client(b"-second")
    assert unix.value() == b"first-second"
    relay.dataReceived(b"reply")
    assert outer.value() == b"reply"
    assert (relay.to_worker, relay.to_client) == (12, 5)


def test_each_side_pauses_the_other():
    _, outer, unix = relayed()
    # The worker's side is slow: its transport pauses its producer, the TLS connection.
    unix.producer.pauseProducing()
    assert outer.paused == 2
    unix.producer.resumeProducing()
    assert outer.resumed == 2
    # The client's side is slow: the TLS transport pauses reading the worker's socket.
    outer.producer.pauseProducing()
    assert unix.producerState == "paused"
    outer.producer.resumeProducing()
    assert unix.producerState == "producing"
    # Stopping a producer is left to the relay's own close (bytes are flushed first).
    outer.producer.stopProducing()
    assert unix.producerState == "producing"
    assert not unix.disconnecting


def test_a_client_that_leaves_closes_the_worker_side_and_back():
    relay, outer, unix = relayed()
    relay.client_lost()
    assert unix.disconnecting
    relay.connectionLost()
    assert not outer.disconnecting  # it is already gone: not closed twice
    relay, outer, unix = relayed()
    relay.connectionLost()  # the worker ended the session
    assert outer.disconnecting
    assert outer.producer is None


def test_relay_session_hands_a_blocking_socket_and_adopts_the_other_end():
    adopted = []

    class Reactor:
        def adoptStreamConnection(self, fd, family, factory):
            assert family == socket.AF_UNIX
            proto = factory.buildProtocol(None)
            adopted.append((socket.socket(fileno=socket.dup(fd)), proto))
            proto.makeConnection(StringTransport())

    outer = Outer()
    sock, relay = relay_session(Reactor(), outer, b"early")
    try:
        assert sock.getblocking()
        assert sock.family == socket.AF_UNIX
        ours, proto = adopted[0]
        assert proto is relay
        ours.sendall(b"to the worker")
        assert sock.recv(64) == b"to the worker"
        ours.close()
    finally:
        sock.close()
    assert relay.transport.value() == b"early"


def test_connector_observes_the_board_only_while_running(tmp_path):
    clock = Clock()
    board = Board(clock, FakeRuntime(clock), workdir=str(tmp_path))
    life = Lifecycle()
    before = (len(board.idle_observers), len(life.observers))
    connector = ProxyConnector(clock, board, "k", ("127.0.0.1", 9), lifecycle=life)
    assert (len(board.idle_observers), len(life.observers)) == before
    connector.startService()
    assert connector._maybe_connect in board.idle_observers
    assert connector._state_changed in life.observers
    connector.stopService()
    assert (len(board.idle_observers), len(life.observers)) == before


def test_connector_takes_an_endpoint_string(tmp_path):
    clock = Clock()
    board = Board(clock, FakeRuntime(clock), workdir=str(tmp_path))
    target = parse_target("tls:host=proxy.lab:port=9090", "--proxy")
    connector = ProxyConnector(clock, board, "k", target)
    assert connector._where() == "proxy proxy.lab:9090"
    assert type(connector._endpoint()).__name__ != "HostnameEndpoint"  # TLS wraps it
    plain = ProxyConnector(clock, board, "k", ("127.0.0.1", 9))
    assert type(plain._endpoint()).__name__ == "HostnameEndpoint"


def test_refusals_say_which_side_to_fix():
    spec = boardtls.parse_spec("mtls:1:privateKey=k:clientCA=/etc/tvm/boards-ca.pem")
    no_cert = "[('SSL routines', '', 'peer did not return a certificate')]"
    assert "sent no client certificate" in boardtls.describe_refusal(no_cert, spec)
    other = "[('SSL routines', '', 'certificate verify failed')]"
    assert "clientCA=/etc/tvm/boards-ca.pem" in boardtls.describe_refusal(other, spec)
    assert "not a TLS handshake" in boardtls.describe_refusal("wrong version number", spec)


def test_socket_options_go_beneath_the_tls_layer():
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    tcp = StringTransport()
    wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
    wrapper.makeConnection(tcp)
    assert beneath(wrapper) is tcp
    assert beneath(tcp) is tcp


def test_proxy_flag_implies_through_proxy():
    import pytest
    from twisted.python import usage

    from tvmrpc.server.service import Options

    options = Options()
    options.parseOptions(["--key", "k", "--proxy", "127.0.0.1:9090"])
    assert options["through-proxy"]
    assert options["proxy"] == ("127.0.0.1", 9090)
    options = Options()
    options.parseOptions(["--key", "k", "--proxy", "tls:host=proxy.lab:port=9091"])
    assert str(options["proxy"]) == "tls://proxy.lab:9091"
    with pytest.raises(usage.UsageError, match="--through-proxy needs --key"):
        Options().parseOptions(["--proxy", "127.0.0.1:9090"])
    with pytest.raises(usage.UsageError, match="exclude each other"):
        Options().parseOptions(["--key", "k", "--proxy", "127.0.0.1:9", "--listen", "tcp:0"])


def test_only_an_mtls_connection_can_be_admitted_by_certificate():
    class Plain(StringTransport):
        def getPeerCertificate(self):
            raise AssertionError("a connection not from an mtls: port is never asked")

    assert boardtls.verified_subject(Plain()) is None
    assert not boardtls.admitted(None, "nobody")

    class NoCertificate(StringTransport):
        def getPeerCertificate(self):
            return None

    optional = NoCertificate()
    boardtls.remember(optional)  # an mtls: clientCert=optional peer that presented none
    assert boardtls.verified_subject(optional) is None


def test_a_missing_trust_root_directory_is_one_line_naming_it(tmp_path):
    """Twisted raises an UnlistableError with no message; the operator gets the path and the fix."""
    from twisted.python import usage

    missing = tmp_path / "no-such-ca"
    with pytest.raises(usage.UsageError) as caught:
        parse_target(f"tls:host=proxy.lab:port=9090:trustRoots={missing}", "--proxy")
    message = str(caught.value)
    assert f"trustRoots={missing} is not a readable directory" in message
    assert "\n" not in message
