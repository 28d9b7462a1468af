"""The board: one device, one session at a time, clients served in arrival order.

A :class:`Ticket` is a client whose handshake was accepted but not yet
answered (listening mode) or a proxy pairing (proxy mode). The board starts
the first ticket as soon as it is idle and a worker is warm: the ticket
detaches its socket from Twisted, the runtime adapter hands it to a worker,
and the board keeps a duplicate only to write the timeout exception.

Invariants:
- At most one session runs; ``busy`` is true while one runs or tickets wait.
- Every session gets a fresh directory, removed when the session is over,
  never on the reactor thread: by the runtime when it says
  ``removes_session_dirs`` (the zygote removes it as it reaps the worker),
  else by ``remove_tree`` (in the reactor's thread pool).
- A session past its ``-timeout`` is aborted: its worker tree is killed and
  the client receives the stock ``RPCSessionTimeoutError`` exception packet.
- Observers subscribed with :meth:`Board.subscribe` are called with no
  argument whenever the board becomes free with nothing waiting (the tracker
  registrar PUTs a fresh match key then), in subscription order, until
  unsubscribed.
- When a session ends, the board is free for the next client (and its
  observers told) before anything is logged: the re-offer at the tracker
  does not wait for log writes. Per-session events are logged at debug.
- With a :class:`Lifecycle`, a session starts only while the board is
  advertised; the board reports each session's start and end to it, and an
  end by a signal we did not send (a crash) as such, so a health check runs
  before the next client.
- A session that asked for no timeout is capped at ``max_session_seconds``
  when that is set.
- Session directories live in this daemon's locked :class:`SessionRoot`;
  the next one is made while the board is idle, so a session's start does
  not wait for a ``mkdir``.
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..codec import exception_packet, session_timeout_message
from ..status.hooks import NULL_SERVER
from .adapter import IDeviceRuntime
from .lifecycle import Lifecycle, State
from .session_dirs import SessionRoot

log = Logger()

#: What :meth:`Board.subscribe` takes: called with no argument when the board is idle.
IdleObserver = Callable[[], None]


class Ticket(Protocol):
    """A client waiting for the board."""

    label: str
    timeout: float | None

    def accept(self) -> socket.socket | None:
        """Answer the client and return a blocking duplicate of its socket (None: gone)."""

    def reject(self) -> None:
        """Drop the client without a session (server stopping)."""


class Board:
    """Runs sessions one after another on a :class:`IDeviceRuntime`."""

    def __init__(
        self,
        reactor: Any,
        runtime: IDeviceRuntime,
        workdir: str | None = None,
        lifecycle: Lifecycle | None = None,
        max_session_seconds: float | None = None,
        remove_tree: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        #: Removes a session directory off the reactor thread (runtimes that do not).
        self.remove_tree = remove_tree or remover(reactor)
        self.runtime = runtime
        self.workdir = workdir
        self.session_root = SessionRoot(workdir or session_root())
        self.lifecycle = lifecycle
        self.max_session_seconds = max_session_seconds
        if lifecycle is not None:
            lifecycle.observers.append(self._state_changed)
        self.queue: collections.deque[Ticket] = collections.deque()
        self.current: defer.Deferred[int] | None = None
        #: The subscribed idle observers (use :meth:`subscribe`).
        self.idle_observers: list[IdleObserver] = []
        #: Called with the client's label when its session starts.
        self.session_observers: list[Callable[[str], None]] = []
        self.sessions_served = 0
        #: Told when a session starts, times out and ends (tvmrpc.status).
        self.observer: Any = NULL_SERVER
        self._waiting_for_worker = False
        self._spare_dir: str | None = None  # the next session's, made while idle
        self._aborted = False
        self._closed = False

    def subscribe(self, observer: IdleObserver) -> None:
        """Call ``observer()`` each time the board becomes idle (once per observer)."""
        if observer not in self.idle_observers:
            self.idle_observers.append(observer)

    def unsubscribe(self, observer: IdleObserver) -> None:
        """Stop calling ``observer``; one that was not subscribed is ignored."""
        if observer in self.idle_observers:
            self.idle_observers.remove(observer)

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    def offer(self, ticket: Ticket) -> None:
        """Queue a client; it is served when every earlier one is done."""
        if self._closed:
            ticket.reject()
            return
        self.queue.append(ticket)
        if self.current is not None:
            log.debug(
                "client {peer} waits its turn ({n} waiting)", peer=ticket.label, n=len(self.queue)
            )
        self._pump()

    def withdraw(self, ticket: Ticket) -> None:
        """Forget a waiting client that went away."""
        try:
            self.queue.remove(ticket)
        except ValueError:
            return
        if not self.busy:
            self._idle()

    def _state_changed(self, old: State, new: State, reason: str) -> None:
        if new is State.ADVERTISED:
            self._pump()

    def _pump(self) -> None:
        while self.current is None and self.queue and not self._closed:
            if self.lifecycle is not None and not self.lifecycle.ready:
                return  # the state observer pumps again once advertised
            if not self.runtime.is_ready:
                if not self._waiting_for_worker:
                    self._waiting_for_worker = True
                    self.runtime.ready().addCallback(self._worker_ready)
                return
            ticket = self.queue.popleft()
            sock = ticket.accept()
            if sock is None:
                continue
            self._start(ticket, sock)
        if not self.busy:
            self._idle()

    def _worker_ready(self, _: object) -> None:
        self._waiting_for_worker = False
        self._pump()

    def _start(self, ticket: Ticket, sock: socket.socket) -> None:
        session_dir, self._spare_dir = self._spare_dir or self.session_root.new_session(), None
        started = time.monotonic()
        timeout = ticket.timeout or self.max_session_seconds
        # The worker first: the client waits for it, not for our log line.
        d = self.runtime.serve(sock, session_dir)
        self.current = d
        client = getattr(ticket, "client", ticket.label)  # a proxied ticket knows its client
        self.observer.session_started(client, timeout, sock)
        if self.lifecycle is not None:
            self.lifecycle.session_started()
        self._aborted = False
        for observer in list(self.session_observers):
            observer(ticket.label)
        timer = None
        if timeout:
            timer = self.reactor.callLater(timeout, self._expire, d, sock, timeout)
        log.debug(
            "session started for {peer} in {dir} (timeout {timeout})",
            peer=ticket.label,
            dir=session_dir,
            timeout=timeout,
        )

        def ended(result: int | Failure) -> None:
            secs = time.monotonic() - started
            if timer is not None and timer.active():
                timer.cancel()
            # The status observer first: it reads the socket's byte counters, and
            # the outcome it records goes out with the re-offer's UPDATE_INFO.
            self.observer.session_ended(result, sock)
            sock.close()
            if not getattr(self.runtime, "removes_session_dirs", False):
                self.remove_tree(session_dir)
            self.current = None
            self.sessions_served += 1
            aborted, self._aborted = self._aborted, False
            if self.lifecycle is not None:
                crashed = None
                if isinstance(result, int) and result < 0 and not aborted:
                    crashed = f"the last session's worker was killed by signal {-result}"
                self.lifecycle.session_ended(crashed)
            self._pump()  # the next client, or idle: the re-offer leaves now
            if isinstance(result, int):
                log.debug(
                    "session ended for {peer} (worker exit {code}, {secs:.3f}s)",
                    peer=ticket.label,
                    code=result,
                    secs=secs,
                )
            else:
                log.failure("session ended for {peer} with an error", result, peer=ticket.label)

        d.addBoth(ended)

    def _expire(self, d: defer.Deferred[int], sock: socket.socket, timeout: float) -> None:
        """Kill the worker first (it can no longer write), then tell the client why."""
        if d is not self.current:
            return
        log.info("session timeout after {timeout}s: aborting the worker", timeout=timeout)
        self.observer.session_timed_out()
        self._aborted = True
        self.runtime.abort(d)
        packet = exception_packet(session_timeout_message(timeout), self.runtime.str_type_index)
        try:
            sock.send(packet, socket.MSG_DONTWAIT)
        except OSError as exc:
            log.info("could not send the timeout exception: {exc}", exc=exc)

    def _idle(self) -> None:
        for observer in list(self.idle_observers):
            observer()
        if self._spare_dir is None and not self._closed:
            try:
                self._spare_dir = self.session_root.new_session()
            except OSError as exc:  # made again when the session starts, and failing there
                log.warn("cannot make a session directory: {exc}", exc=exc)

    def close(self, grace: float) -> defer.Deferred[None]:
        """Refuse new clients; let a running session finish within ``grace`` seconds."""
        self._closed = True
        while self.queue:
            self.queue.popleft().reject()
        current = self.current
        if current is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        timer = self.reactor.callLater(grace, self._abort_current, current)

        def finished(result: int | Failure) -> int | Failure:
            if timer.active():
                timer.cancel()
            done.callback(None)
            return result

        current.addBoth(finished)
        return done

    def _abort_current(self, current: defer.Deferred[int]) -> None:
        if self.current is current:
            log.info("grace period over: aborting the running session")
            self._aborted = True
            self.runtime.abort(current)


def remover(reactor: Any) -> Callable[[str], None]:
    """Remove a directory tree in ``reactor``'s thread pool (a reactor without
    threads, such as a test clock, removes it at once)."""
    if IReactorThreads.providedBy(reactor):
        return functools.partial(reactor.callInThread, shutil.rmtree, ignore_errors=True)
    return functools.partial(shutil.rmtree, ignore_errors=True)


def session_root() -> str:
    """Default parent of session directories (``$TMPDIR`` or /tmp)."""
    return os.environ.get("TMPDIR") or tempfile.gettempdir()
