"""Listening sockets for the daemons: a port range as stock does it, or an endpoint.

``--host H --port P --port-end E`` binds the first free port in ``[P, E)``
(stock behaviour); ``--listen ENDPOINT`` takes any Twisted server endpoint
string (``tcp:9190:interface=127.0.0.1``, ``systemd:domain=INET:index=0``,
``ssl:...``). Either way the bound address is logged as
``<name> listening on <host>:<port>``, which tests and supervisors watch for.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from . import sockopts
from .exiting import stop_with_exit_code

#: Exit status of a daemon that could not open its listening port.
EXIT_CANNOT_LISTEN = 1

log = Logger()


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) to a tuple; raise UsageError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise usage.UsageError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class ListenOptions(usage.Options):
    """The listening flags every daemon shares (mixed into each Options)."""

    optParameters = [
        ["host", None, "0.0.0.0", "Address to bind to."],
        ["port", None, None, "First port to try.", int],
        ["port-end", None, None, "End (exclusive) of the port range to try.", int],
        ["listen", None, None, "Twisted endpoint string; overrides host/port."],
    ]

    def opt_dead_peer_timeout(self, value: str) -> None:
        """Seconds after which a silent peer (board lost power, cable pulled) is
        dropped, via TCP keepalive [default: 60]."""
        try:
            seconds = float(value)
        except ValueError:
            raise usage.UsageError(f"--dead-peer-timeout wants seconds, got {value!r}") from None
        if seconds < 4:
            raise usage.UsageError("--dead-peer-timeout must be at least 4 seconds")
        sockopts.configure_dead_peer_timeout(seconds)


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
    raise error.CannotListenError(host, port, f"no free port in [{port}, {port_end}): {last}")


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
        listen: str | None = None,
        host: str = "0.0.0.0",
        port: int = 9190,
        port_end: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.factory = factory
        self.setName(name)
        self.listen = listen
        self.host = host
        self.first_port = port
        self.port_end = port_end if port_end is not None else port + 1
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        service.Service.startService(self)
        if self.listen:
            d = serverFromString(self.reactor, self.listen).listen(self.factory)
            d.addCallback(self._listening)
            d.addErrback(self._failed)
        else:
            self._listening(
                bind_port_range(
                    self.reactor, self.factory, self.host, self.first_port, self.port_end
                )
            )

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        host = getattr(address, "host", None) or str(address)
        log.info("{name} listening on {host}:{port}", name=self.name, host=host, port=address.port)
        if not self.bound.called:
            self.bound.callback(port)
        return port

    def _failed(self, failure: Any) -> None:
        log.failure("{name} cannot listen on {listen}", failure, name=self.name, listen=self.listen)
        if not self.bound.called:
            self.bound.errback(failure)
        stop_with_exit_code(self.reactor, EXIT_CANNOT_LISTEN)

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


def listening_service(
    reactor: Any,
    factory: Any,
    name: str,
    options: Any,
    default_port: int,
    default_port_end: int = 9199,
) -> ListeningService:
    """Build a :class:`ListeningService` from :class:`ListenOptions` values (stock defaults)."""
    port = options["port"] if options["port"] is not None else default_port
    port_end = options["port-end"] if options["port-end"] is not None else default_port_end
    return ListeningService(
        reactor,
        factory,
        name,
        listen=options["listen"],
        host=options["host"],
        port=port,
        port_end=port_end,
    )
