"""``twistd tvm-tracker``: options and the service tree."""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service
from twisted.python import usage

from ..boardflags import BoardAdmissionOptions, check_board_flags
from ..codec import MAX_FRAME_BYTES
from ..listening import ListenOptions, listening_service
from ..status.options import StatusOptions
from ..systemd.notify import ready_once_listening
from .boards import BoardRules
from .protocol import DEFAULT_HANDSHAKE_TIMEOUT, TrackerFactory
from .scheduler import Scheduler

DEFAULT_PORT = 9190
DEFAULT_PORT_END = 9199


class Options(ListenOptions, StatusOptions, BoardAdmissionOptions):
    """Flags of ``twistd tvm-tracker`` (stock's --host/--port/--port-end, and more)."""

    synopsis = "[--host H] [--port P] [--port-end E] | [--listen ENDPOINT]"
    longdesc = (
        "Apache TVM RPC tracker. Stock TVM clients, servers and proxies use it "
        "unchanged. Binds the first free port in [port, port-end) like stock "
        "(--port alone: only that port), or any Twisted endpoint given with "
        "--listen (tcp:, unix:, systemd:, ssl:). SIGHUP reopens the --logfile."
    )
    optFlags = [
        ["verbose", "v", "Log every PUT, REQUEST and assignment."],
        [
            "fair-share",
            None,
            "Among waiting requests of equal priority, serve client hosts round-robin "
            "(default: stock's FIFO).",
        ],
    ]
    # Annotated: mypy would infer each base's list from its own items and
    # find every subclass's list incompatible with it.
    optParameters: list[Any] = [
        ["stop-key", None, None, "Accept STOP requests carrying this key (default: refuse all)."],
        ["max-frame-bytes", None, MAX_FRAME_BYTES, "Largest request frame accepted.", int],
        [
            "admin-token-file",
            None,
            None,
            "Serve the admin API (drain/resume) at /api/v1/admin/ on the --status endpoint "
            "to requests bearing the token in this file (default: no admin API).",
        ],
        [
            "quarantine-after",
            None,
            3,
            "Stop handing out a board after this many consecutive failed sessions.",
            int,
        ],
        [
            "handshake-timeout",
            None,
            DEFAULT_HANDSHAKE_TIMEOUT,
            "Seconds a new connection may take to send the tracker magic.",
            float,
        ],
    ]

    def postOptions(self) -> None:
        check_board_flags(self)
        if self["max-frame-bytes"] < 64:
            raise usage.UsageError("--max-frame-bytes must be at least 64")
        if self["quarantine-after"] < 1:
            raise usage.UsageError("--quarantine-after must be at least 1")
        if self["handshake-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout must be positive")
        self["admin-token"] = None
        if self["admin-token-file"]:
            if not self["status"]:
                raise usage.UsageError(
                    "--admin-token-file needs --status: the admin API is served on the "
                    "status endpoint"
                )
            from .admin import AdminTokenError, read_token

            try:
                self["admin-token"] = read_token(self["admin-token-file"])
            except AdminTokenError as exc:
                raise usage.UsageError(str(exc)) from None


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """Build the tracker service from parsed options.

    ``reactor`` is the reactor every part uses (listening, timers, systemd
    notification, the status site); ``None``, as twistd's plugin passes,
    means the global one.
    """
    if reactor is None:
        from twisted.internet import reactor

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    from ..status.tracker import TrackerStatus

    scheduler = Scheduler(
        fair_share=options["fair-share"],
        rules=BoardRules(quarantine_after=options["quarantine-after"]),
    )
    status = TrackerStatus(reactor, scheduler)
    factory = TrackerFactory(
        clock=reactor,
        stop_key=options["stop-key"],
        on_stop=stop,
        max_frame_bytes=options["max-frame-bytes"],
        verbose=options["verbose"],
        scheduler=scheduler,
        observer=status,
        handshake_timeout=options["handshake-timeout"],
        board_secret=options["board-secret"],
        allow_board_from=options["allow-board-from"],
        keepalive=options["keepalive"],
        board_auth=options["board-auth"],
    )
    status.expected_waits = factory.expected_waits
    # What start-up made (modules, classes, options) lives as long as the
    # process: out of the collector's reach, a full collection at 10,000
    # boards scans 140,000 objects instead of 187,000 (80 ms instead of 100).
    reactor.callWhenRunning(gc.freeze)
    top = service.MultiService()
    listener = listening_service(
        reactor, factory, "tvm-tracker", options, DEFAULT_PORT, DEFAULT_PORT_END
    )
    listener.setServiceParent(top)
    ready_once_listening(reactor, listener, top)  # systemd: READY=1
    if options["status"]:
        from ..status.tracker import status_service

        admin = None
        if options["admin-token"]:
            from .admin import AdminResource

            admin = AdminResource(
                scheduler.rules,
                options["admin-token"],
                lambda: factory.deliver(scheduler.rematch()),
            )
        status_service(reactor, options["status"], status, admin).setServiceParent(top)
    return top
