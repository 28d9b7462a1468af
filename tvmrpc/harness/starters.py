"""Start one daemon, ours or stock, on loopback and return once it is ready.

Used by the tests and the bench (the demo builds its own command lines in
:mod:`tvmrpc.demo.daemons`). Ours listen on a port the kernel picks and say
which; stock ones get a free port and say when they have bound it.

Invariants:
- Each function returns a started :class:`~tvmrpc.harness.process.Process`
  whose ``host`` and ``port`` are set and that has logged its readiness line,
  or raises DaemonError after stopping what it started (nothing is left running).
- Stock daemons are run by this interpreter (``python -m tvm.exec...``), so
  the apache-tvm in this environment is the peer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .commands import DEFAULT_TIMEOUT, module_argv
from .process import CANNOT_LISTEN, Daemon, Process
from .sockets import free_port

LOOPBACK = "127.0.0.1"
LISTEN_LOOPBACK = f"tcp:0:interface={LOOPBACK}"
PROXY_LISTENING = re.compile(r"tvm-proxy listening on (\S+):(\d+)")
WEB_LISTENING = re.compile(r"tvm-proxy web listening on (\S+):(\d+)")


def _ready(proc: Process, wait: Callable[[], object]) -> None:
    """Run ``wait``; if it fails, stop ``proc`` (the caller never gets it) and re-raise."""
    try:
        wait()
    except BaseException:
        proc.stop()
        raise


# -- ours --------------------------------------------------------------------------


def start_tracker(log_dir: Path, *extra: str, name: str = "tracker") -> Daemon:
    """Our tracker on a kernel-chosen loopback port."""
    daemon = Daemon("tvm-tracker", ["--listen", LISTEN_LOOPBACK, *extra], log_dir / f"{name}.log")
    _ready(daemon, daemon.wait_listening)
    return daemon


def start_proxy(
    log_dir: Path, *extra: str, name: str = "proxy", web: bool = False, verbose: bool = True
) -> Daemon:
    """Our proxy on a kernel-chosen loopback port; ``web_port`` set when ``web``.

    Tests run it ``--verbose`` to wait for its "waits as server" lines.
    """
    args = ["--listen", LISTEN_LOOPBACK, "--host", LOOPBACK, *extra]
    if verbose:
        args.append("--verbose")
    if web:
        args += ["--web-port", "0"]
    daemon = Daemon("tvm-proxy", args, log_dir / f"{name}.log")

    def wait() -> None:
        # Not LISTENING: "tvm-proxy web listening on" may come first.
        match = daemon.wait_for(PROXY_LISTENING, failure=CANNOT_LISTEN)
        daemon.host, daemon.port = match.group(1), int(match.group(2))
        if web:
            daemon.web_port = int(daemon.wait_for(WEB_LISTENING, failure=CANNOT_LISTEN).group(2))

    _ready(daemon, wait)
    return daemon


def start_server(
    log_dir: Path,
    key: str,
    *extra: str,
    name: str | None = None,
    env: dict[str, str] | None = None,
    listen: bool = True,
) -> Daemon:
    """Our server (on a kernel-chosen loopback port with ``listen``); returns once its
    board is ready: zygote warm and health check passed."""
    args = ["--key", key, *extra]
    if listen:
        args = ["--listen", LISTEN_LOOPBACK, *args]
    daemon = Daemon("tvm-server", args, log_dir / f"{name or 'server-' + key}.log", env=env)

    def wait() -> None:
        if listen:
            daemon.wait_listening()
        daemon.wait_for(r"worker zygote \d+ warm")
        daemon.wait_for(r"board ready")

    _ready(daemon, wait)
    return daemon


# -- stock -----------------------------------------------------------------------------


def stock_argv(module: str, *args: str) -> list[str]:
    """``python -m tvm.exec.MODULE ARGS`` run by this interpreter."""
    return module_argv(f"tvm.exec.{module}", *args)


def _stock_on_free_port(module: str, log_path: Path, ready: str, *args: str) -> Process:
    """A stock daemon bound to a free loopback port (``ready`` formatted with it)."""
    port = free_port()
    argv = stock_argv(
        module, "--host", LOOPBACK, "--port", str(port), "--port-end", str(port + 1), *args
    )
    proc = Process(argv, log_path, name=f"stock {module}")
    _ready(proc, lambda: proc.wait_for(ready.format(port=port), DEFAULT_TIMEOUT))
    proc.host, proc.port = LOOPBACK, port
    return proc


def start_stock_tracker(log_dir: Path, name: str = "stock-tracker") -> Process:
    """The stock tracker (``tvm.exec.rpc_tracker``) on a free port."""
    return _stock_on_free_port(
        "rpc_tracker", log_dir / f"{name}.log", r"bind to 127\.0\.0\.1:{port}\b"
    )


def start_stock_server(
    log_dir: Path,
    key: str,
    tracker: tuple[str, int] | None = None,
    name: str | None = None,
    extra: Sequence[str] = (),
) -> Process:
    """A stock ``tvm.exec.rpc_server`` on a free port, optionally tracker-registered."""
    args = ["--key", key, *extra]
    if tracker is not None:
        args += ["--tracker", f"{tracker[0]}:{tracker[1]}"]
    return _stock_on_free_port(
        "rpc_server",
        log_dir / f"{name or 'stock-server-' + key}.log",
        r"bind to 127\.0\.0\.1:{port}\b",
        *args,
    )


def start_stock_proxy(log_dir: Path, name: str = "stock-proxy") -> Process:
    """The stock proxy (``tvm.exec.rpc_proxy``) on free ports (its web port cannot be
    switched off)."""
    return _stock_on_free_port(
        "rpc_proxy",
        log_dir / f"{name}.log",
        r"client port bind to 127\.0\.0\.1:{port}\b",
        "--web-port",
        str(free_port()),
    )


def start_proxied_server(
    log_dir: Path,
    proxy: Process,
    key: str,
    name: str | None = None,
    extra: Sequence[str] = (),
    wait: bool = True,
) -> Process:
    """A stock ``tvm.exec.rpc_server --through-proxy`` at ``proxy``; with ``wait``,
    returns once the (our, verbose) proxy holds it."""
    mark = proxy.mark()
    host, port = proxy.address
    argv = stock_argv(
        "rpc_server", "--through-proxy", "--host", host, "--port", str(port), "--key", key, *extra
    )
    proc = Process(argv, log_dir / f"{name or 'proxied-server-' + key}.log", name="stock server")
    if wait:
        _ready(proc, lambda: proxy.wait_for(rf"waits as server {re.escape(key)}\b", start=mark))
    return proc
