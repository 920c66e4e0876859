"""gRPC's worker threads, and the front door every call passes through.

Every call first runs front-door work on a worker thread: check credentials, decode, check the
tenant's quota and, for a refused call, send the refusal. That is short, GIL-bound Python. An
admitted call then waits, mostly for a compute thread, for as long as its pipeline takes.

On a fixed pool of threads, both went wrong under one tenant's overload: the admitted calls'
waits held threads, and refusals and other tenants' calls queued behind them; and a flood of
refusals, each on its own runnable thread, made every call queue for the GIL in arrival order,
so another tenant's call waited behind the whole flood.

So: threads are plenty (`WorkerPool`: one for each call the tenants' quotas admit at once,
plus `FrontDoor` places, plus `WAITING` more for calls waiting at the door), while at most
`places` calls do front-door work at once (`FrontDoor`). Waiting calls are let in round-robin
over lanes (one lane per tenant), so a tenant with 60 calls at the door gets one place in turn
like a tenant with one: its flood waits behind itself. An admitted call leaves the door
(`step_aside`) once admitted and keeps only its own thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

#: Calls that may wait at the front door on threads of their own; past it, calls wait for a
#: thread in arrival order.
WAITING = 256

_held = threading.local()


class WorkerPool(futures.ThreadPoolExecutor):
    """Threads start when calls need them, up to `fit`'s count."""

    def __init__(self, places: int) -> None:
        super().__init__(max_workers=places + WAITING, thread_name_prefix="walkrank")
        self.base = places + WAITING

    def fit(self, admitted: int) -> None:
        """Threads for `admitted` calls at once beside the door's (never shrinks: calls
        admitted under an older, larger quota may still hold their threads)."""
        # ThreadPoolExecutor reads _max_workers on every submit, when it decides whether to
        # start a thread; there is no public way to grow a pool.
        self._max_workers = max(self._max_workers, self.base + admitted)


class FrontDoor:
    """At most `places` calls inside at once; waiting calls let in round-robin over lanes,
    each lane in arrival order. A place is handed straight to the next call let in."""

    def __init__(self, places: int) -> None:
        if places < 1:
            raise ValueError(f"the front door needs at least 1 place, got {places}")
        self.places = places
        self._lock = threading.Lock()
        self._free = places
        self._lanes: dict[str, deque[threading.Lock]] = {}
        self._turns: deque[str] = deque()  # lanes with waiting calls, next first

    @property
    def waiting(self) -> int:
        """Calls waiting for a place."""
        with self._lock:
            return sum(len(calls) for calls in self._lanes.values())

    @contextmanager
    def through(self, lane: str) -> Iterator[None]:
        """Hold a place for the block (or until `step_aside`)."""
        self._enter(lane)
        _held.door = self
        try:
            yield
        finally:
            step_aside()

    def _enter(self, lane: str) -> None:
        with self._lock:
            if self._free:
                self._free -= 1
                return
            turn = threading.Lock()
            turn.acquire()
            waiting = self._lanes.get(lane)
            if waiting is None:
                waiting = self._lanes[lane] = deque()
                self._turns.append(lane)
            waiting.append(turn)
        turn.acquire()  # released by the call that hands its place over

    def _leave(self) -> None:
        with self._lock:
            if not self._turns:
                self._free += 1
                return
            lane = self._turns.popleft()
            waiting = self._lanes[lane]
            turn = waiting.popleft()
            if waiting:
                self._turns.append(lane)
            else:
                del self._lanes[lane]
        turn.release()


def step_aside() -> None:
    """Give the calling thread's front-door place to the next call: its call was admitted and
    will now wait (for a compute thread, then its pipeline). A no-op when it holds none."""
    door = getattr(_held, "door", None)
    if door is not None:
        _held.door = None
        door._leave()
