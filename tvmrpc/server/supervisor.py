"""Drives the server's :class:`Lifecycle` from what the worker zygote does.

- Zygote warm → health check in a fresh worker → advertised (or withdrawn/failed).
- A session ended by a crash → health check again before the next client.
- Zygote died after start-up → withdrawn; restarted with Twisted's
  ``backoffPolicy``; warm again → checked → advertised.
- Zygote or health check failed at start-up → failed: one error line naming
  cause and fix, then ``on_failed`` (the daemon exits with status 1).

Invariants:
- Every change of state is logged once (warn when the board leaves service,
  info when it comes back); a retry that fails for the same reason is logged
  at debug only.
- Restart delays come from ``backoffPolicy`` and start over once the board
  is advertised again.
- A zygote that is not warm within ``warm_timeout`` seconds is killed and
  counts as lost (failed at start-up, withdrawn later).
- After ``stopService`` nothing is restarted or checked: it observes the
  runtime and the life cycle only while it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .adapter import IDeviceRuntime
from .lifecycle import InvalidTransitionError, Lifecycle, State, unsubscribe

log = Logger()


@attrs.define(eq=False, slots=False)
class Supervisor(service.Service):
    """Starts the zygote, runs health checks, restarts it with backoff.

    It listens to the runtime and the life cycle only while it runs
    (subscribed in ``startService``, unsubscribed in ``stopService``).
    """

    reactor: Any
    runtime: IDeviceRuntime
    lifecycle: Lifecycle
    on_failed: Callable[[str], None]
    initial_delay: float = 1.0
    max_delay: float = 60.0
    warm_timeout: float = 60.0
    retry_policy: Callable[[int], float] = attrs.field(init=False)
    attempts: int = attrs.field(default=0, init=False)
    #: Health checks run since start and whether the last one passed (for reports).
    health: dict[str, Any] = attrs.field(init=False, factory=lambda: {"checks": 0, "ok": None})
    _warm_timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _check_started: float = attrs.field(default=0.0, init=False)
    _next_delay: float | None = attrs.field(default=None, init=False)  # logged, used by _later
    _withdrawn_for: str | None = attrs.field(default=None, init=False)  # last cause at warn

    name = "tvm-server supervisor"

    @retry_policy.default
    def _policy(self) -> Callable[[int], float]:
        return backoffPolicy(initialDelay=self.initial_delay, maxDelay=self.max_delay)

    def startService(self) -> None:
        service.Service.startService(self)
        self.runtime.warm_observers.append(self._warm)
        self.runtime.lost_observers.append(self._lost)
        self.lifecycle.observers.append(self._state_changed)
        # A SIGTERM to the whole process group reaches the zygote too; once the
        # reactor is shutting down its death is part of stopping, not a failure.
        self.reactor.addSystemEventTrigger("before", "shutdown", self.lifecycle.stop)
        self._start()

    def stopService(self) -> None:
        service.Service.stopService(self)
        for timer in (self._timer, self._warm_timer):
            if timer is not None and timer.active():
                timer.cancel()
        unsubscribe(self.runtime.warm_observers, self._warm)
        unsubscribe(self.runtime.lost_observers, self._lost)
        unsubscribe(self.lifecycle.observers, self._state_changed)
        self.lifecycle.stop()

    def _start(self) -> None:
        """Start the zygote; one that is not warm within ``warm_timeout`` is killed."""
        self._cancel_warm_timer()
        self._warm_timer = self.reactor.callLater(self.warm_timeout, self._not_warm)
        self.runtime.start()

    def _not_warm(self) -> None:
        self._warm_timer = None
        self.runtime.abandon(
            f"the worker zygote did not get warm within {self.warm_timeout:g}s "
            "(a runtime load that hangs?); see its output above"
        )

    def _cancel_warm_timer(self) -> None:
        if self._warm_timer is not None and self._warm_timer.active():
            self._warm_timer.cancel()
        self._warm_timer = None

    # -- events from the runtime ---------------------------------------------------

    def _warm(self) -> None:
        self._cancel_warm_timer()
        try:
            self.lifecycle.warm()
        except InvalidTransitionError as exc:
            log.warn("ignored: {exc}", exc=exc)

    def _lost(self, reason: str) -> None:
        self._cancel_warm_timer()
        self.lifecycle.zygote_lost(reason)
        if self.running and self.lifecycle.withdrawn:
            self._later(self._start)

    # -- reactions to changes of state ---------------------------------------------

    def _state_changed(self, old: State, new: State, reason: str) -> None:
        if new is State.CHECKING:
            self._check_started = self.reactor.seconds()
            self.runtime.check().addCallback(self._checked)
        elif new is State.ADVERTISED and old is State.CHECKING:
            self.attempts = 0
            self._withdrawn_for = None
            log.info(
                "board ready: health check passed in {ms:.0f} ms",
                ms=1000 * (self.reactor.seconds() - self._check_started),
            )
        elif new is State.WITHDRAWN:
            self._next_delay = self.retry_policy(self.attempts)
            # A retry that fails the same way is not news: one warn per cause.
            emit = log.debug if reason == self._withdrawn_for else log.warn
            self._withdrawn_for = reason
            emit(
                "board withdrawn, no client is given to it: {reason}; retrying in {delay:.1f}s",
                reason=reason,
                delay=self._next_delay,
            )
        elif new is State.FAILED:
            log.error("tvm-server cannot serve: {reason}", reason=reason)
            self.on_failed(reason)

    def _checked(self, error: str | None) -> None:
        self.health = {"checks": self.health["checks"] + 1, "ok": error is None}
        if self.lifecycle.state is not State.CHECKING:
            return  # the zygote died meanwhile, or we are stopping
        if error is None:
            self.lifecycle.check_passed()
            return
        self.lifecycle.check_failed(error)
        if self.running and self.lifecycle.withdrawn:
            self._later(self._recheck)

    def _recheck(self) -> None:
        if self.lifecycle.withdrawn and self.runtime.is_ready:
            self.lifecycle.warm()  # still warm: check it again

    def _later(self, action: Callable[[], None]) -> None:
        delay, self._next_delay = self._next_delay or self.retry_policy(self.attempts), None
        self.attempts += 1
        log.debug("retrying in {delay:.1f}s", delay=delay)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, action)
