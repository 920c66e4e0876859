"""Numba kernels of the feature stage: pure functions over arrays, no I/O.

`edge_time_stats` reads each candidate's edge times, stored ascending per pin (NaN last) in the
graph's `pin_edge_times`, through `pin_offsets`: two binary searches per window and candidate.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _first_after(times: np.ndarray, lo: int, hi: int, bound: float) -> int:
    """The first index in [lo, hi) whose time is > bound (NaN counts as after every bound)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if times[mid] <= bound:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(nogil=True, cache=True)
def edge_time_stats(
    offsets: np.ndarray,
    times: np.ndarray,
    pins: np.ndarray,
    now: float,
    windows_s: np.ndarray,
    counts: np.ndarray,
    at_request: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
) -> None:
    """Per candidate pin: `counts[i, w]` edges with a time in (now - windows_s[w], now],
    `at_request[i]` edges with a time <= now, and the `first` and `last` of those times (NaN
    when there is none). Edges after `now` (a replayed request) do not exist yet."""
    n_pins = offsets.shape[0] - 1  # pins past it (real-time delta pins) have no edge times
    for i in range(pins.shape[0]):
        lo = offsets[min(pins[i], n_pins)]
        hi = offsets[min(pins[i] + 1, n_pins)]
        end = _first_after(times, lo, hi, now)
        at_request[i] = end - lo
        if end > lo:
            first[i] = times[lo]
            last[i] = times[end - 1]
        else:
            first[i] = np.nan
            last[i] = np.nan
        for w in range(windows_s.shape[0]):
            counts[i, w] = end - _first_after(times, lo, end, now - windows_s[w])
