"""Forwarding with splice(2): socket → pipe → socket, no forwarded byte in userspace.

A :class:`SpliceRelay` joins two connected, non-blocking TCP sockets once
both handshakes are answered. Each direction has its own pipe; the reactor
drives it through the public :class:`~twisted.internet.interfaces.IReactorFDSet`
(``addReader``/``addWriter``) with one :class:`_End` per socket, which
provides ``IReadDescriptor`` and ``IWriteDescriptor`` on a ``dup`` of the
socket's descriptor (so the reactor never sees one descriptor number twice).
How a Twisted transport is handed over is in :mod:`tvmrpc.proxy.handover`.

Invariants:
- Each direction delivers its *prefix* (the handshake answer, then bytes the
  other side sent before pairing) first, then the bytes spliced from its
  source, in order and untouched.
- A direction stops reading its source while its pipe is full and resumes
  when the destination has drained it: forwarded bytes live in kernel pipes
  (at most one pipe, about 1 MiB, per direction), never in this process.
- When one side reaches end of stream or fails, nothing more is read from
  either side; the bytes already read from the side that went are delivered
  to the other (those travelling to the side that went are dropped), then
  every descriptor of the relay is removed from the reactor and closed and
  ``on_done`` is called exactly once. The relay never closes the sockets
  themselves: their owners do.
- The relay's life cycle is explicit: RELAYING → DRAINING → DONE, or
  RELAYING → DONE; every event checks the state.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: Pipe sizes asked for per direction, in order (1 MiB is the unprivileged
#: maximum by default; larger pipes measured slower here). If neither is
#: granted (a user over ``/proc/sys/fs/pipe-user-pages-soft``), the kernel's
#: default stays: slower, still correct.
PIPE_BYTES = (1 << 20, 1 << 16)
#: Spliced reads shorter than this are acknowledged at once (TCP_QUICKACK): a
#: stock peer's second small write waits for the ACK of its first.
QUICKACK_BELOW = 1 << 16

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTUNREACH)


def splice_supported() -> bool:
    """Whether this platform has splice(2) (Linux, Python 3.10+)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


class State(enum.Enum):
    RELAYING = "relaying"
    DRAINING = "draining"
    DONE = "done"


class _Pipe:
    """One direction's pipe and how many bytes it holds."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for size in PIPE_BYTES:
            try:
                fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
                break
            except OSError:
                continue
        self.capacity: int = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        self.held = 0

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """One socket of the relay as the reactor sees it (a dup of its descriptor)."""

    def __init__(self, relay: SpliceRelay, sock: socket.socket, name: str) -> None:
        self.relay = relay
        self.sock = sock  # for socket options only
        self.fd = os.dup(sock.fileno())
        os.set_inheritable(self.fd, False)
        self.name = name
        self.reading = False
        self.writing = False

    # -- IReadDescriptor / IWriteDescriptor --------------------------------------

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"splice {self.name}"

    def doRead(self) -> None:
        self.relay._readable(self)

    def doWrite(self) -> None:
        self.relay._writable(self)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor removed us already (hang-up or error on the descriptor).
        self.reading = self.writing = False
        self.relay._lost(self)

    # -- registration ---------------------------------------------------------------

    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.relay.reactor.addReader(self)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.relay.reactor.removeReader(self)

    def start_writing(self) -> None:
        if not self.writing:
            self.writing = True
            self.relay.reactor.addWriter(self)

    def stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self.relay.reactor.removeWriter(self)

    def close(self) -> None:
        self.stop_reading()
        self.stop_writing()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


class _Direction:
    """Bytes from ``src`` to ``dst``: a prefix, then whatever splice moves."""

    def __init__(self, src: _End, dst: _End, prefix: bytes) -> None:
        self.src = src
        self.dst = dst
        self.prefix = memoryview(prefix)
        self.pipe = _Pipe()
        #: Bytes spliced from ``src`` to ``dst`` so far (the prefix not included).
        self.moved = 0

    @property
    def pending(self) -> bool:
        return bool(self.prefix) or self.pipe.held > 0


class SpliceRelay:
    """Forwards between two TCP sockets with splice(2), driven by ``reactor``."""

    def __init__(
        self,
        reactor: IReactorFDSet,
        a: socket.socket,
        b: socket.socket,
        prefix_to_a: bytes,
        prefix_to_b: bytes,
        on_done: Callable[[], Any],
        names: tuple[str, str] = ("a", "b"),
    ) -> None:
        self.reactor = reactor
        self.on_done = on_done
        self.state = State.RELAYING
        self._ends: list[_End] = []
        self._directions: list[_Direction] = []
        try:
            end_a = _End(self, a, names[0])
            self._ends.append(end_a)
            end_b = _End(self, b, names[1])
            self._ends.append(end_b)
            self._directions.append(_Direction(end_a, end_b, prefix_to_b))
            self._directions.append(_Direction(end_b, end_a, prefix_to_a))
        except OSError:
            self._release()
            raise
        self._out = {d.src: d for d in self._directions}  # direction an end feeds
        self._in = {d.dst: d for d in self._directions}  # direction an end receives
        #: The direction still being delivered while DRAINING.
        self._draining: _Direction | None = None

    # -- events -------------------------------------------------------------------

    def start(self) -> None:
        """Begin: deliver the prefixes and read both sides."""
        if self.state is not State.RELAYING:
            raise RuntimeError(f"cannot start a relay that is {self.state.value}")
        for d in self._directions:
            d.src.start_reading()
            if d.pending:
                self._pump_out(d)

    @property
    def moved(self) -> tuple[int, int]:
        """Bytes delivered so far from ``a`` to ``b`` and from ``b`` to ``a``."""
        return self._directions[0].moved, self._directions[1].moved

    def stop(self) -> None:
        """Give up at once (an owner closed its socket): nothing more is moved."""
        if self.state is not State.DONE:
            self._finish()

    def _readable(self, end: _End) -> None:
        if self.state is not State.RELAYING:
            end.stop_reading()
            return
        d = self._out[end]
        pipe = d.pipe
        room = pipe.capacity - pipe.held
        if room <= 0:
            end.stop_reading()
            return
        try:
            n = os.splice(end.fd, pipe.w, room, flags=_FLAGS)
        except BlockingIOError:
            # Level-triggered readiness: no data means the pipe is full (its
            # slots, not its byte count); wait until the destination drains it.
            if pipe.held:
                end.stop_reading()
            return
        except OSError as exc:
            self._gone(end, exc)
            return
        if n == 0:
            self._gone(end, None)
            return
        pipe.held += n
        if n < QUICKACK_BELOW and hasattr(socket, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                end.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self._pump_out(d)
        if self.state is State.RELAYING and pipe.held >= pipe.capacity:
            end.stop_reading()

    def _writable(self, end: _End) -> None:
        d = self._in[end]
        if self.state is State.DONE or (self.state is State.DRAINING and d is not self._draining):
            end.stop_writing()
            return
        self._pump_out(d)

    def _lost(self, end: _End) -> None:
        if self.state is not State.DONE:
            self._gone(end, None)

    # -- moving bytes -----------------------------------------------------------------

    def _pump_out(self, d: _Direction) -> None:
        """Write what ``d`` holds to its destination until drained or the socket is full."""
        dst = d.dst
        try:
            while d.prefix:
                d.prefix = d.prefix[os.write(dst.fd, d.prefix) :]
            pipe = d.pipe
            while pipe.held:
                moved = os.splice(pipe.r, dst.fd, pipe.held, flags=_FLAGS)
                if not moved:  # cannot happen while the pipe holds bytes; never spin
                    raise OSError(errno.EIO, "splice from a non-empty pipe moved nothing")
                pipe.held -= moved
                d.moved += moved
        except BlockingIOError:
            dst.start_writing()
            return
        except OSError as exc:
            self._gone(dst, exc)
            return
        dst.stop_writing()
        if self.state is State.RELAYING:
            d.src.start_reading()
        elif self.state is State.DRAINING:
            self._finish()

    def _gone(self, end: _End, exc: OSError | None) -> None:
        """``end`` reached end of stream or failed: deliver what it sent, then finish."""
        if exc is not None and exc.errno not in _GONE:
            log.warn("splice on {end} failed: {error}", end=end.name, error=exc)
        if self.state is State.RELAYING:
            self.state = State.DRAINING
            for e in self._ends:
                e.stop_reading()
            end.stop_writing()  # bytes for the side that went are dropped
            d = self._out[end]
            self._draining = d
            if d.pending:
                self._pump_out(d)
            else:
                self._finish()
        elif self.state is State.DRAINING:
            self._finish()  # the other side went too: nothing can be delivered

    def _finish(self) -> None:
        self.state = State.DONE
        self._release()
        self.on_done()

    def _release(self) -> None:
        for e in self._ends:
            e.close()
        for d in self._directions:
            d.pipe.close()
