"""The compute pool: at most `slots` jobs at once, started by (priority, deadline, arrival),
fair shares across tenants, spare threads for a tenant's first job, timeouts for jobs never
started, errors handed back, lower-priority threads."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from walkrank.serving.scheduler import OS_THREAD_PREFIX, ComputePool, SlotTimeout


@pytest.fixture
def pool() -> Iterator[ComputePool]:
    pool = ComputePool(1)
    yield pool
    pool.close()


def _wait_until(condition, what: str) -> None:
    done = threading.Event()
    for _ in range(4000):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def _occupy(pool: ComputePool, tenant: str = "") -> tuple[threading.Event, threading.Thread]:
    """Keep the pool's only slot busy (a job of `tenant`) until the returned gate is set."""
    gate = threading.Event()
    blocker = threading.Thread(
        target=pool.run, args=(lambda: gate.wait(60), 0), kwargs={"tenant": tenant}
    )
    blocker.start()
    _wait_until(lambda: pool.running == 1, "the compute thread is busy")
    return gate, blocker


def _submit(
    pool: ComputePool,
    order: list[str],
    name: str,
    priority: int,
    due: float | None = None,
    wait_s: float | None = 20.0,
    tenant: str = "",
    weight: float = 1.0,
) -> threading.Thread:
    """A caller thread whose job notes its name when it runs."""

    def call() -> None:
        try:
            pool.run(
                lambda: order.append(name),
                priority,
                wait_s=wait_s,
                due=due,
                tenant=tenant,
                weight=weight,
            )
        except SlotTimeout:
            order.append(f"{name} timed out")

    thread = threading.Thread(target=call)
    waiting = pool.waiting
    thread.start()
    _wait_until(lambda: pool.waiting == waiting + 1, f"{name} is queued")
    return thread


def test_jobs_run_on_the_pool_and_report_their_wait(pool: ComputePool) -> None:
    gate, blocker = _occupy(pool)
    outcome: list[tuple[str, float]] = []
    started = time.perf_counter()
    caller = threading.Thread(
        target=lambda: outcome.append(pool.run(lambda: threading.current_thread().name, 0))
    )
    caller.start()
    _wait_until(lambda: pool.waiting == 1, "the job is queued")
    queued = time.perf_counter()  # the job was queued before this...
    _wait_until(lambda: time.perf_counter() > queued, "the clock moves on")
    released = time.perf_counter()  # ...and cannot start before this
    gate.set()
    blocker.join()
    caller.join()
    ended = time.perf_counter()
    [(result, waited)] = outcome
    assert result == "walkrank-compute-0"
    # The reported wait is the time queued behind the busy thread, no less and no more.
    assert released - queued <= waited <= ended - started
    with pytest.raises(ZeroDivisionError):  # the job's own error reaches the caller
        pool.run(lambda: 1 / 0, 0)


def test_jobs_start_by_priority_then_deadline_then_arrival(pool: ComputePool) -> None:
    gate, blocker = _occupy(pool)
    order: list[str] = []
    callers = [
        _submit(pool, order, name, priority, due)
        for name, priority, due in (
            ("batch-1", 1, None),
            ("late", 0, 30.0),
            ("no deadline", 0, None),
            ("soon", 0, 10.0),
            ("batch, sooner still", 1, 5.0),
            ("also soon", 0, 10.0),
        )
    ]
    gate.set()
    for caller in [blocker, *callers]:
        caller.join(20)
    assert order == ["soon", "also soon", "late", "no deadline", "batch, sooner still", "batch-1"]


def test_a_tenants_backlog_does_not_sit_in_front_of_another_tenants_job() -> None:
    """Tenant a queues 8 jobs, then b one: b's runs next, before a's remaining ones."""
    pool = ComputePool(1, spare=0)
    try:
        gate, blocker = _occupy(pool, tenant="a")
        order: list[str] = []
        callers = [_submit(pool, order, f"a{i}", 0, tenant="a") for i in range(8)]
        callers.append(_submit(pool, order, "b", 0, tenant="b"))
        gate.set()
        for caller in [blocker, *callers]:
            caller.join(20)
        assert order == ["b", *(f"a{i}" for i in range(8))]
    finally:
        pool.close()


def test_backlogged_tenants_share_the_threads_by_weight() -> None:
    """Weight 2 starts two jobs for each of weight 1's while both have jobs waiting."""
    pool = ComputePool(1, spare=0)
    try:
        gate, blocker = _occupy(pool, tenant="other")
        order: list[str] = []
        callers = [
            _submit(pool, order, f"{tenant}{i}", 0, tenant=tenant, weight=weight)
            for tenant, weight in (("a", 1.0), ("b", 2.0))
            for i in range(6)
        ]
        gate.set()
        for caller in [blocker, *callers]:
            caller.join(20)
        tenants = "".join(name[0] for name in order)
        assert tenants == "abbabbabbaaa"
        for tenant in "ab":  # each tenant's own jobs in arrival order
            assert [name for name in order if name[0] == tenant] == [
                f"{tenant}{i}" for i in range(6)
            ]
    finally:
        pool.close()


def test_a_spare_thread_starts_an_interactive_tenants_first_job_at_once() -> None:
    """With every slot busy, another interactive tenant's first job starts on a spare
    thread; the busy tenant's next job and a batch tenant's wait for a slot."""
    pool = ComputePool(1, spare=1)
    try:
        gate, blocker = _occupy(pool, tenant="a")
        order: list[str] = []
        callers = [
            _submit(pool, order, "a's second", 0, tenant="a"),
            _submit(pool, order, "batch", 1, tenant="c"),
        ]
        pool.run(lambda: order.append("b"), 0, tenant="b")  # returns with the slot still busy
        assert order == ["b"] and pool.waiting == 2 and pool.running == 1
        gate.set()
        for caller in [blocker, *callers]:
            caller.join(20)
        assert order == ["b", "a's second", "batch"]
    finally:
        pool.close()


def test_a_job_never_started_times_out_and_leaves_the_others_in_order(pool: ComputePool) -> None:
    gate, blocker = _occupy(pool)
    order: list[str] = []
    first = _submit(pool, order, "first", 0)
    impatient = _submit(pool, order, "impatient", 0, wait_s=0.01)
    impatient.join(20)
    assert order == ["impatient timed out"] and pool.waiting == 1
    gate.set()
    for caller in (blocker, first):
        caller.join(20)
    assert order == ["impatient timed out", "first"]


def test_a_job_not_started_by_its_due_time_times_out(pool: ComputePool) -> None:
    gate, blocker = _occupy(pool)
    order: list[str] = []
    late = _submit(pool, order, "late", 0, due=time.perf_counter() + 0.05, wait_s=None)
    late.join(20)
    assert order == ["late timed out"] and pool.waiting == 0
    gate.set()
    blocker.join(20)


def test_stalled_for_counts_while_jobs_wait_and_none_finishes(pool: ComputePool) -> None:
    assert pool.stalled_for() == 0.0
    gate, blocker = _occupy(pool)
    assert pool.stalled_for() == 0.0  # busy, but nothing waits
    order: list[str] = []
    waiter = _submit(pool, order, "waiter", 0)
    first = pool.stalled_for()
    _wait_until(lambda: pool.stalled_for() > first, "the stall grows")
    gate.set()
    for caller in (blocker, waiter):
        caller.join(20)
    assert order == ["waiter"] and pool.stalled_for() == 0.0


def test_the_cancel_cell_is_set_at_the_due_time_and_on_close(pool: ComputePool) -> None:
    """The job's work sees its cell set once `due` passes; close() sets every job's cell."""
    at_due = np.zeros(1, np.uint8)
    pool.run(
        lambda: _wait_until(lambda: at_due[0] == 1, "cancel is set at due"),
        0,
        due=time.perf_counter() + 0.01,
        cancel=at_due,
    )
    on_close = np.zeros(1, np.uint8)
    caller = threading.Thread(
        target=pool.run,
        args=(lambda: _wait_until(lambda: on_close[0] == 1, "close cancels"), 0),
        kwargs={"cancel": on_close},
    )  # no deadline: only close() can stop it
    caller.start()
    _wait_until(lambda: pool.running == 1, "the job runs")
    pool.close()
    caller.join(20)
    assert on_close[0] == 1 and not caller.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux")
def test_compute_threads_run_at_the_lower_priority_asked() -> None:
    pool = ComputePool(2, nice=3)
    try:
        niceness, _ = pool.run(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), 0
        )
        assert niceness == os.getpriority(os.PRIO_PROCESS, 0) + 3
    finally:
        pool.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc")
def test_compute_threads_carry_their_name_where_profilers_read_it() -> None:
    """`top -H`, perf and benchmarks/serving.py tell the pipeline's CPU from gRPC's by it."""

    def own_name() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    pool = ComputePool(2)
    try:
        names = {pool.run(own_name, 0)[0] for _ in range(8)}
        assert names and names <= {f"{OS_THREAD_PREFIX}0", f"{OS_THREAD_PREFIX}1"}
        assert not own_name().startswith(OS_THREAD_PREFIX)  # only the pool's threads
    finally:
        pool.close()


def test_at_least_one_slot_and_no_jobs_after_close() -> None:
    with pytest.raises(ValueError, match="compute slots must be >= 1"):
        ComputePool(0)
    with pytest.raises(ValueError, match="spare compute threads must be >= 0"):
        ComputePool(1, spare=-1)
    pool = ComputePool(1)
    with pytest.raises(ValueError, match="weight must be > 0"):
        pool.run(lambda: None, 0, tenant="a", weight=0)
    pool.close()
    pool = ComputePool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(lambda: None, 0)
