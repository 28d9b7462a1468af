"""Numbered, timed steps that print as they happen and fail by name.

Invariants: every step prints its title before it starts and its outcome
when it ends; any exception inside a step becomes :class:`StepError`
carrying the step's title; :func:`bounded` never waits past its timeout.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


class StepError(Exception):
    """A step did not complete; ``step`` is its title, ``reason`` one line (or a few)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class Steps:
    """Prints ``[  t s] N. title`` lines and the notes each step adds."""

    def __init__(self, out: IO[str], timeout: float) -> None:
        self.out = out
        self.timeout = timeout
        self.started = time.monotonic()
        self.count = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.say(f"          {line}")

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.count += 1
        begun = time.monotonic()
        self.say(f"[{begun - self.started:5.1f}s] {self.count}. {title}")
        try:
            yield
        except StepError:
            raise
        except Exception as exc:  # every failure is reported by step name
            reason = str(exc) or type(exc).__name__
            self.say(f"          FAILED after {time.monotonic() - begun:.1f}s: {reason}")
            raise StepError(title, reason) from exc
        self.say(f"          ok ({time.monotonic() - begun:.1f}s)")


def bounded(func: Callable[[], T], timeout: float, what: str) -> T:
    """Run blocking ``func`` in a thread; TimeoutError if it has not returned in time.

    The thread is a daemon: a call stuck past its timeout is abandoned, and
    stopping the daemons it talks to is what unblocks it.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]
