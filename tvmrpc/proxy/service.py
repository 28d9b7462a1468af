"""``twistd tvm-proxy``: options and the service tree.

Invariants:
- :func:`makeService` builds the whole tree around the reactor it is given
  and imports the global reactor only when given none (``twistd`` plugins).
- Splice is used only where the platform has splice(2), the reactor is an
  ``IReactorFDSet`` and ``--no-splice`` is not given.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python import usage

from ..boardflags import BoardAdmissionOptions, check_board_flags
from ..listening import (
    ListeningService,
    ListenOptions,
    StartupError,
    check_endpoint,
    listening_service,
)
from ..outgoing import parse_target
from ..status.options import StatusOptions
from ..systemd.notify import ready_once_listening
from .limits import (
    DEFAULT_EARLY_BYTES,
    DEFAULT_EARLY_TOTAL,
    DEFAULT_SERVER_KEYS,
    MAX_SERVER_KEYS,
    DeviceKeys,
    EarlyBudget,
)
from .protocol import ProxyFactory
from .splice import splice_supported
from .switchboard import Switchboard

log = Logger()

DEFAULT_PORT = 9090
DEFAULT_PORT_END = 9199


class Options(ListenOptions, StatusOptions, BoardAdmissionOptions):
    """Flags of ``twistd tvm-proxy`` (stock's, plus --listen and timeouts)."""

    synopsis = "[--host H] [--port P] [--port-end E] | [--listen ENDPOINT] [--tracker H:P]"
    longdesc = (
        "Apache TVM RPC proxy. Stock servers (--through-proxy, or the WebSocket "
        "server at --web-port /ws) and stock clients connect to it and are paired "
        "by key. With --tracker, servers behind it are registered at a tracker."
    )
    optFlags = [
        ["verbose", "v", "Log every connection that waits and every pairing."],
        [
            "no-splice",
            None,
            "Forward TCP legs in userspace (transport writes with flow control) "
            "instead of splice(2) through kernel pipes.",
        ],
    ]
    optParameters: Any = [  # the bases infer different list types; twistd reads lists
        ["web-port", None, None, "HTTP/WebSocket port (path /ws); off if unset.", int],
        ["web-listen", None, None, "Twisted endpoint string for the WebSocket server."],
        [
            "tracker",
            None,
            None,
            "Register waiting servers at this tracker: HOST:PORT, or a Twisted client "
            "endpoint such as tls:host=H:port=P:trustRoots=CADIR (docs/security.md).",
        ],
        ["custom-addr", None, None, "Address the tracker hands clients (default: our IP)."],
        ["timeout-client", None, 600.0, "Seconds a client waits for a server.", float],
        ["timeout-server", None, 600.0, "Seconds a server waits (not in tracker mode).", float],
        ["handshake-timeout", None, 5.0, "Seconds allowed to send the handshake.", float],
        ["tracker-period", None, 2.0, "Seconds between tracker pending-key checks.", float],
        ["alloc-timeout", None, 5.0, "Seconds a handed-out key may stay unused.", float],
        ["index-page", None, None, "HTML page served at / on the web port."],
        ["example-rpc", None, None, "Accepted for stock compatibility and ignored (warn line)."],
        [
            "max-early-bytes",
            None,
            DEFAULT_EARLY_BYTES,
            "Bytes one connection may send after its handshake, before it is paired "
            "(stock peers send none); more closes it.",
            int,
        ],
        [
            "max-early-total",
            None,
            DEFAULT_EARLY_TOTAL,
            "Bytes all waiting connections together may send before pairing; the "
            "connection that would exceed it is closed.",
            int,
        ],
        [
            "max-server-keys",
            None,
            DEFAULT_SERVER_KEYS,
            f"Distinct device keys of servers at the proxy in tracker mode (advertised "
            f"in UPDATE_INFO; at most {MAX_SERVER_KEYS}); a server with a new key "
            f"beyond it is refused.",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["resource-files"] = []

    def opt_resource_files(self, value: str) -> None:
        """A static file for the web port, [PREFIX=]PATH (repeatable)."""
        prefix, sep, path = value.partition("=")
        if not sep:
            prefix, path = "/", value
        self["resource-files"].append((prefix, path))

    def postOptions(self) -> None:
        check_board_flags(self)
        if self["tracker"]:
            self["tracker"] = parse_target(self["tracker"])
        if self["handshake-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout must be positive")
        for flag in ("max-early-bytes", "max-early-total"):
            if self[flag] < 0:
                raise usage.UsageError(f"--{flag} must be 0 or more bytes")
        if not 1 <= self["max-server-keys"] <= MAX_SERVER_KEYS:
            raise usage.UsageError(
                f"--max-server-keys must be 1..{MAX_SERVER_KEYS} (so that UPDATE_INFO "
                "stays under the tracker's 1 MiB frame limit)"
            )
        if self["web-port"] is not None or self["web-listen"]:
            _check_websocket_extra()
        if self["web-listen"]:
            check_endpoint("tvm-proxy", "--web-listen", self["web-listen"])
        if self["tracker"] and (self["listen"] or "").startswith("unix:"):
            raise StartupError(
                "tvm-proxy",
                "--tracker needs a TCP port to advertise; a --listen unix: socket cannot be "
                "handed to clients",
            )


def _check_websocket_extra() -> None:
    """The web port needs autobahn: say so in one line (exit 1) instead of a traceback."""
    try:
        import autobahn.twisted.websocket  # noqa: F401
    except ImportError:
        raise StartupError(
            "tvm-proxy", "--web-port needs the websocket extra: pip install 'tvmrpc[websocket]'"
        ) from None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """Build the proxy service from parsed options, driven by ``reactor`` (default: the global one).

    The reactor must provide ``IReactorTime``, ``IReactorTCP`` and, for splice,
    ``IReactorFDSet``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if options["example-rpc"]:  # stock's type=bool: any non-empty value is true
        log.warn(
            "--example-rpc is accepted for stock compatibility and ignored: "
            "serve your page with --index-page and --resource-files"
        )
    tracker = options["tracker"]
    switchboard = Switchboard(
        reactor,
        timeout_client=options["timeout-client"],
        timeout_server=options["timeout-server"],
        tracker_mode=bool(tracker),
        verbose=options["verbose"],
        early=EarlyBudget(options["max-early-bytes"], options["max-early-total"]),
        device_keys=DeviceKeys(options["max-server-keys"]),
    )
    switchboard.board_secret = options["board-secret"]
    switchboard.allow_board_from = tuple(options["allow-board-from"])
    switchboard.board_auth = options["board-auth"]
    splice_reactor = (
        reactor
        if not options["no-splice"] and splice_supported() and IReactorFDSet.providedBy(reactor)
        else None
    )
    from ..status.proxy import ProxyStatus, status_service

    status = ProxyStatus(reactor, switchboard)
    switchboard.observer = status
    factory = ProxyFactory(
        switchboard, options["handshake-timeout"], splice_reactor, options["keepalive"]
    )
    top = service.MultiService()
    if options["status"]:
        status_service(reactor, options["status"], status).setServiceParent(top)
    listener = listening_service(
        reactor, factory, "tvm-proxy", options, DEFAULT_PORT, DEFAULT_PORT_END
    )
    listener.setServiceParent(top)
    ready_once_listening(reactor, listener, top)  # systemd: READY=1
    if options["web-port"] is not None or options["web-listen"]:
        from .websocket import web_factory

        site = web_factory(switchboard, options)
        web = ListeningService(
            reactor,
            site,
            "tvm-proxy web",
            listen=options["web-listen"],
            host=options["host"],
            port=options["web-port"] or 0,
            max_per_peer=options["max-connections-per-peer"],
            allow=options["allow"],
        )
        web.bound.addCallback(lambda port: site.set_port(getattr(port.getHost(), "port", 0)))
        web.setServiceParent(top)
    if tracker:
        from .registrar import Registrar

        registrar = Registrar(
            reactor,
            switchboard,
            tracker,
            listener.bound,
            custom_addr=options["custom-addr"],
            period=options["tracker-period"],
            grace=options["alloc-timeout"],
            board_secret=options["board-secret"],
            keepalive=options["keepalive"],
        )
        registrar.setServiceParent(top)
    return top
