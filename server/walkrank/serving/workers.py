"""gRPC's worker threads: few at the front door, and admitted calls step aside.

Every call first runs front-door work on a worker thread: receive and decode the message,
check credentials and the tenant's quota, and for a refused call send the refusal. That is
short, GIL-bound Python, so running many calls' front doors at once only makes them queue for
the GIL (a 64-caller flood of refusals on 64 threads answered each in ~40 ms, on 8 in ~25 ms).
An admitted call then waits, mostly for a compute thread, for as long as its pipeline takes;
on a thread of a fixed pool those waits once held every thread, and refusals and other
tenants' calls queued behind them.

So at most `front_door` calls run their front door at once (a FIFO gate), and an admitted call
leaves the gate (`step_aside`) for the rest of its life: it holds a thread but no front-door
place. Threads start as calls need them: at most `front_door` plus the calls the tenants'
quotas admit at once (`fit`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

_held = threading.local()


class WorkerPool(futures.ThreadPoolExecutor):
    def __init__(self, front_door: int) -> None:
        super().__init__(max_workers=front_door, thread_name_prefix="walkrank")
        self.front_door = front_door
        self._gate = threading.Semaphore(front_door)

    def fit(self, admitted: int) -> None:
        """Threads for `admitted` calls at once beside the front door (never shrinks: calls
        admitted under an older, larger quota may still hold their threads)."""
        # ThreadPoolExecutor reads _max_workers on every submit, when it decides whether to
        # start a thread; there is no public way to grow a pool.
        self._max_workers = max(self._max_workers, self.front_door + admitted)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        return super().submit(self._gated, fn, *args, **kwargs)

    def _gated(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._gate.acquire()
        _held.gate = self._gate
        try:
            return fn(*args, **kwargs)
        finally:
            step_aside()


def step_aside() -> None:
    """The calling thread's call was admitted and will wait (for a compute thread, then its
    pipeline): give its front-door place to the next call. A no-op off the pool's threads."""
    gate = getattr(_held, "gate", None)
    if gate is not None:
        _held.gate = None
        gate.release()
