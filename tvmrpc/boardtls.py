"""Client certificates as board identity: the ``mtls:`` endpoint string and what it admits.

``--listen mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:clientCA=CA.pem``
listens with TLS like Twisted's ``ssl:`` and also asks every peer for a
client certificate, verified against the CA certificates (PEM, one or more)
in ``clientCA``. Optional fields: ``interface=IP``, ``backlog=N``,
``clientCert=required`` (default: a peer without a valid certificate fails
the TLS handshake) or ``clientCert=optional`` (a peer may present none; one
it presents must verify). A registration on a connection whose certificate
verified is admitted as a board (:func:`admitted`), whether or not the
daemon has a board secret (docs/security.md). The endpoint itself is
:mod:`tvmrpc.mtls` (imported only when used: it needs pyOpenSSL).

Invariants:
- :func:`parse_spec` is pure; a bad string raises :class:`EndpointError`
  with one line naming the field. :func:`server_endpoint` also reads every
  file (see :mod:`tvmrpc.mtls`); ``--listen`` turns either into a start-up
  error, exit 1.
- :func:`verified_subject` is not None only for a connection that came
  through an ``mtls:`` endpoint (:func:`remember`) and whose peer presented
  a certificate that OpenSSL verified against that endpoint's ``clientCA``
  (a failed verification ends the handshake: no byte reaches the daemon).
- Nothing here imports pyOpenSSL: the daemons import this module whether or
  not TLS support is installed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from . import sockopts
from .endpointstr import split_colons

log = Logger(namespace="tvmrpc.boardtls")

#: The endpoint prefix.
PREFIX = "mtls:"
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
    parts = split_colons(description)
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


def describe_refusal(text: str, spec: MutualTLSSpec) -> str:
    """What an OpenSSL handshake error (its message) means for a board, in one line."""
    if "peer did not return a certificate" in text:
        return "it sent no client certificate (this port has clientCert=required)"
    if "certificate verify failed" in text or "unknown ca" in text:
        return f"its client certificate is not signed by a CA in clientCA={spec.client_ca}"
    if "http request" in text or "wrong version number" in text or "unexpected eof" in text:
        return f"not a TLS handshake ({text[:120]})"
    return f"TLS handshake failed ({text[:160]})"


def server_endpoint(
    reactor: Any, description: str, keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE
) -> Any:
    """The endpoint for an ``mtls:`` string (:class:`tvmrpc.mtls.MutualTLSEndpoint`),
    its files read; EndpointError if bad."""
    spec = parse_spec(description)
    from . import mtls  # needs pyOpenSSL: an ImportError here is a start-up error

    return mtls.MutualTLSEndpoint(reactor, spec, mtls.certificate_options(spec), keepalive)


def remember(transport: Any) -> None:
    """Note ``transport`` as an mtls: connection (its verified certificate admits boards)."""
    _BOARD_TRANSPORTS.add(transport)


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
