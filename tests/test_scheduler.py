"""Compute slots: at most `slots` holders, waiters served by (priority, deadline, arrival),
timeouts."""

from __future__ import annotations

import threading

import pytest

from walkrank.serving.scheduler import ComputeSlots


def _waiter(slots: ComputeSlots, priority: int, order: list[str], name: str,
            timeout: float | None = 20.0, due: float | None = None) -> threading.Thread:
    """A thread that waits for a slot, notes its name, and gives the slot back."""
    def run() -> None:
        if slots.acquire(priority, timeout, due=due):
            order.append(name)
            slots.release()
        else:
            order.append(f"{name} timed out")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _queued(slots: ComputeSlots, n: int) -> None:
    """Wait until n threads wait for a slot (each start above is asynchronous)."""
    done = threading.Event()
    for _ in range(4000):
        if slots.waiting == n:
            return
        done.wait(0.005)
    raise AssertionError(f"{n} waiters never queued (have {slots.waiting})")


def test_free_slots_are_taken_without_waiting_and_then_exhausted() -> None:
    slots = ComputeSlots(2)
    assert slots.acquire(1, timeout=0) and slots.acquire(0, timeout=0)
    assert not slots.acquire(0, timeout=0)
    assert slots.waiting == 0  # a waiter that timed out leaves the queue
    slots.release()
    assert slots.acquire(1, timeout=0)


def test_waiters_are_served_by_priority_then_arrival() -> None:
    slots = ComputeSlots(1)
    assert slots.acquire(0)
    order: list[str] = []
    threads = []
    for name, priority in (("batch-1", 1), ("interactive-1", 0), ("batch-2", 1),
                           ("interactive-2", 0)):
        threads.append(_waiter(slots, priority, order, name))
        _queued(slots, len(threads))
    slots.release()
    for thread in threads:
        thread.join(20)
    assert order == ["interactive-1", "interactive-2", "batch-1", "batch-2"]
    assert slots.acquire(0, timeout=0)  # the last release freed the slot


def test_within_a_priority_the_earliest_deadline_goes_first() -> None:
    slots = ComputeSlots(1)
    assert slots.acquire(0)
    order: list[str] = []
    threads = []
    for name, priority, due in (("late", 0, 30.0), ("no deadline", 0, None), ("soon", 0, 10.0),
                                ("batch, sooner still", 1, 5.0), ("also soon", 0, 10.0)):
        threads.append(_waiter(slots, priority, order, name, due=due))
        _queued(slots, len(threads))
    slots.release()
    for thread in threads:
        thread.join(20)
    assert order == ["soon", "also soon", "late", "no deadline", "batch, sooner still"]


def test_a_waiter_that_times_out_leaves_the_others_in_order() -> None:
    slots = ComputeSlots(1)
    assert slots.acquire(0)
    order: list[str] = []
    first = _waiter(slots, 0, order, "first")
    _queued(slots, 1)
    impatient = _waiter(slots, 0, order, "impatient", timeout=0.01)
    impatient.join(20)
    assert order == ["impatient timed out"] and slots.waiting == 1
    slots.release()
    first.join(20)
    assert order == ["impatient timed out", "first"]


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="compute slots must be >= 1"):
        ComputeSlots(0)
