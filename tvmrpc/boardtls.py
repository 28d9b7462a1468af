"""Client certificates as board identity: the ``mtls:`` listening endpoint.

``--listen mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:clientCA=CA.pem``
listens with TLS like Twisted's ``ssl:`` and also asks every peer for a
client certificate, verified against the CA certificates (PEM, one or more)
in ``clientCA``. Optional fields: ``interface=IP``, ``backlog=N``,
``clientCert=required`` (default: a peer without a valid certificate fails
the TLS handshake) or ``clientCert=optional`` (a peer may present none; one
it presents must verify). A registration on a connection whose certificate
verified is admitted as a board (:func:`admitted`), whether or not the
daemon has a board secret (docs/security.md).

Twisted's ``ssl:`` string has no client-certificate verification, so this
endpoint is built from public parts: :class:`~twisted.internet.ssl.CertificateOptions`
(``verify=True``, ``caCerts``, ``requireCertificate``), a
:class:`~twisted.protocols.tls.TLSMemoryBIOFactory` around the daemon's
factory, and a TCP server endpoint.

Invariants:
- :func:`server_endpoint` reads every file at once: a bad string, a missing
  or unreadable key, certificate or CA file, or a CA file with no
  certificate raises :class:`EndpointError` with one line naming the field
  and the file (``--listen`` turns it into a start-up error, exit 1).
- :func:`verified_subject` is not None only for a connection that came
  through an ``mtls:`` endpoint and whose peer presented a certificate that
  OpenSSL verified against that endpoint's ``clientCA`` (a failed
  verification ends the handshake: no byte reaches the daemon).
- A connection refused by the TLS layer (no certificate where one is
  required, one from another CA, or not TLS at all) is logged at warn once
  per peer address and port (the last :data:`REMEMBERED_PEERS` peers are
  remembered), counted as ``client certificate`` in
  :data:`tvmrpc.status.refusals.REFUSED`, and never reaches the daemon past
  ``connectionMade``/``connectionLost``.
- The daemon's protocol object is its own (the TLS layer wraps it, as with
  ``ssl:``); TCP_NODELAY is set on each connection.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from . import sockopts
from .status.refusals import REFUSED

log = Logger(namespace="tvmrpc.boardtls")

#: The endpoint prefix.
PREFIX = "mtls:"
#: Peers whose refusal was already logged, per listening port (oldest forgotten first).
REMEMBERED_PEERS = 4096
#: The TLS transports of ``mtls:`` connections (the daemon's protocol's ``transport``).
_BOARD_TRANSPORTS: weakref.WeakSet[Any] = weakref.WeakSet()
_FIELDS = ("interface", "backlog", "privateKey", "certKey", "clientCA", "clientCert")


class EndpointError(ValueError):
    """An ``mtls:`` string or one of its files that cannot be used."""


@dataclass(frozen=True)
class MutualTLSSpec:
    """What an ``mtls:`` string asks for (no file read yet)."""

    port: int
    private_key: str
    cert_key: str
    client_ca: str
    interface: str = ""
    backlog: int = 50
    required: bool = True


def split_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint string grammar: ``:``-separated, ``\\`` escapes, ``name=value``."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts[1:]:  # parts[0] is the prefix
        name, sep, value = part.partition("=")
        if sep:
            named[name] = value
        else:
            positional.append(part)
    return positional, named


def parse_spec(description: str) -> MutualTLSSpec:
    """Parse an ``mtls:`` string (pure); EndpointError with one line if bad."""
    example = "e.g. mtls:9191:privateKey=tracker.key:certKey=tracker.pem:clientCA=boards-ca.pem"
    positional, named = split_fields(description)
    unknown = sorted(set(named) - set(_FIELDS) - {"port"})
    if unknown:
        raise EndpointError(
            f"unknown field {unknown[0]}= (known: port, {', '.join(_FIELDS)}; {example})"
        )
    port_text = named.get("port") or (positional[0] if positional else "")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise EndpointError(f"needs a port number first ({example})")
    for field in ("privateKey", "clientCA"):
        if not named.get(field):
            raise EndpointError(f"needs {field}= ({example})")
    mode = named.get("clientCert", "required")
    if mode not in ("required", "optional"):
        raise EndpointError(f"clientCert= is required or optional, not {mode!r}")
    backlog = named.get("backlog", "50")
    if not backlog.isdigit():
        raise EndpointError(f"backlog= wants a number, got {backlog!r}")
    return MutualTLSSpec(
        port=int(port_text),
        private_key=named["privateKey"],
        cert_key=named.get("certKey") or named["privateKey"],
        client_ca=named["clientCA"],
        interface=named.get("interface", ""),
        backlog=int(backlog),
        required=mode == "required",
    )


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
    #: TCP keepalive of each connection (the daemon's own setting reaches only the TLS layer).
    keepalive = sockopts.DEFAULT_KEEPALIVE

    def __init__(self, spec: MutualTLSSpec, options: Any, wrapped: IProtocolFactory) -> None:
        super().__init__(options, False, wrapped)
        self.spec = spec
        self._warned: collections.OrderedDict[str, None] = collections.OrderedDict()

    def buildProtocol(self, addr: Any) -> Any:
        tls = super().buildProtocol(addr)
        if not isinstance(tls, _NoDelayTLS):  # ``protocol`` is ours; None if refused
            return tls
        _BOARD_TRANSPORTS.add(tls)
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


def describe_refusal(text: str, spec: MutualTLSSpec) -> str:
    """What an OpenSSL handshake error (its message) means for a board, in one line."""
    if "peer did not return a certificate" in text:
        return "it sent no client certificate (this port has clientCert=required)"
    if "certificate verify failed" in text or "unknown ca" in text:
        return f"its client certificate is not signed by a CA in clientCA={spec.client_ca}"
    if "http request" in text or "wrong version number" in text or "unexpected eof" in text:
        return f"not a TLS handshake ({text[:120]})"
    return f"TLS handshake failed ({text[:160]})"


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
        tls = BoardTLSFactory(spec, self.options, factory)
        tls.keepalive = self.keepalive
        return tcp.listen(tls)


def server_endpoint(
    reactor: Any, description: str, keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE
) -> MutualTLSEndpoint:
    """The endpoint for an ``mtls:`` string, its files read; EndpointError if bad."""
    spec = parse_spec(description)
    return MutualTLSEndpoint(reactor, spec, certificate_options(spec), keepalive)


def verified_subject(transport: Any) -> str | None:
    """The subject of the peer's verified client certificate (RFC 4514), else None."""
    if transport not in _BOARD_TRANSPORTS:
        return None
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return str(cert.to_cryptography().subject.rfc4514_string())


def admitted(transport: Any, who: str) -> bool:
    """Whether ``transport``'s client certificate admits it as a board (logged at info)."""
    subject = verified_subject(transport)
    if subject is None:
        return False
    log.info(
        "{who} admitted as a board by its client certificate {subject}", who=who, subject=subject
    )
    return True
