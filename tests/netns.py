"""Network namespaces for the seed's topology: A - B - C and B - D, no routing in B.

::

    A (developer)          B (tracker + proxy)          C (board)
    192.0.2.10 ----------- 192.0.2.1
                           198.51.100.1 --------------- 198.51.100.10
                           203.0.113.1 ---------------- 203.0.113.10
                                                        D (board)

Addresses are the RFC 5737 documentation ranges, used only inside these
namespaces. A, C and D have B as their default gateway, and B does not
forward (``net.ipv4.ip_forward=0``), so what isolates A from C and D is B
itself, as on a real lab network.

Invariants:
- Namespace names carry this process's pid (``tvmrpc-t<pid>-<x>``), so
  parallel runs never clash; namespaces of dead pids are stale and removed.
- :meth:`Topology.destroy` removes every namespace this object created
  (deleting a namespace destroys its veth ends and kills nothing else), and
  is safe to call twice or after a partial :meth:`Topology.create`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import attrs
import psutil

PREFIX = "tvmrpc-t"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsUnavailable(Exception):  # noqa: N818 - a reason to skip, not an error
    """Namespaces cannot be made here (not root, no ``ip``, or the kernel refuses)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; CalledProcessError (with stderr) when ``check`` and it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done


def remove_stale() -> list[str]:
    """Delete ``tvmrpc-t<pid>-*`` namespaces whose pid is gone; return their names."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces cannot be made."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root, as CI does)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")


_libc = ctypes.CDLL(None, use_errno=True)


def _in_namespace(name: str, func: Callable[[], T]) -> T:
    """Run ``func`` in a fresh thread that has entered namespace ``name``.

    setns(2) with CLONE_NEWNET moves only the calling thread, and a socket
    keeps the namespace it was created in, so sockets made here can be used
    from any thread afterwards.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@attrs.frozen
class Namespace:
    """One namespace: run commands in it, or open sockets from it."""

    name: str

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` keeps the pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ip("-n", self.name, *args, check=check)

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection made from inside this namespace."""
        return _in_namespace(self.name, lambda: socket.create_connection(address, timeout))

    def listen(self, port: int = 0) -> socket.socket:
        """A listening TCP socket on all of this namespace's addresses."""

        def make() -> socket.socket:
            sock = socket.socket()
            sock.bind(("0.0.0.0", port))
            sock.listen(8)
            return sock

        return _in_namespace(self.name, make)


@attrs.frozen
class Link:
    """A veth pair between two namespaces, one address on each end (/24)."""

    left: str
    left_dev: str
    left_addr: str
    right: str
    right_dev: str
    right_addr: str


class Topology:
    """A, B, C and D wired as in the module docstring; create() then destroy()."""

    A_ADDR, B_A_ADDR = "192.0.2.10", "192.0.2.1"  # A's side of the A-B link, B's side
    B_C_ADDR, C_ADDR = "198.51.100.1", "198.51.100.10"
    B_D_ADDR, D_ADDR = "203.0.113.1", "203.0.113.10"

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or f"{PREFIX}{os.getpid()}"
        self.a, self.b, self.c, self.d = (Namespace(f"{tag}-{x}") for x in "abcd")
        self.links = (
            Link(self.a.name, "to-b", self.A_ADDR, self.b.name, "to-a", self.B_A_ADDR),
            Link(self.b.name, "to-c", self.B_C_ADDR, self.c.name, "to-b", self.C_ADDR),
            Link(self.b.name, "to-d", self.B_D_ADDR, self.d.name, "to-b", self.D_ADDR),
        )
        self.created: list[Namespace] = []

    @property
    def namespaces(self) -> Sequence[Namespace]:
        return (self.a, self.b, self.c, self.d)

    def create(self) -> None:
        """Build it all; NetnsUnavailable if the first namespace cannot be added.

        On any failure what was built so far is destroyed before the error propagates.
        """
        check_available()
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise

    def _build(self) -> None:
        for ns in self.namespaces:
            ip("netns", "delete", ns.name, check=False)  # a leftover of this very pid
            done = ip("netns", "add", ns.name, check=False)
            if done.returncode != 0:
                if not self.created:
                    raise NetnsUnavailable(f"`ip netns add` failed: {done.stderr.strip()}")
                raise subprocess.CalledProcessError(done.returncode, done.args, "", done.stderr)
            self.created.append(ns)
            ns.ip("link", "set", "lo", "up")
        for link in self.links:
            ip(
                "link",
                "add",
                link.left_dev,
                "netns",
                link.left,
                "type",
                "veth",
                "peer",
                "name",
                link.right_dev,
                "netns",
                link.right,
            )
            for ns, dev, addr in (
                (link.left, link.left_dev, link.left_addr),
                (link.right, link.right_dev, link.right_addr),
            ):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
        # /proc/sys/net is the writer's namespace's; sh, not sysctl: procps may be absent.
        subprocess.run(
            self.b.argv("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"),
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.a.ip("route", "add", "default", "via", self.B_A_ADDR)
        self.c.ip("route", "add", "default", "via", self.B_C_ADDR)
        self.d.ip("route", "add", "default", "via", self.B_D_ADDR)

    def set_link(self, ns: Namespace, dev: str, up: bool) -> None:
        """Bring one veth end up or down (down on B's end cuts the cable at B)."""
        ns.ip("link", "set", dev, "up" if up else "down")

    def destroy(self) -> None:
        """Delete every namespace created; the veth pairs go with them."""
        while self.created:
            ns = self.created.pop()
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                ip("netns", "delete", ns.name, check=False)


@contextlib.contextmanager
def created_or_skip(tag: str | None = None) -> Iterator[Topology]:
    """A created :class:`Topology` for a fixture, destroyed at the end; the test
    is skipped, saying why, where namespaces cannot be made."""
    import pytest

    topology = Topology(tag)
    try:
        topology.create()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield topology
    finally:
        topology.destroy()
