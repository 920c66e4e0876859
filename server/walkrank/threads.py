"""Thread CPU priority: background threads (compute slots, log writers) that should take idle
CPU before the threads that receive requests."""

from __future__ import annotations

import os
import sys
import threading


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's niceness by `nice` (Linux only: it applies niceness per
    thread, as PRIO_PROCESS with a thread id; elsewhere, and for 0, nothing happens)."""
    if nice and sys.platform.startswith("linux"):
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, 0) + nice,
        )
