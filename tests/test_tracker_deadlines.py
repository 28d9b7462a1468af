"""One timer for every connection still greeting (tvmrpc.tracker.deadlines)."""

from __future__ import annotations

from twisted.internet.task import Clock

from tvmrpc.tracker.deadlines import Deadlines


def make(timeout: float = 5.0):
    clock = Clock()
    expired: list[str] = []
    return clock, expired, Deadlines(clock, timeout, expired.append)


def test_items_expire_at_their_deadline_in_order_with_one_timer():
    clock, expired, deadlines = make()
    deadlines.add("a")
    clock.advance(1)
    deadlines.add("b")
    deadlines.add("c")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3.9)
    assert expired == []
    clock.advance(0.1)  # a's deadline: 5 s after it was added
    assert expired == ["a"]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.9)
    assert expired == ["a"]
    clock.advance(0.1)
    assert expired == ["a", "b", "c"]
    assert clock.getDelayedCalls() == []
    assert len(deadlines) == 0


def test_a_discarded_item_never_expires_and_the_last_one_stops_the_timer():
    clock, expired, deadlines = make()
    deadlines.add("a")
    deadlines.add("b")
    deadlines.discard("a")
    assert "a" not in deadlines
    assert "b" in deadlines
    deadlines.discard("b")
    assert clock.getDelayedCalls() == []
    deadlines.discard("b")  # twice is harmless
    clock.advance(10)
    assert expired == []


def test_the_timer_follows_the_head_after_it_is_discarded():
    clock, expired, deadlines = make()
    deadlines.add("a")
    clock.advance(2)
    deadlines.add("b")
    deadlines.discard("a")
    clock.advance(3)  # a's old deadline: nothing is due, the timer moves to b's
    assert expired == []
    assert [call.getTime() for call in clock.getDelayedCalls()] == [7.0]
    clock.advance(2)
    assert expired == ["b"]


def test_expire_may_discard_and_add():
    clock = Clock()
    expired: list[str] = []
    deadlines: Deadlines

    def expire(item: str) -> None:
        expired.append(item)
        deadlines.discard(item)  # what a closing connection does
        if item == "a":
            deadlines.add("late")

    deadlines = Deadlines(clock, 1.0, expire)
    deadlines.add("a")
    deadlines.add("b")
    clock.advance(1)
    assert expired == ["a", "b"]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert expired == ["a", "b", "late"]
    assert clock.getDelayedCalls() == []


def test_stop_cancels_the_timer():
    clock, expired, deadlines = make()
    deadlines.add("a")
    deadlines.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert expired == []
