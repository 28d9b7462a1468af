"""Where our daemons connect out to: ``HOST:PORT`` as stock, or a Twisted client endpoint.

``--tracker`` (server, proxy) takes either form; a ``tls:`` string
(``tls:host=tracker.lab:port=9190:trustRoots=/etc/tvm/ca:certificate=board.pem:privateKey=board.key``)
connects over TLS and verifies the peer's certificate chain against
``trustRoots`` (a directory of PEM CA certificates; default: the system's)
and its name against ``host`` (service_identity).

Invariants:
- ``HOST:PORT`` stays the plain ``(host, port)`` tuple; an endpoint string
  is a :class:`Target`, which indexes like that tuple (``[0]``, ``[1]``)
  and carries the string in ``description``.
- :func:`parse_target` builds the endpoint once, so a bad string, a missing
  file or missing TLS support is a one-line usage error at start-up.
- :func:`beneath` finds the TCP transport under a TLS one, so socket
  options (TCP_NODELAY, keepalive, quick ACKs) reach the socket on TLS links
  too.
- :func:`tls_failure` names, in one line, which side of a failed TLS
  handshake to fix: the peer's certificate (``trustRoots=``, ``host=``) or
  ours (``certificate=``/``privateKey=`` refused by an ``mtls:`` port).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.protocols.policies import ProtocolWrapper
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import UnlistableError

from .listening import parse_hostport

#: Prefixes that make a ``--tracker`` value a client endpoint string.
ENDPOINT_PREFIXES = ("tls:", "tcp:")


class Target(NamedTuple):
    """An outgoing link's peer: its host and port (for logs) and its endpoint string."""

    host: str
    port: int
    description: str | None = None

    def endpoint(self, reactor: Any) -> Any:
        """The client endpoint for ``description`` (None for plain HOST:PORT)."""
        if self.description is None:
            return None
        from twisted.internet.endpoints import clientFromString

        return clientFromString(reactor, self.description)

    def __str__(self) -> str:
        scheme = "tls://" if (self.description or "").startswith("tls:") else ""
        return f"{scheme}{self.host}:{self.port}"


def _field(description: str, name: str, position: int) -> str | None:
    """A ``name=value`` (or positional) field of an endpoint string, for logs."""
    parts = description.split(":")[1:]
    positional = [p for p in parts if "=" not in p]
    for part in parts:
        if part.startswith(name + "="):
            return part[len(name) + 1 :]
    return positional[position] if len(positional) > position else None


def parse_target(value: str, flag: str = "--tracker") -> tuple[str, int] | Target:
    """``HOST:PORT`` to ``(host, port)`` as before, an endpoint string to a
    :class:`Target`; UsageError if bad."""
    if not value.startswith(ENDPOINT_PREFIXES):
        return parse_hostport(value)
    host = _field(value, "host", 0)
    port = _field(value, "port", 1)
    if not host or not port or not port.isdigit():
        example = "proxy.lab:port=9091" if flag == "--proxy" else "tracker.lab:port=9190"
        raise usage.UsageError(
            f"{flag} {value!r}: an endpoint string needs host= and port= "
            f"(e.g. tls:host={example}:trustRoots=/etc/tvm/ca)"
        )
    target = Target(host, int(port), value)
    from twisted.internet import reactor

    try:
        target.endpoint(reactor)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise usage.UsageError(
            f"{flag} {value!r} needs TLS support, missing {missing}: pip install 'twisted[tls]'"
        ) from None
    except UnlistableError:
        raise usage.UsageError(
            f"{flag} {value!r}: trustRoots={_field(value, 'trustRoots', 99)} is not a readable "
            "directory; give the directory that holds the CA certificates (PEM files)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise usage.UsageError(
            f"bad {flag} endpoint {value!r}: {str(exc) or type(exc).__name__}"
        ) from None
    return target


def tls_failure(reason: Failure) -> str | None:
    """A one-line explanation if ``reason`` is a failed TLS handshake, else None."""
    value = reason.value
    module = type(value).__module__ or ""
    if not (module.startswith("OpenSSL") or module.startswith("service_identity")):
        return None
    detail = str(value)
    if "certificate verify failed" in detail:
        why = "its certificate is not signed by a CA in trustRoots="
        fix = "check trustRoots= and host= in the endpoint string"
    elif module.startswith("service_identity"):
        why = "its certificate does not name the host= we asked for"
        fix = "check trustRoots= and host= in the endpoint string"
    elif "certificate required" in detail or ("alert" in detail and "certificate" in detail):
        why = "it refused our client certificate (none, or not from its clientCA=)"
        fix = "check certificate= and privateKey= in the endpoint string"
    elif "unknown ca" in detail:
        why = "it refused our client certificate (not signed by its clientCA=)"
        fix = "check certificate= and privateKey= in the endpoint string"
    else:
        why = "the TLS handshake failed"
        fix = "check the endpoint string"
    return f"{why} ({detail[:200]}); {fix}"


def beneath(transport: Any) -> Any:
    """The TCP transport under a TLS one (a ``ProtocolWrapper``'s ``transport``), else itself.

    Socket options (TCP_NODELAY, keepalive, quick ACKs) belong on the socket
    beneath the TLS layer.
    """
    if isinstance(transport, ProtocolWrapper) and transport.transport is not None:
        return transport.transport
    return transport
