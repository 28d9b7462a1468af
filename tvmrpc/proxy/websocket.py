"""WebSocket legs (``--web-port``, path ``/ws``) and the optional static pages.

Servers in a browser, wasm or Node connect here; binary messages carry the
same byte stream as a TCP leg (the handshake may be split over messages, and
each forwarded chunk becomes one message). Imported only when a web port is
configured, so autobahn is needed only then.

Invariants:
- A :class:`WebSocketLeg` is the :class:`~tvmrpc.proxy.leg.ILegTransport`
  of exactly one :class:`~tvmrpc.proxy.leg.Leg`; it is never spliced.
- Static pages are read once, at start, and served from memory.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from .. import sockopts
from .leg import ILegTransport, Leg, address_text
from .switchboard import Switchboard


@implementer(ILegTransport)
class WebSocketLeg(WebSocketServerProtocol):
    """One WebSocket connection at ``/ws``: its events go to its :class:`Leg`."""

    peer_name = "?"
    #: No address check for WebSocket legs: a server here always proves a board secret.
    peer_host = None

    def __init__(self, factory: _LegFactory) -> None:
        WebSocketServerProtocol.__init__(self)
        self.factory = factory
        self.leg = Leg(factory.switchboard, self, factory.handshake_timeout)

    def onOpen(self) -> None:
        self.peer_name = f"ws {address_text(self.transport)}"
        sockopts.set_nodelay(self.transport)
        self.leg.connected()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        sockopts.quickack(self.transport)
        self.leg.received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # autobahn also calls this for a connection whose opening handshake failed
        if not self.leg.closed:
            self.leg.lost()

    # -- ILegTransport ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def close(self) -> None:
        self.sendClose()

    def abort(self) -> None:
        self.dropConnection(abort=True)

    def producer(self) -> Any:
        return self.transport

    def on_waiting(self) -> None:
        sockopts.set_keepalive(self.transport, self.factory.keepalive)

    def splice_socket(self) -> None:
        return None  # its bytes on the wire are frames, not the stream


class _LegFactory(WebSocketServerFactory):
    """Builds :class:`WebSocketLeg` legs sharing one switchboard."""

    def __init__(
        self,
        switchboard: Switchboard,
        handshake_timeout: float,
        keepalive: sockopts.Keepalive = sockopts.DEFAULT_KEEPALIVE,
    ) -> None:
        super().__init__()
        self.keepalive = keepalive
        self.switchboard = switchboard
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr: Any) -> WebSocketLeg:
        return WebSocketLeg(self)


class StaticPage(Resource):
    """One file served from memory (stock serves its pages the same way)."""

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        with open(path, "rb") as f:
            self.body = f.read()
        self.is_html = path.endswith("html")
        #: The bound web port: stock's default WebSocket URL in HTML pages points to it.
        self.web_port: int | None = None
        self.content_type = (mimetypes.guess_type(path)[0] or "application/octet-stream").encode()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        if self.is_html and self.web_port:
            url = f"ws://localhost:{self.web_port}/ws".encode()
            return self.body.replace(b"ws://localhost:9190/ws", url)
        return self.body


def _put_path(root: Resource, path: str, leaf: Resource) -> None:
    parts = [p.encode() for p in path.strip("/").split("/")]
    node = root
    for part in parts[:-1]:
        child = node.children.get(part)
        if child is None:
            child = Resource()
            node.putChild(part, child)
        node = child
    node.putChild(parts[-1], leaf)


class WebSite(Site):
    """The web port's site; ``set_port`` tells its HTML pages where ``/ws`` is."""

    pages: list[StaticPage]

    def set_port(self, port: int) -> None:
        for page in self.pages:
            page.web_port = port


def web_factory(switchboard: Switchboard, options: Any) -> WebSite:
    """The web port's site: ``/ws`` for legs, plus ``--index-page``/``--resource-files``."""
    legs = _LegFactory(switchboard, options["handshake-timeout"], options["keepalive"])
    legs.setProtocolOptions(autoPingInterval=30, autoPingTimeout=60)
    root = Resource()
    root.putChild(b"ws", WebSocketResource(legs))
    pages = []
    if options["index-page"]:
        pages.append(StaticPage(options["index-page"]))
        root.putChild(b"", pages[-1])
    for prefix, path in options["resource-files"]:
        pages.append(StaticPage(path))
        _put_path(root, f"{prefix.rstrip('/')}/{os.path.basename(path)}", pages[-1])
    site = WebSite(root)
    site.pages = pages
    return site
