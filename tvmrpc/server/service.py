"""``twistd tvm-server``: options and the service tree.

Start order: worker zygote, then the listening port (or the proxy
connector), then tracker registration. Stop order (SIGTERM): stop
registering and accepting, let a running session finish within ``--grace``
seconds (then abort it), then stop the zygote, so no worker is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from ..exiting import stop_with_exit_code
from ..listening import ListenOptions, listening_service, parse_hostport
from ..status.options import StatusOptions
from ..systemd.notify import NotifyService, listening_status
from .adapter import WorkerConfig, ZygoteRuntime
from .board import Board
from .handshake import HandshakeFactory
from .registrar import Registrar
from .through_proxy import ProxyConnector

log = Logger(namespace="tvmrpc.server")

DEFAULT_PORT = 9090
DEFAULT_PORT_END = 9199
EXIT_DUPLICATE_KEY = 2


class Options(ListenOptions, StatusOptions):
    """Flags of ``twistd tvm-server`` (stock's, plus --listen, --init and more)."""

    synopsis = (
        "--key KEY [--host H] [--port P] [--tracker H:P] | --through-proxy --host PROXY --port P"
    )
    longdesc = (
        "Apache TVM RPC server. Stock TVM clients use it unchanged. Sessions run "
        "in worker processes forked from a zygote that has only tvm_ffi and the "
        "TVM runtime loaded (no numpy)."
    )
    optFlags = [
        ["through-proxy", None, "Connect out to the proxy at --host/--port instead of listening."],
    ]
    optParameters = [
        ["key", None, "", "The device key clients request."],
        ["tracker", None, None, "Register at the tracker HOST:PORT."],
        ["custom-addr", None, None, "Address the tracker hands to clients (default: ours)."],
        ["load-library", None, None, "Colon-separated shared libraries loaded in each worker."],
        ["runtime-library", None, None, "libtvm_runtime.so (default: $TVM_LIBRARY_PATH, tvm)."],
        ["handshake-timeout", None, 5.0, "Seconds a client may take to send its handshake.", float],
        ["grace", None, 5.0, "Seconds a running session may finish after SIGTERM.", float],
        ["workdir", None, None, "Parent directory of session directories (default: $TMPDIR)."],
    ]

    def opt_init(self, module: str) -> None:
        """Module imported in each worker before its session (repeatable)."""
        self.setdefault("init-modules", []).append(module)  # type: ignore[attr-defined]

    def postOptions(self) -> None:
        self.setdefault("init-modules", [])  # type: ignore[attr-defined]
        if self["handshake-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout must be positive")
        if self["tracker"]:
            self["tracker"] = parse_hostport(self["tracker"])
        libraries = []
        for name in filter(None, (self["load-library"] or "").split(":")):
            path = Path(name).resolve()
            if not path.is_file():
                raise usage.UsageError(f"--load-library: no such file {name}")
            libraries.append(str(path))
        self["load-libraries"] = libraries
        if self["through-proxy"]:
            if self["port"] is None:
                raise usage.UsageError("--through-proxy needs --port (the proxy's port)")
            if self["listen"]:
                raise usage.UsageError("--through-proxy and --listen exclude each other")


class ServerService(service.MultiService):
    """The server's services; stops them in order (see the module docstring)."""

    def __init__(self, board: Board, runtime: ZygoteRuntime, grace: float) -> None:
        super().__init__()
        self.board = board
        self.runtime = runtime
        self.grace = grace

    def startService(self) -> None:
        self.runtime.start()
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        yield self.board.close(self.grace)
        yield self.runtime.stop()
        log.info("tvm-server stopped")


def makeService(options: Options) -> service.IService:
    """Build the server from parsed options."""
    from twisted.internet import reactor

    notify = NotifyService.from_environment(reactor)  # first: workers must not inherit it
    config = WorkerConfig(
        runtime_library=options["runtime-library"],
        load_libraries=tuple(options["load-libraries"]),
        init_modules=tuple(options["init-modules"]),
        env=_worker_env(),
    )
    runtime = ZygoteRuntime(reactor, config)
    board = Board(reactor, runtime, workdir=options["workdir"])
    top = ServerService(board, runtime, options["grace"])
    key = options["key"]
    from ..status.server import ServerStatus, status_service

    status = ServerStatus(reactor, key, runtime, board)
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
        runtime.ready().addCallback(lambda _: notify.ready(status))

    if options["through-proxy"]:
        connector = ProxyConnector(reactor, board, key, (options["host"], options["port"]))
        connector.fatal.addCallback(lambda _: stop_with_exit_code(reactor, EXIT_DUPLICATE_KEY))
        connector.waiting_observers.append(
            lambda: ready_when_warm(
                "waiting at proxy {}:{} as server:{}".format(*connector.proxy, key)
            )
        )
        connector.setServiceParent(top)
        return top

    registrar: Registrar | None = None
    if options["tracker"]:
        port_d: defer.Deferred[int] = defer.Deferred()
        registrar = Registrar(
            reactor, board, key, options["tracker"], port_d, custom_addr=options["custom-addr"]
        )
        registrar.extension = status.extension
        matcher = registrar.claim
    else:

        def matcher(matchkey: str) -> bool:
            return matchkey == key

    factory = HandshakeFactory(reactor, board, key, matcher, options["handshake-timeout"])
    listener = listening_service(
        reactor, factory, "tvm-server", options, DEFAULT_PORT, DEFAULT_PORT_END
    )
    listener.setServiceParent(top)
    if registrar is not None:
        listener.bound.addCallback(lambda port: port_d.callback(port.getHost().port))
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
    """The worker's environment: ours, with this checkout importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        paths.append(root)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
