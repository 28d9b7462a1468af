"""Where the worker zygote is in its life, as an explicit state (pure: no I/O, no reactor).

States::

    idle ──spawn──▶ starting ──warm──▶ warm
     ▲                 │                 │
     │ended            │abandon /        │control lost
     │(lost)           ▼ control lost    ▼
     └──────────────── ending ◀──────────┘
    any state with a zygote ──stop──▶ stopping ──ended──▶ stopped
    idle ──stop──▶ stopped

- ``idle``: no zygote (not started yet, or the last one ended: start again).
- ``starting``: spawned, loading the runtime.
- ``warm``: ready; sessions and health checks run.
- ``ending``: it is going (killed, or its control channel closed); waiting
  for its exit.
- ``stopping`` / ``stopped``: the daemon stops it; nothing restarts it.

Invariants:
- Each event is one method; it checks the current phase and raises
  :class:`ZygotePhaseError` for an event that cannot happen there (a second
  spawn while a zygote lives, ``ready`` twice, an exit with no zygote).
- Events a race can bring are not errors: ``abandon`` of a zygote that just
  got warm or already ends is ignored; ``spawn`` and ``warm`` after ``stop``
  are ignored (nothing restarts a stopped runtime).
- :meth:`ZygotePhase.ended` says whether the exit is a loss (tell the
  supervisor) or part of stopping.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    WARM = "warm"
    ENDING = "ending"
    STOPPING = "stopping"
    STOPPED = "stopped"


#: Phases in which a zygote process exists.
ALIVE = (Phase.STARTING, Phase.WARM, Phase.ENDING, Phase.STOPPING)


class ZygotePhaseError(Exception):
    """An event arrived in a phase where it cannot happen."""


class ZygotePhase:
    """The zygote's current :class:`Phase` and the events that move it."""

    def __init__(self) -> None:
        self.phase = Phase.IDLE

    @property
    def warm(self) -> bool:
        return self.phase is Phase.WARM

    @property
    def alive(self) -> bool:
        """True while a zygote process exists (its exit is still to come)."""
        return self.phase in ALIVE

    def spawn(self) -> bool:
        """A zygote is to be started: True to start it, False when stopped."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return False
        self._expect("spawn", Phase.IDLE)
        self.phase = Phase.STARTING
        return True

    def became_warm(self) -> bool:
        """The zygote said ``ready``: True when sessions may now run."""
        if self.phase is Phase.STOPPING:
            return False
        self._expect("ready", Phase.STARTING)
        self.phase = Phase.WARM
        return True

    def abandon(self) -> bool:
        """Give up on a zygote that does not get warm: True to kill it."""
        if self.phase is not Phase.STARTING:
            return False  # warm just in time, already ending, or stopping
        self.phase = Phase.ENDING
        return True

    def control_lost(self) -> None:
        """Its control channel closed: no more sessions; its exit follows."""
        if self.phase in (Phase.ENDING, Phase.STOPPING):
            return
        self._expect("control lost", Phase.STARTING, Phase.WARM)
        self.phase = Phase.ENDING

    def stop(self) -> bool:
        """The daemon stops: True when a zygote is still to exit."""
        if self.phase is Phase.IDLE:
            self.phase = Phase.STOPPED
        elif self.phase is not Phase.STOPPED:
            self.phase = Phase.STOPPING
        return self.phase is Phase.STOPPING

    def ended(self) -> bool:
        """The zygote exited: True when that is a loss, False when we were stopping it."""
        self._expect("exit", *ALIVE)
        if self.phase is Phase.STOPPING:
            self.phase = Phase.STOPPED
            return False
        self.phase = Phase.IDLE
        return True

    def _expect(self, event: str, *allowed: Phase) -> None:
        if self.phase not in allowed:
            raise ZygotePhaseError(f"zygote event {event!r} cannot happen while {self.phase.value}")
