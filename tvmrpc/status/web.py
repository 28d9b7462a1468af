"""``--status ENDPOINT``: serve ``/metrics``, ``/api/v1/status`` and (tracker) ``/`` over HTTP.

Invariants:
- Each daemon gets its own ``prometheus_client.CollectorRegistry`` holding
  one custom collector; the library's global registry is never touched.
- Requests are not access-logged (the page polls every two seconds).
- The bound address is logged as ``<name> status at http://HOST:PORT/``; a
  daemon that cannot bind its status endpoint logs why and exits 1, like one
  that cannot bind its main port.
- Nothing is served from outside the host: the page is one self-contained
  HTML document.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from ..exiting import stop_with_exit_code
from ..listening import endpoint_for

log = Logger()

#: Exit status of a daemon whose status endpoint cannot be bound.
EXIT_CANNOT_LISTEN = 1


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, content_type: bytes, body: Callable[[], bytes]) -> None:
        super().__init__()
        self.content_type = content_type
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-store")
        return self.body()


class _Tree(Resource):
    """An inner node: its children, or a one-line 404 for anything else."""

    def getChild(self, path: bytes, request: Any) -> Resource:
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found: try /, /metrics or /api/v1/status\n"


class QuietSite(Site):
    """A Site that writes no access log line per request."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def status_site(
    source: Any, page: bytes | None = None, v1: dict[bytes, Resource] | None = None
) -> QuietSite:
    """A Site for ``source`` (it has ``snapshot()`` and ``collect()``); ``v1`` adds
    resources under ``/api/v1/`` (the tracker's admin API)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(source)
    from .refusals import REFUSED

    registry.register(REFUSED)

    def metrics() -> bytes:
        return generate_latest(registry)

    def status() -> bytes:
        return json.dumps(source.snapshot()).encode()

    root = _Tree()
    if page is not None:
        root.putChild(b"", _Leaf(b"text/html; charset=utf-8", lambda: page))
    else:
        root.putChild(
            b"", _Leaf(b"text/plain; charset=utf-8", lambda: b"/metrics\n/api/v1/status\n")
        )
    root.putChild(b"metrics", _Leaf(CONTENT_TYPE_LATEST.encode(), metrics))
    api, api_v1 = _Tree(), _Tree()
    root.putChild(b"api", api)
    api.putChild(b"v1", api_v1)
    api_v1.putChild(b"status", _Leaf(b"application/json", status))
    for name, child in (v1 or {}).items():
        api_v1.putChild(name, child)
    site = QuietSite(root)
    site.registry = registry  # type: ignore[attr-defined]
    return site


class StatusService(service.Service):
    """Listens on the ``--status`` endpoint; optionally calls ``tick`` every ``period``."""

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        site: Site,
        name: str,
        tick: Callable[[], None] | None = None,
        period: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.site = site
        self.setName(f"{name} status")
        self.port: IListeningPort | None = None
        self._loop: LoopingCall | None = None
        if tick is not None:
            self._loop = LoopingCall(tick)
            self._loop.clock = reactor
            self.period = period

    def startService(self) -> None:
        service.Service.startService(self)
        try:
            endpoint = endpoint_for(self.reactor, self.endpoint)
        except (ValueError, TypeError, KeyError) as exc:
            self._fail(f"bad endpoint {self.endpoint!r}: {exc}")
            return
        d = endpoint.listen(self.site)
        d.addCallbacks(self._listening, lambda f: self._fail(f.getErrorMessage()))
        if self._loop is not None:
            self._loop.start(self.period, now=True)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        if isinstance(address, IPv4Address | IPv6Address):
            host, number = address.host, address.port
            log.info("{name} at http://{host}:{port}/", name=self.name, host=host, port=number)
        else:  # a UNIX socket (unix:PATH endpoint)
            path = getattr(address, "name", address)
            path = path.decode(errors="replace") if isinstance(path, bytes) else path
            log.info("{name} at unix:{path}", name=self.name, path=path)

    def _fail(self, why: str) -> None:
        log.error(
            "{name}: cannot serve on --status {endpoint}: {why}; "
            "give a free endpoint such as tcp:9180:interface=127.0.0.1",
            name=self.name,
            endpoint=self.endpoint,
            why=why,
        )
        stop_with_exit_code(self.reactor, EXIT_CANNOT_LISTEN)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
