"""The graph a server serves, and its swap for a new version without stopping.

A `ServedGraph` is one opened version: the memory-mapped `GraphStore`, its version label and
the lease (`GraphLease`) that keeps repository retention and `graph build --replace` away from
its directory. A request takes one `ServedGraph` reference at its start (`ServingContext.served`)
and reads only that graph to its end; a swap replaces the reference in one assignment. The old
graph is unmapped when the last reference goes: the arrays' mappings close with the arrays, and
the lease is released by a finalizer on the store, so a version stays held exactly as long as a
call still reads it.

Opening a new version happens off the request path: resolve (`CURRENT` in a repository),
verify (checksums and structure), page in (every page of every array touched once, so the
first calls on the new graph do not each take page faults), then each tenant's pipeline runs
once on it before it is swapped in.
"""

from __future__ import annotations

import mmap
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from walkrank.errors import DataError
from walkrank.features import inputs_lost
from walkrank.graph.delta import DeltaSegment
from walkrank.graph.repository import resolve_graph
from walkrank.graph.store import ARRAY_FIELDS, GraphStore, load_for_serving
from walkrank.serving.tenant_table import TenantRuntime


@dataclass(frozen=True, eq=False)
class ServedGraph:
    """One opened graph version; `release()` ends its lease early (at server stop).

    With real-time edges on, `delta` holds them and `store` is the base with the delta's
    last snapshot (`walkrank.graph.delta.LiveGraph`): a call reads `store` once and keeps it.
    """

    base: GraphStore
    version: str  # the repository's version number, or the directory's content id
    path: Path  # the directory mapped
    source: Path  # the `graph:` setting: a repository or a graph directory
    open_s: float  # resolve + lease + verify
    page_in_s: float
    _lease_end: weakref.finalize = field(repr=False)
    delta: DeltaSegment | None = None

    @property
    def store(self) -> GraphStore:
        """What a call walks: the base graph, with the real-time delta when there is one."""
        return self.base if self.delta is None else self.delta.view()

    def release(self) -> None:
        self._lease_end()


def open_graph(source: Path, page_in: bool = True) -> ServedGraph:
    """Resolve `source`, lease and verify the directory, page it in; DataError naming the
    file when the version cannot be served (nothing stays held then)."""
    started = time.perf_counter()
    directory, version = resolve_graph(source)
    store, lease = load_for_serving(directory)
    lease_end = weakref.finalize(store, lease.release)
    opened = time.perf_counter()
    paged = page_in_arrays(store) if page_in else 0.0
    return ServedGraph(store, version, directory, source, opened - started, paged, lease_end)


def page_in_arrays(store: GraphStore) -> float:
    """Touch one byte of every page of every mapped array; returns the seconds it took.

    A verified load has read the files (their pages are in the page cache) but the process's
    mappings still fault on first access, page by page: here once, before any call.
    """
    started = time.perf_counter()
    arrays = [getattr(store, name) for name in ARRAY_FIELDS] + list(store.pin_columns.values())
    for array in arrays:
        raw = array.reshape(-1).view(np.uint8)
        int(raw[:: mmap.PAGESIZE].sum(dtype=np.uint64))  # the reduction releases the GIL
    return time.perf_counter() - started


def refuse_for_tenants(
    runtimes: dict[str, TenantRuntime], served: ServedGraph, new: ServedGraph
) -> None:
    """DataError when the new graph would take away graph data a tenant's model reads
    (`walkrank.features.GRAPH_INPUTS`): that model could not be served as trained."""
    problems = []
    for name in sorted(runtimes):
        runtime = runtimes[name]
        if runtime.model is None:
            continue
        for data, features in inputs_lost(runtime.config.features, served.base, new.base).items():
            problems.append(
                f"tenant {name!r} (model {runtime.model_version}) uses "
                f"{', '.join(features)}, which need {data}: graph {served.version} "
                f"has them, graph {new.version} does not"
            )
    if problems:
        raise DataError(
            f"{new.path}: graph {new.version} not swapped in, graph "
            f"{served.version} keeps serving: "
            + "; ".join(problems)
            + " (retrain those tenants on a graph like it, or rebuild it with "
            "that data)"
        )
