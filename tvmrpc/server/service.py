"""``twistd tvm-server``: options and the service tree.

Start order: remove stale session directories, start the worker zygote
(:class:`Supervisor`), open the listening port; the tracker registration
(or the proxy connection) follows only once the board is advertised (zygote
warm, health check passed; see :mod:`.lifecycle`). Stop order (SIGTERM):
stop registering and accepting, let a running session finish within
``--grace`` seconds (then abort it), then stop the zygote, so no worker is
left.

Invariants:
- ``ServerService.readiness`` is the hook for "this board can take a client"
  (systemd READY=1, a status endpoint's ready 0/1): ``readiness.ready`` and
  ``readiness.observers`` (``observer(ready, reason)``, once per change). It
  is true while the board is warm and checked (advertised or busy) and, with
  ``--tracker`` or ``--through-proxy``, announced there.
  ``ServerService.lifecycle.observers`` (``observer(old, new, reason)``)
  sees every change of state.
- A board that cannot get ready at start-up exits with status 1 after one
  error line naming cause and fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from ..boardflags import BoardSecretOptions, check_board_flags
from ..exiting import stop_with_exit_code
from ..listening import ListenOptions, listening_service, parse_hostport  # noqa: F401 - re-exported
from ..outgoing import parse_target
from ..pythonpath import with_package_on_path
from ..status.options import StatusOptions
from ..systemd.notify import NotifyService, listening_status
from .adapter import WorkerConfig, ZygoteRuntime
from .board import Board, session_root
from .handshake import HandshakeFactory
from .lifecycle import Lifecycle, Readiness, State
from .registrar import Registrar
from .session_dirs import remove_stale
from .supervisor import Supervisor
from .through_proxy import ProxyConnector

log = Logger()

DEFAULT_PORT = 9090
DEFAULT_PORT_END = 9199
EXIT_NOT_READY = 1


class Options(ListenOptions, StatusOptions, BoardSecretOptions):
    """Flags of ``twistd tvm-server`` (stock's, plus --listen, --init and more)."""

    synopsis = (
        "--key KEY [--host H] [--port P] [--tracker H:P] | --through-proxy --host PROXY --port P"
        " | --proxy PROXY:P|tls:..."
    )
    longdesc = (
        "Apache TVM RPC server. Stock TVM clients use it unchanged. Sessions run "
        "in worker processes forked from a zygote that has only tvm_ffi and the "
        "TVM runtime loaded (no numpy)."
    )
    optFlags = [
        ["through-proxy", None, "Connect out to the proxy at --host/--port instead of listening."],
        [
            "no-fork",
            None,
            "Accepted for stock compatibility; sessions always run in a worker process here "
            "(forked from a warm zygote), which is what keeps a crashing kernel from "
            "taking the server down.",
        ],
    ]
    optParameters: list[Any] = [
        [
            "key",
            None,
            "",
            "The device key clients request (required with --tracker, --through-proxy).",
        ],
        [
            "tracker",
            None,
            None,
            "Register at the tracker HOST:PORT, or a Twisted client endpoint such as "
            "tls:host=H:port=P:trustRoots=CADIR (docs/security.md).",
        ],
        [
            "proxy",
            None,
            None,
            "Connect out to the proxy at HOST:PORT, or a Twisted client endpoint such as "
            "tls:host=H:port=P:trustRoots=CADIR:certificate=C.pem:privateKey=K.pem, instead "
            "of listening (implies --through-proxy; docs/security.md).",
        ],
        ["custom-addr", None, None, "Address the tracker hands to clients (default: ours)."],
        ["load-library", None, None, "Colon-separated shared libraries loaded in each worker."],
        ["runtime-library", None, None, "libtvm_runtime.so (default: $TVM_LIBRARY_PATH, tvm)."],
        ["handshake-timeout", None, 5.0, "Seconds a client may take to send its handshake.", float],
        ["grace", None, 5.0, "Seconds a running session may finish after SIGTERM.", float],
        ["workdir", None, None, "Parent directory of session directories (default: $TMPDIR)."],
        [
            "max-session-seconds",
            None,
            None,
            "Cap sessions that asked for no -timeout at this many seconds (default: no cap).",
            float,
        ],
        [
            "session-memory-limit",
            None,
            None,
            "Address-space limit (RLIMIT_AS) of each session's worker, in bytes "
            "(suffixes K, M, G; default: none).",
        ],
    ]

    def opt_init(self, module: str) -> None:
        """Module imported in each worker before its session (repeatable)."""
        self.setdefault("init-modules", []).append(module)

    def postOptions(self) -> None:
        self.setdefault("init-modules", [])
        check_board_flags(self)
        if self["proxy"]:
            self["through-proxy"] = True
            self["proxy"] = parse_target(self["proxy"], "--proxy")
        if self["handshake-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout must be positive")
        if (self["tracker"] or self["through-proxy"]) and not self["key"]:
            link = "--tracker" if self["tracker"] else "--through-proxy"
            raise usage.UsageError(
                f"{link} needs --key: the key clients request this board by (e.g. --key rasp4b)"
            )
        if self["max-session-seconds"] is not None and self["max-session-seconds"] <= 0:
            raise usage.UsageError("--max-session-seconds must be positive")
        self["session-memory-limit"] = parse_bytes(self["session-memory-limit"])
        if self["tracker"]:
            self["tracker"] = parse_target(self["tracker"])
        libraries = []
        for name in filter(None, (self["load-library"] or "").split(":")):
            path = Path(name).resolve()
            if not path.is_file():
                raise usage.UsageError(f"--load-library: no such file {name}")
            libraries.append(str(path))
        self["load-libraries"] = libraries
        if self["through-proxy"]:
            if self["port"] is None and not self["proxy"]:
                raise usage.UsageError(
                    "--through-proxy needs --port (the proxy's port), or --proxy HOST:PORT"
                )
            if self["listen"]:
                raise usage.UsageError("--through-proxy and --listen exclude each other")


def parse_bytes(value: str | None) -> int:
    """``--session-memory-limit`` value: bytes, or a number with K, M or G (0: none)."""
    if not value:
        return 0
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    try:
        amount = int(float(text) * scale)
    except ValueError:
        raise usage.UsageError(
            f"--session-memory-limit wants bytes (e.g. 2G or 2147483648), got {value!r}"
        ) from None
    if amount < 64 << 20:
        raise usage.UsageError(
            "--session-memory-limit below 64M leaves a worker no room to load the runtime"
        )
    return amount


def _log_readiness(ready: bool, reason: str) -> None:
    if ready:
        log.info("board can take clients ({reason})", reason=reason)
    else:
        log.info("board cannot take clients ({reason})", reason=reason)


class ServerService(service.MultiService):
    """The server's services; stops them in order (see the module docstring)."""

    def __init__(
        self, board: Board, runtime: ZygoteRuntime, lifecycle: Lifecycle, grace: float
    ) -> None:
        super().__init__()
        self.board = board
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.readiness: Readiness | None = None  # set by makeService once links are known
        self.supervisor: Supervisor | None = None  # ``supervisor.health``: checks run, last ok
        self.grace = grace

    async def _stop(self) -> None:
        await super().stopService()
        await self.board.close(self.grace)
        await self.runtime.stop()
        self.board.session_root.close()
        log.info("tvm-server stopped")

    def stopService(self) -> defer.Deferred[None]:
        self.lifecycle.stop()
        return defer.Deferred.fromCoroutine(self._stop())


def makeService(options: Options, reactor: Any = None) -> ServerService:
    """Build the server from parsed options, on ``reactor`` (default: the global one)."""
    if reactor is None:
        from twisted.internet import reactor

    notify = NotifyService.from_environment(reactor)  # first: workers must not inherit it
    config = WorkerConfig(
        runtime_library=options["runtime-library"],
        load_libraries=tuple(options["load-libraries"]),
        init_modules=tuple(options["init-modules"]),
        env=_worker_env(),
        memory_limit=options["session-memory-limit"],
    )
    workdir = options["workdir"] or session_root()
    for stale in remove_stale(workdir):
        log.info("removed stale session directory {path}", path=stale)
    runtime = ZygoteRuntime(reactor, config)
    lifecycle = Lifecycle()
    board = Board(
        reactor,
        runtime,
        workdir=workdir,
        lifecycle=lifecycle,
        max_session_seconds=options["max-session-seconds"],
    )
    top = ServerService(board, runtime, lifecycle, options["grace"])
    top.supervisor = Supervisor(
        reactor,
        runtime,
        lifecycle,
        on_failed=lambda _: stop_with_exit_code(reactor, EXIT_NOT_READY),
    )
    top.supervisor.setServiceParent(top)
    key = options["key"]
    from ..status.server import ServerStatus, status_service

    status = ServerStatus(reactor, key, runtime, board)
    status.ready_source = lambda: top.readiness is not None and top.readiness.ready
    status.health_source = lambda: top.supervisor.health if top.supervisor else {}
    board.observer = status
    if options["status"]:
        status_service(reactor, options["status"], status).setServiceParent(top)
    # systemd: READY=1 once registered (tracker), waiting (proxy) or listening, and warm.
    notify.setServiceParent(top)
    board.session_observers.append(lambda peer: notify.status(f"session running for {peer}"))
    board.idle_observers.append(
        lambda: notify.status(f"idle after {board.sessions_served} sessions")
    )

    def ready_when_warm(status: str) -> None:
        """READY=1 with ``status`` once the board is warm and its health check passed."""
        if lifecycle.serving:
            notify.ready(status)
            return

        def once_advertised(old: State, new: State, reason: str) -> None:
            if new is State.ADVERTISED:
                lifecycle.observers.remove(once_advertised)
                notify.ready(status)

        lifecycle.observers.append(once_advertised)

    if options["through-proxy"]:
        connector = ProxyConnector(
            reactor,
            board,
            key,
            options["proxy"] or (options["host"], options["port"]),
            lifecycle=lifecycle,
            board_secret=options["board-secret"],
            keepalive=options["keepalive"],
        )
        connector.waiting_observers.append(
            lambda: ready_when_warm(
                f"waiting at proxy {connector.proxy[0]}:{connector.proxy[1]} as server:{key}"
            )
        )
        connector.setServiceParent(top)
        top.readiness = Readiness(lifecycle, connector.announcement)
        top.readiness.observers.append(_log_readiness)
        return top

    registrar: Registrar | None = None
    if options["tracker"]:
        port_d: defer.Deferred[int] = defer.Deferred()
        registrar = Registrar(
            reactor,
            board,
            key,
            options["tracker"],
            port_d,
            custom_addr=options["custom-addr"],
            lifecycle=lifecycle,
            board_secret=options["board-secret"],
            keepalive=options["keepalive"],
        )
        registrar.extension = status.extension
        matcher = registrar.claim
    else:

        def matcher(matchkey: str) -> bool:
            return matchkey == key

    top.readiness = Readiness(lifecycle, registrar.announcement if registrar else None)
    top.readiness.observers.append(_log_readiness)
    factory = HandshakeFactory(
        reactor, board, key, matcher, options["handshake-timeout"], options["keepalive"]
    )
    listener = listening_service(
        reactor, factory, "tvm-server", options, DEFAULT_PORT, DEFAULT_PORT_END
    )
    listener.setServiceParent(top)
    if registrar is not None:

        def tell_port(port: IListeningPort) -> None:
            address = port.getHost()
            if isinstance(address, (IPv4Address, IPv6Address)):
                port_d.callback(address.port)
            else:
                problem = f"--tracker needs a TCP listening address, not {address}"
                port_d.errback(ValueError(problem))

        listener.bound.addCallback(tell_port)
        registrar.setServiceParent(top)
        registered = "registered with tracker {}:{} as server:{}".format(*options["tracker"], key)
        registrar.link_observers.append(
            lambda linked: (
                ready_when_warm(registered)
                if linked
                else notify.status("tracker connection lost; reconnecting")
            )
        )
    else:
        listener.bound.addCallback(notify.passing(lambda p: ready_when_warm(listening_status(p))))
    return top


def _worker_env() -> dict[str, str]:
    """The worker's environment: ours, with this package importable (after what the caller set)."""
    return with_package_on_path(os.environ, first=False)
