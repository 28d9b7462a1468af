"""The demo's daemons: which implementation plays each role, as command lines.

This is the one place that says which implementation plays each role; the
demo starts and awaits them with :mod:`tvmrpc.harness` (log files, not
pipes, so ``--keep`` can leave them running after the demo exits).

Invariants:
- Every command line runs this interpreter, so this tvmrpc and its twisted
  plugins are what runs (the harness puts this tvmrpc first on PYTHONPATH).
- Port 0 everywhere the caller does not choose one: the kernel picks a free
  port and the daemon logs which.
"""

from __future__ import annotations

from tvmrpc.harness import twistd_argv


def tracker_argv(host: str, port: int = 0) -> list[str]:
    """Our tracker; port 0 lets the kernel pick."""
    return twistd_argv("tvm-tracker", "--listen", f"tcp:{port}:interface={host}")


def proxy_argv(
    host: str, tracker: tuple[str, int], custom_addr: str | None = None, port: int = 0
) -> list[str]:
    """Our proxy, registering the servers that wait at it with ``tracker``.

    ``custom_addr`` is the address the tracker hands clients (default ``host``):
    it must be one the clients can reach.
    """
    return twistd_argv(
        "tvm-proxy",
        "--listen",
        f"tcp:{port}:interface={host}",
        "--host",
        host,
        "--tracker",
        f"{tracker[0]}:{tracker[1]}",
        "--custom-addr",
        custom_addr or host,
    )


def server_argv(host: str, key: str, tracker: tuple[str, int]) -> list[str]:
    """Our server, listening on ``host`` and registered with ``tracker`` directly."""
    return twistd_argv(
        "tvm-server",
        "--listen",
        f"tcp:0:interface={host}",
        "--host",
        host,
        "--key",
        key,
        "--tracker",
        f"{tracker[0]}:{tracker[1]}",
    )


def proxied_server_argv(proxy: tuple[str, int], key: str) -> list[str]:
    """Our server, connecting out to the proxy (``--through-proxy``)."""
    return twistd_argv(
        "tvm-server",
        "--through-proxy",
        "--host",
        proxy[0],
        "--port",
        str(proxy[1]),
        "--key",
        key,
    )
