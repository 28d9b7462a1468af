"""WebSocket legs (``--web-port``, path ``/ws``) and the optional static pages.

Servers in a browser, wasm or Node connect here; binary messages carry the
same byte stream as a TCP leg (the handshake may be split over messages, and
each forwarded chunk becomes one message). Imported only when a web port is
configured, so autobahn is needed only then.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

from .. import sockopts
from .leg import LegMixin
from .switchboard import Switchboard


class WebSocketLeg(LegMixin, WebSocketServerProtocol):
    """One WebSocket connection at ``/ws``: handshake, wait, forward."""

    def __init__(self, switchboard: Switchboard, handshake_timeout: float) -> None:
        WebSocketServerProtocol.__init__(self)
        self._leg_init(switchboard, handshake_timeout)

    def onOpen(self) -> None:
        peer = self.transport.getPeer()
        self.peer_name = f"ws {getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        sockopts.set_nodelay(self.transport)
        self._leg_started()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        sockopts.quickack(self.transport)
        self._leg_data(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self._closed:
            self._leg_lost()

    # -- LegMixin hooks ---------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def _close(self) -> None:
        self.sendClose()

    def _abort(self) -> None:
        self.dropConnection(abort=True)

    def _producer(self) -> Any:
        return self.transport

    def _on_waiting(self) -> None:
        sockopts.set_keepalive(self.transport, self.factory.keepalive)


class _LegFactory(WebSocketServerFactory):
    protocol = WebSocketLeg

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
        proto = WebSocketLeg(self.switchboard, self.handshake_timeout)
        proto.factory = self
        return proto


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
