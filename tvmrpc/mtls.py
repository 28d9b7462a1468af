"""The ``mtls:`` listening endpoint: TLS that verifies client certificates.

Built from Twisted's public TLS parts (pyOpenSSL needed, so imported only
when an ``mtls:`` string is used): :class:`~twisted.internet.ssl.CertificateOptions`
(``verify=True``, ``caCerts``, ``requireCertificate``), a
:class:`~twisted.protocols.tls.TLSMemoryBIOFactory` around the daemon's
factory, and a TCP server endpoint. The string's grammar and what a verified
certificate admits are in :mod:`tvmrpc.boardtls`.

Invariants:
- :func:`certificate_options` reads every file at once: a missing or
  unreadable key, certificate or CA file, or a CA file with no certificate,
  raises :class:`~tvmrpc.boardtls.EndpointError` with one line naming the
  field and the file.
- Every connection's TLS transport is registered with
  :func:`tvmrpc.boardtls.remember` (only those can be admitted by a
  certificate); a failed handshake never reaches the daemon past
  ``connectionMade``/``connectionLost``.
- A connection refused by the TLS layer (no certificate where one is
  required, one from another CA, or not TLS at all) is logged at warn once
  per peer address and port (the last :data:`REMEMBERED_PEERS` peers are
  remembered) and counted as ``client certificate`` in
  :data:`tvmrpc.status.refusals.REFUSED`.
- The daemon's protocol object is its own (the TLS layer wraps it, as with
  ``ssl:``); TCP_NODELAY and the daemon's keepalive are set on each socket.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from . import sockopts
from .boardtls import EndpointError, MutualTLSSpec, describe_refusal, remember
from .status.refusals import REFUSED

log = Logger(namespace="tvmrpc.mtls")

#: Peers whose refusal was already logged, per listening port (oldest forgotten first).
REMEMBERED_PEERS = 4096


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise EndpointError(f"{field}={path}: cannot read it: {exc.strerror or exc}") from None


def certificate_options(spec: MutualTLSSpec) -> Any:
    """Read the files and build the TLS options (CertificateOptions); EndpointError if bad."""
    from cryptography import x509
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions

    ca_pem = _read(spec.client_ca, "clientCA")
    try:
        authorities = [
            crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(ca_pem)
        ]
    except ValueError:
        authorities = []
    if not authorities:
        raise EndpointError(f"clientCA={spec.client_ca}: no PEM certificate in it")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, _read(spec.private_key, "privateKey"))
    except crypto.Error:
        raise EndpointError(f"privateKey={spec.private_key}: not a PEM private key") from None
    chain_pem = _read(spec.cert_key, "certKey")
    try:
        chain = [
            crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(chain_pem)
        ]
    except ValueError:
        raise EndpointError(f"certKey={spec.cert_key}: no PEM certificate in it") from None
    try:
        return CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:] or None,
            verify=True,
            caCerts=authorities,
            requireCertificate=spec.required,
        )
    except Exception as exc:  # noqa: BLE001 - OpenSSL's reasons are varied; one line each
        raise EndpointError(f"certKey={spec.cert_key} and privateKey=: {exc}") from None


class _NoDelayTLS(BufferingTLSTransport):
    """Twisted's TLS layer, with TCP_NODELAY and keepalive on the socket beneath it."""

    factory: BoardTLSFactory

    #: Our end's address (the port the peer reached), known while connected.
    local: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.local = transport.getHost()
        sockopts.set_nodelay(transport)
        sockopts.set_keepalive(transport, self.factory.keepalive)
        super().makeConnection(transport)


class BoardTLSFactory(TLSMemoryBIOFactory):
    """TLS with client certificates around a daemon's factory."""

    protocol = _NoDelayTLS
    noisy = False

    def __init__(
        self,
        spec: MutualTLSSpec,
        options: Any,
        wrapped: IProtocolFactory,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        super().__init__(options, False, wrapped)
        self.spec = spec
        #: TCP keepalive of each socket (the daemon's own call reaches only the TLS layer).
        self.keepalive = keepalive
        self._warned: collections.OrderedDict[str, None] = collections.OrderedDict()

    def buildProtocol(self, addr: Any) -> Any:
        tls = super().buildProtocol(addr)
        if not isinstance(tls, _NoDelayTLS):  # ``protocol`` is ours; None if refused
            return tls
        remember(tls)
        inner: Any = tls.wrappedProtocol
        lost = inner.connectionLost

        def connection_lost(reason: Failure = connectionDone) -> Any:
            # The TLS layer hands the daemon's protocol the handshake's error.
            from OpenSSL import SSL

            if reason.check(SSL.Error):
                self.refused(addr, tls.local, reason.getErrorMessage())
            return lost(reason)

        inner.connectionLost = connection_lost
        return tls

    def refused(self, peer: Any, host_address: Any, error: str) -> None:
        """A TLS handshake failed: count it, warn once per peer."""
        REFUSED.add("client certificate")
        host = str(getattr(peer, "host", peer))
        if host in self._warned:
            self._warned.move_to_end(host)
            return
        self._warned[host] = None
        while len(self._warned) > REMEMBERED_PEERS:
            self._warned.popitem(last=False)
        log.warn(
            "refused a TLS connection from {host} on port {port}: {why} (logged once per peer)",
            host=host,
            port=getattr(host_address, "port", self.spec.port),
            why=describe_refusal(error, self.spec),
        )


@implementer(IStreamServerEndpoint)
class MutualTLSEndpoint:
    """An ``IStreamServerEndpoint``: TCP, then TLS asking for client certificates."""

    def __init__(
        self,
        reactor: Any,
        spec: MutualTLSSpec,
        options: Any,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.options = options
        self.keepalive = keepalive

    def listen(self, factory: IProtocolFactory) -> Any:
        spec = self.spec
        tcp: Any
        if ":" in spec.interface:
            tcp = endpoints.TCP6ServerEndpoint(
                self.reactor, spec.port, spec.backlog, spec.interface
            )
        else:
            tcp = endpoints.TCP4ServerEndpoint(
                self.reactor, spec.port, spec.backlog, spec.interface
            )
        return tcp.listen(BoardTLSFactory(spec, self.options, factory, self.keepalive))
