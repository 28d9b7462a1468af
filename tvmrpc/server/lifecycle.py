"""The server's life cycle as an explicit state machine (pure: no I/O, no reactor).

States::

    starting ──warm──▶ checking ──passed──▶ advertised ⇄ busy
        │                 │  ▲                  │         │
        │failed           │  └──warm──┐         │lost     │ended by a signal
        ▼                 │failed/lost│         ▼         ▼
      failed              └────────▶ withdrawn ◀──     checking
                              (restart with backoff, then warm)
    any state ──stop──▶ stopping

- ``starting``: the zygote is loading the runtime for the first time.
- ``checking``: the zygote is warm; a health check runs in a fresh worker.
- ``advertised``: the board takes clients (tracker PUT, proxy link, sessions).
- ``busy``: a session runs; nothing new is advertised.
- ``withdrawn``: the zygote died or a health check failed after start-up;
  nothing is advertised until it is warm and checked again.
- ``failed``: the board could not get ready at start-up (the daemon exits 1).
- ``stopping``: the daemon is shutting down.

Invariants:
- Each event is one method; it checks the current state and raises
  :class:`InvalidTransitionError` for an event that makes no sense there.
- Observers are called once per actual change of state, in order, with
  ``(old, new, reason)``; an event that keeps the state calls nobody.
- ``serving`` (advertised or busy) is true only after a passed health check
  since the last time the zygote was (re)started or a session crashed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any


class State(enum.Enum):
    STARTING = "starting"
    CHECKING = "checking"
    ADVERTISED = "advertised"
    BUSY = "busy"
    WITHDRAWN = "withdrawn"
    FAILED = "failed"
    STOPPING = "stopping"


#: Called as ``observer(old, new, reason)`` after each change of state.
Observer = Callable[[State, State, str], None]


class InvalidTransitionError(Exception):
    """An event arrived in a state where it cannot happen."""


class Lifecycle:
    """The current :class:`State` and the events that move it."""

    def __init__(self) -> None:
        self.state = State.STARTING
        self.reason = "starting"
        self.observers: list[Observer] = []
        self.ever_ready = False

    @property
    def serving(self) -> bool:
        """True while clients may be given the board (advertised or busy)."""
        return self.state in (State.ADVERTISED, State.BUSY)

    @property
    def withdrawn(self) -> bool:
        """True while the board is out of service after having been ready once."""
        return self.state is State.WITHDRAWN

    @property
    def ready(self) -> bool:
        """True while the board is advertised and idle (a new client may start at once).

        For "can this board take clients" (systemd READY, status ready 0/1) use
        :class:`Readiness`, which also counts busy and the tracker/proxy link."""
        return self.state is State.ADVERTISED

    # -- events ------------------------------------------------------------------

    def warm(self) -> None:
        """The zygote loaded the runtime: check it before advertising."""
        self._move((State.STARTING, State.WITHDRAWN), State.CHECKING, "worker zygote warm")

    def check_passed(self) -> None:
        """The health check passed: advertise the board."""
        if self.state is State.CHECKING:
            self.ever_ready = True  # from now on a failure withdraws instead of failing
        self._move((State.CHECKING,), State.ADVERTISED, "health check passed")

    def check_failed(self, reason: str) -> None:
        """The health check failed: at start-up the daemon fails, later it withdraws."""
        target = State.WITHDRAWN if self.ever_ready else State.FAILED
        self._move((State.CHECKING,), target, reason)

    def zygote_lost(self, reason: str) -> None:
        """The zygote died (or could not start)."""
        if self.state is State.WITHDRAWN:
            return  # still down: one log line per change of state, not per retry
        allowed = (State.STARTING, State.CHECKING, State.ADVERTISED, State.BUSY)
        target = State.WITHDRAWN if self.ever_ready else State.FAILED
        self._move(allowed, target, reason)

    def session_started(self) -> None:
        self._move((State.ADVERTISED,), State.BUSY, "session started")

    def session_ended(self, crashed: str | None = None) -> None:
        """A session ended; a crash (``crashed`` says how) means a new health check first."""
        if self.state in (State.WITHDRAWN, State.FAILED):
            return  # the zygote died under the session: that change was already made
        if crashed:
            self._move((State.BUSY,), State.CHECKING, crashed)
        else:
            self._move((State.BUSY,), State.ADVERTISED, "session ended")

    def stop(self) -> None:
        if self.state is not State.STOPPING:
            self._move(tuple(State), State.STOPPING, "stopping")

    # -- internals ---------------------------------------------------------------

    def _move(self, allowed: tuple[State, ...], new: State, reason: str) -> None:
        old = self.state
        if old is State.STOPPING:
            return  # everything after stop is moot
        if old not in allowed:
            raise InvalidTransitionError(f"{reason!r} cannot happen while {old.value}")
        self.state, self.reason = new, reason
        if old is not new:
            for observer in list(self.observers):
                observer(old, new, reason)


class Announcement:
    """Whether the board is announced where clients look for it.

    The tracker registrar sets it while its link is up (UPDATE_INFO answered);
    the proxy connector while a connection waits at the proxy or a client it
    paired is served. Observers get ``(up, where)`` once per change.
    """

    def __init__(self) -> None:
        self.up = False
        self.observers: list[Callable[[bool, str], None]] = []

    def set(self, up: bool, where: str) -> None:
        if up != self.up:
            self.up = up
            for observer in list(self.observers):
                observer(up, where)


class Readiness:
    """The one hook for "this board can take a client now" (systemd READY=1, status ready 0/1).

    ``ready`` is true while the board is serving (warm, checked: advertised or
    busy) and, when it has a tracker or proxy link, announced there.
    ``observers`` get ``(ready, reason)`` once per change of ``ready``.
    """

    def __init__(self, lifecycle: Lifecycle, announcement: Announcement | None = None) -> None:
        self.lifecycle = lifecycle
        self.announcement = announcement
        self.ready = False
        self.observers: list[Callable[[bool, str], None]] = []
        lifecycle.observers.append(lambda old, new, reason: self._update(reason))
        if announcement is not None:
            announcement.observers.append(
                lambda up, where: self._update(f"{'announced at' if up else 'gone from'} {where}")
            )

    def _update(self, reason: str) -> None:
        ready = self.lifecycle.serving and (self.announcement is None or self.announcement.up)
        if not self.lifecycle.serving:
            reason = self.lifecycle.reason  # the board's own state says more than a link
        if ready != self.ready:
            self.ready = ready
            for observer in list(self.observers):
                observer(ready, reason)


def unsubscribe(observers: list[Any], observer: Any) -> None:
    """Remove ``observer`` from an observer list if it is there (stopping a service that
    never started is not an error)."""
    if observer in observers:
        observers.remove(observer)
