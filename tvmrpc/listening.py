"""Listening sockets for the daemons: a port range as stock does it, or an endpoint.

``--host H --port P --port-end E`` binds the first free port in ``[P, E)``
(stock behaviour); ``--listen ENDPOINT`` takes any Twisted server endpoint
string (``tcp:9190:interface=127.0.0.1``, ``unix:/run/tvm/tracker.sock``,
``systemd:domain=INET:index=0``, ``ssl:...``), or ``mtls:...`` (TLS that
verifies client certificates: :mod:`tvmrpc.boardtls`).

Invariants:
- ``--listen`` is repeatable: the daemon listens on every endpoint given
  (``bound`` fires with the first), each logged as below; any one failing
  is the start-up failure below.
- The bound address is logged as ``<name> listening on <host>:<port>`` (or
  ``<name> listening on unix:<path>``), which tests and supervisors watch for.
- The range tried is what the flags say: neither flag gives the daemon's
  stock default range; ``--port P`` alone tries only P; ``--port-end`` must
  be above ``--port``. Landing on another port than the first one tried is
  logged at warn, naming both ports.
- Start-up failures (port or range in use, a bad endpoint string, an endpoint
  whose optional dependency is missing) are one line and exit status 1: at
  parse time as ``<daemon>: <message>`` on stderr, once running as an error
  log line followed by :func:`~tvmrpc.exiting.stop_with_exit_code`.
- With ``--max-connections-per-peer N`` (N > 0) a peer address holds at most
  N connections at once on each port; the next one is aborted as soon as it
  is accepted (before anything it sent is read), and refusals are logged at
  warn at most once a minute per port.
  Counting happens in ``buildProtocol`` and at connection loss only: the data
  path is untouched and the protocol object is the daemon's own, so a
  transport can still be detached (the server's socket hand-off).
- With ``--allow CIDR`` (repeatable) a TCP peer whose address is in none of
  the listed networks is aborted as soon as it is accepted, before anything
  it sent is read; refusals are logged at warn at most once a minute per port
  (with the count held back) and counted in
  :data:`tvmrpc.status.refusals.REFUSED` (reason ``allow``). Without the flag
  everyone is let in, as stock. UNIX-socket peers are local and always let in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort, ILoggingContext, IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from . import boardtls, logfile, sockopts
from .exiting import stop_with_exit_code
from .ratelimit import RateLimit
from .status.refusals import REFUSED
from .systemd import activation

#: Exit status of a daemon that could not open its listening port.
EXIT_CANNOT_LISTEN = 1

#: Default of ``--max-connections-per-peer``: room for a proxy or a NAT with
#: hundreds of boards behind one address, far below a typical fd limit of 1024+.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 512

log = Logger(namespace="tvmrpc.listening")


class StartupError(SystemExit):
    """A configuration the daemon cannot start with; prints one line, exits 1."""

    def __init__(self, daemon: str, message: str) -> None:
        super().__init__(f"{daemon}: {message}")


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) to a tuple; raise UsageError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise usage.UsageError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def port_range(
    port: int | None, port_end: int | None, default_port: int, default_port_end: int
) -> tuple[int, int]:
    """The ``[first, end)`` range the flags ask for (see the module invariants)."""
    if port is None and port_end is None:
        return default_port, default_port_end
    first = default_port if port is None else port
    end = first + 1 if port_end is None else port_end
    if end <= first:
        raise usage.UsageError(f"--port-end ({end}) must be greater than --port ({first})")
    return first, end


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: str, flag: str = "--allow") -> Network:
    """``10.0.0.0/8``, ``192.168.1.7`` or ``fd00::/8`` to a network; UsageError if bad."""
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise usage.UsageError(
            f"{flag} wants an address or network such as 10.1.0.0/16, got {value!r}"
        ) from None


def address_in(host: str, networks: Sequence[Network]) -> bool:
    """Whether ``host`` (an IP address string) is in one of ``networks``.

    IPv4 peers seen on a dual-stack socket (``::ffff:10.0.0.1``) are matched
    as IPv4; a host that is not an IP address is in none.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return any(address in network for network in networks)


def endpoint_for(
    reactor: Any,
    description: str,
    keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
) -> Any:
    """The server endpoint for a ``--listen`` string (the one place that parses them).

    ``systemd:`` strings go through :mod:`tvmrpc.systemd.activation` (works
    without ``FileDescriptorName=``), ``mtls:`` (TLS with client certificates)
    through :mod:`tvmrpc.boardtls`; everything else to ``serverFromString``.
    """
    if description.startswith(boardtls.PREFIX):
        return boardtls.server_endpoint(reactor, description, keepalive)
    return activation.server_endpoint(reactor, description)


def check_endpoint(daemon: str, flag: str, description: str) -> None:
    """Parse an endpoint string without listening; raise StartupError if it cannot work."""
    from twisted.internet import reactor

    if description.startswith("systemd:"):
        try:
            activation.check(description)
        except activation.ActivationError as exc:
            raise StartupError(daemon, f"{flag} {description!r}: {exc}") from None
        return
    try:
        endpoint_for(reactor, description)
    except boardtls.EndpointError as exc:
        raise StartupError(daemon, f"{flag} {description!r}: {exc}") from None
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if description.startswith(("ssl:", boardtls.PREFIX)) or missing in (
            "OpenSSL",
            "service_identity",
        ):
            fix = "pip install pyOpenSSL service-identity (or 'twisted[tls]')"
            raise StartupError(
                daemon, f"{flag} {description!r} needs TLS support, missing {missing}: {fix}"
            ) from None
        raise StartupError(
            daemon, f"{flag} {description!r} needs the missing module {missing}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        hint = "examples: tcp:9190:interface=0.0.0.0, unix:/run/tvm.sock"
        if description.startswith("ssl:") and "clientCA=" in description:
            hint = "client certificates need mtls: instead of ssl:, see docs/security.md"
        raise StartupError(
            daemon,
            f"bad {flag} endpoint {description!r}: {exc or type(exc).__name__} ({hint})",
        ) from None


class ListenOptions(usage.Options):
    """The listening flags every daemon shares (mixed into each Options)."""

    optFlags = [
        ["silent", None, "Log only warnings and errors (stock's --silent)."],
    ]

    def opt_allow(self, value: str) -> None:
        """Accept connections only from this address or network (CIDR, repeatable;
        default: from everyone, as stock)."""
        self.setdefault("allow", []).append(parse_network(value))

    optParameters = [
        ["host", None, "0.0.0.0", "Address to bind to."],
        [
            "port",
            None,
            None,
            "Port to listen on; without --port-end only this port is tried.",
            int,
        ],
        ["port-end", None, None, "End (exclusive) of the port range to try.", int],
        [
            "max-connections-per-peer",
            None,
            DEFAULT_MAX_CONNECTIONS_PER_PEER,
            "Connections one peer address may hold open at once on each port; 0 = unlimited.",
            int,
        ],
    ]

    def opt_listen(self, value: str) -> None:
        """Twisted endpoint string; overrides host/port. Repeatable: listen on each
        (e.g. plaintext for stock clients and ssl: for boards)."""
        self["listens"].append(value)
        self["listen"] = self["listens"][0]

    def opt_dead_peer_timeout(self, value: str) -> None:
        """Seconds after which a silent peer (board lost power, cable pulled) is
        dropped, via TCP keepalive [default: 60]."""
        try:
            seconds = float(value)
        except ValueError:
            raise usage.UsageError(f"--dead-peer-timeout wants seconds, got {value!r}") from None
        if seconds < 4:
            raise usage.UsageError("--dead-peer-timeout must be at least 4 seconds")
        self["keepalive"] = sockopts.Keepalive.for_timeout(seconds)

    @property
    def daemon_name(self) -> str:
        """The plugin name (``tvm-tracker`` ...) for one-line start-up errors."""
        parent = getattr(self, "parent", None)
        return getattr(parent, "subCommand", None) or "tvmrpc"

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.setdefault("allow", [])
        self.setdefault("keepalive", sockopts.DEFAULT_KEEPALIVE)
        self["listens"] = []
        self.setdefault("listen", None)
        super().parseOptions(options)
        if self["max-connections-per-peer"] < 0:
            raise usage.UsageError("--max-connections-per-peer must be 0 (unlimited) or more")
        if self["port"] is not None and self["port-end"] is not None:
            port_range(self["port"], self["port-end"], 0, 0)
        for listen in self["listens"]:
            check_endpoint(self.daemon_name, "--listen", listen)
        parent = getattr(self, "parent", None)
        if parent is not None:
            logfile.configure(parent, silent=self["silent"])


def bind_port_range(
    reactor: Any, factory: Any, host: str, port: int, port_end: int
) -> IListeningPort:
    """Listen on the first free port in ``[port, port_end)``; raise if none is free."""
    last: Exception | None = None
    for candidate in range(port, max(port_end, port + 1)):
        try:
            return reactor.listenTCP(candidate, factory, interface=host, backlog=128)
        except error.CannotListenError as exc:
            last = exc
    tried = f"port {port}" if port_end <= port + 1 else f"ports {port}-{port_end - 1}"
    reason = getattr(last, "socketError", None) or last
    raise error.CannotListenError(host, port, f"{tried} on {host}: {reason}")


def describe_address(address: Any) -> str:
    """``host:port`` for IP addresses, ``unix:path`` for UNIX sockets."""
    port = getattr(address, "port", None)
    if port is not None:
        return f"{address.host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


class _Refused(Protocol):
    """A connection over the per-peer cap: closed as soon as it is made."""

    #: The accepted connection (ITCPTransport, or TLS around it).
    transport: Any

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IProtocolFactory, ILoggingContext)
class PeerCap:
    """Wraps a server factory: peers only from ``allow`` (if given), and at most
    ``limit`` open connections per peer host (0: no cap).

    Only ``buildProtocol`` and the protocol's ``connectionLost`` are touched;
    the protocol returned is the wrapped factory's own object.
    """

    def __init__(
        self,
        factory: Any,
        limit: int,
        name: str,
        clock: Any,
        allow: Sequence[Network] = (),
    ) -> None:
        self.factory = factory
        self.limit = limit
        self.name = name
        self.clock = clock
        self.allow = tuple(allow)
        self.open: dict[str, int] = {}
        self._report = RateLimit(60.0)
        self._report_allow = RateLimit(60.0)

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def logPrefix(self) -> str:
        inner = getattr(self.factory, "logPrefix", None)
        return inner() if inner is not None else type(self.factory).__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        if host is None:  # UNIX sockets: one host, the local one
            return self.factory.buildProtocol(addr)
        if self.allow and not address_in(host, self.allow):
            self._not_allowed(host)
            return _Refused()
        if self.limit <= 0:
            return self.factory.buildProtocol(addr)
        count = self.open.get(host, 0)
        if count >= self.limit:
            self._refused(host)
            # Not ``None``: wrapping factories (TLS) cannot wrap ``None``; this one
            # aborts in connectionMade, before any byte is read.
            return _Refused()
        proto = self.factory.buildProtocol(addr)
        if proto is None:
            return None
        self.open[host] = count + 1
        lost = proto.connectionLost

        def connection_lost(*args: Any, **kwargs: Any) -> Any:
            try:
                return lost(*args, **kwargs)
            finally:
                self._release(host)

        proto.connectionLost = connection_lost
        return proto

    def _release(self, host: str) -> None:
        left = self.open.get(host, 1) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)

    def _not_allowed(self, host: str) -> None:
        REFUSED.add("allow")
        held = self._report_allow.event(self.clock.seconds())
        if held is None:
            return
        more = f"; {held} more refused since the last report" if held else ""
        log.warn(
            "{name} refused a connection from {host}: not in an --allow network ({networks}){more}",
            name=self.name,
            host=host,
            networks=", ".join(str(n) for n in self.allow),
            more=more,
        )

    def _refused(self, host: str) -> None:
        REFUSED.add("per-peer cap")
        held = self._report.event(self.clock.seconds())
        if held is None:
            return
        more = f"; {held} more refused since the last report" if held else ""
        log.warn(
            "{name} refused a connection from {host}: it already has {limit} open "
            "(--max-connections-per-peer){more}",
            name=self.name,
            host=host,
            limit=self.limit,
            more=more,
        )


class ListeningService(service.Service):
    """Listens on start, stops listening on stop, and logs the bound address.

    ``port`` is the bound ``IListeningPort`` while running; ``bound`` fires
    with it once listening, so other services can learn the real port.
    """

    def __init__(
        self,
        reactor: Any,
        factory: Any,
        name: str,
        *,
        listen: str | Sequence[str] | None = None,
        host: str = "0.0.0.0",
        port: int = 9190,
        port_end: int | None = None,
        max_per_peer: int = 0,
        allow: Sequence[Network] = (),
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        self.reactor = reactor
        self.keepalive = keepalive
        self.factory = factory
        self.setName(name)
        #: Every ``--listen`` endpoint; ``listen`` is the first (None: host/port).
        self.listens = [listen] if isinstance(listen, str) else list(listen or ())
        self.listen = self.listens[0] if self.listens else None
        #: Ports bound for the second and later ``--listen`` endpoints.
        self.more_ports: list[IListeningPort] = []
        self.host = host
        self.first_port = port
        self.port_end = port_end if port_end is not None else port + 1
        self.max_per_peer = max_per_peer
        self.allow = tuple(allow)
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()

    def _listening_factory(self) -> Any:
        if self.max_per_peer > 0 or self.allow:
            return PeerCap(
                self.factory, self.max_per_peer, str(self.name), self.reactor, allow=self.allow
            )
        return self.factory

    def startService(self) -> None:
        service.Service.startService(self)
        factory = self._listening_factory()
        if self.listen:
            try:
                endpoint = endpoint_for(self.reactor, self.listen, self.keepalive)
            except Exception as exc:  # noqa: BLE001 - checked at parse time; belt and braces
                self._failed(Failure(exc))
                return
            d = endpoint.listen(factory)
            d.addCallback(self._listening)
            d.addErrback(self._failed)
            for more in self.listens[1:]:
                self._listen_more(more, factory)
            return
        try:
            port = bind_port_range(self.reactor, factory, self.host, self.first_port, self.port_end)
        except error.CannotListenError as exc:
            log.error(
                "{name} cannot listen: {reason}; stop what holds it or choose another "
                "--port/--port-end",
                name=self.name,
                reason=exc.socketError,
            )
            self._give_up(Failure(exc))
            return
        self._listening(port)

    def _listen_more(self, description: str, factory: Any) -> None:
        try:
            endpoint = endpoint_for(self.reactor, description, self.keepalive)
        except Exception as exc:  # noqa: BLE001 - checked at parse time; belt and braces
            self._failed(Failure(exc), description)
            return

        def bound(port: IListeningPort) -> None:
            if not self.running:
                port.stopListening()
                return
            self.more_ports.append(port)
            log.info(
                "{name} listening on {address}",
                name=self.name,
                address=describe_address(port.getHost()),
            )

        d = endpoint.listen(factory)
        d.addCallbacks(bound, lambda f: self._failed(f, description))

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        bound = getattr(address, "port", None)
        if not self.listen and bound is not None and bound != self.first_port:
            log.warn(
                "{name}: port {first} is in use; took port {port} instead "
                "(peers configured for {first} will not find us; "
                "--port alone never moves to another port)",
                name=self.name,
                first=self.first_port,
                port=bound,
            )
        log.info("{name} listening on {address}", name=self.name, address=describe_address(address))
        if not self.bound.called:
            self.bound.callback(port)
        return port

    def _failed(self, failure: Failure, listen: str | None = None) -> None:
        log.error(
            "{name} cannot listen on {listen}: {reason}",
            name=self.name,
            listen=listen or self.listen,
            reason=failure.getErrorMessage(),
        )
        self._give_up(failure)

    def _give_up(self, failure: Failure) -> None:
        if not self.bound.called:
            self.bound.errback(failure)
            self.bound.addErrback(lambda _: None)
        stop_with_exit_code(self.reactor, EXIT_CANNOT_LISTEN)

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        ports, self.more_ports = self.more_ports, []
        if self.port is not None:
            ports.insert(0, self.port)
            self.port = None
        if not ports:
            return None
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports]
        ).addCallback(lambda _: None)


def listening_service(
    reactor: Any,
    factory: Any,
    name: str,
    options: Any,
    default_port: int,
    default_port_end: int = 9199,
) -> ListeningService:
    """Build a :class:`ListeningService` from :class:`ListenOptions` values (stock defaults)."""
    port, port_end = port_range(
        options["port"], options["port-end"], default_port, default_port_end
    )
    return ListeningService(
        reactor,
        factory,
        name,
        listen=options.get("listens") or options["listen"],
        host=options["host"],
        port=port,
        port_end=port_end,
        max_per_peer=options.get("max-connections-per-peer", 0),
        allow=options.get("allow") or (),
        keepalive=options.get("keepalive", sockopts.DEFAULT_KEEPALIVE),
    )
