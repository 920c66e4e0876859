"""Structural checks of a mapped graph: the invariants the walk kernels index by.

The kernels are numba `nogil` code without bounds checks, so an offset past the end of an
adjacency array or a neighbour id past the end of the other side's offsets reads arbitrary
memory (SIGSEGV at best). Checksums say the files are the ones the build wrote; these checks
say the arrays are safe to walk whatever wrote them, and run on every load that verifies.
Each is one vectorised pass (benchmarks/walks.py times a verified load), and each failure is
a DataError naming the file and the first bad entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from walkrank.errors import DataError

if TYPE_CHECKING:
    from walkrank.graph.store import GraphStore

#: dtypes the kernels are compiled for; anything else is a corrupt or foreign file.
KERNEL_DTYPES: dict[str, tuple[str, ...]] = {
    "pin_offsets": ("int64",),
    "board_offsets": ("int64",),
    "pin_adj": ("int32",),
    "board_adj": ("int32",),
    "pin_key": ("int32",),
    "board_key": ("int32",),
    "pin_locale": ("int32",),
    "pin_topic": ("int32",),
    "board_locale": ("int32",),
    "board_topic": ("int32",),
    "pin_locale_ends": ("uint16", "uint32"),
    "board_locale_ends": ("uint16", "uint32"),
    "pin_run_offsets": ("int64",),
    "board_run_offsets": ("int64",),
    "pin_key_runs": ("uint32", "uint64"),
    "board_key_runs": ("uint32", "uint64"),
    "pin_ids_order": ("int32",),
    "board_ids_order": ("int32",),
}


def check_structure(graph: GraphStore) -> None:
    """Raise DataError naming the first array that breaks an invariant the kernels rely on."""
    root = graph.path
    for name, allowed in KERNEL_DTYPES.items():
        dtype = getattr(graph, name).dtype
        if dtype.name not in allowed:
            _fail(root, name, f"dtype {dtype} (expected {' or '.join(allowed)})")
    if graph.pin_edge_times is not None and graph.pin_edge_times.dtype != np.float64:
        _fail(root, "pin_edge_times", f"dtype {graph.pin_edge_times.dtype} (expected float64)")
    sides = (
        ("pin", graph.n_pins, "board", graph.n_boards),
        ("board", graph.n_boards, "pin", graph.n_pins),
    )
    for side, n_side, other, n_other in sides:
        offsets = getattr(graph, f"{side}_offsets")
        adj = getattr(graph, f"{side}_adj")
        _check_offsets(root, f"{side}_offsets", offsets, adj.shape[0])
        _check_range(root, f"{side}_adj", adj, n_other, f"{other} id")
        _check_locale_ends(
            root, f"{side}_locale_ends", getattr(graph, f"{side}_locale_ends"), np.diff(offsets)
        )
        _check_key_runs(root, side, graph, np.diff(offsets))
        _check_categories(root, graph, side)
        _check_ids(
            root,
            side,
            getattr(graph, f"{side}_ids"),
            getattr(graph, f"{side}_ids_sorted"),
            getattr(graph, f"{side}_ids_order"),
            n_side,
        )
    # Each side's lists must be the transpose of the other's: a pin reached through a board
    # then has boards to walk to (a zero-degree arrival would index past its empty list).
    for side, other, n_other in (("pin", "board", graph.n_boards), ("board", "pin", graph.n_pins)):
        arrivals = np.bincount(getattr(graph, f"{side}_adj"), minlength=n_other)
        degree = np.diff(getattr(graph, f"{other}_offsets"))
        differ = np.flatnonzero(arrivals != degree)
        if differ.size:
            i = int(differ[0])
            _fail(
                root,
                f"{side}_adj",
                f"{other} {i} appears {int(arrivals[i])} times but {other}_offsets.npy gives "
                f"it degree {int(degree[i])}; the two adjacency directions disagree",
            )
    pin_max = int(np.diff(graph.pin_offsets).max(initial=0))
    recorded = graph.manifest.get("degree", {}).get("pin_max")
    if recorded != pin_max:
        raise DataError(
            f"{root / 'manifest.json'}: degree.pin_max is {recorded!r} but the "
            f"largest pin degree in pin_offsets.npy is {pin_max}"
        )


def _fail(root: Path, name: str, problem: str) -> None:
    raise DataError(f"{root / (name + '.npy')}: {problem}; the graph is corrupt, rebuild it")


def _check_offsets(root: Path, name: str, offsets: np.ndarray, n_edges: int) -> None:
    if offsets[0] != 0:
        _fail(root, name, f"starts at {int(offsets[0])}, not 0")
    if offsets[-1] != n_edges:
        _fail(root, name, f"ends at {int(offsets[-1])}, not at the {n_edges} edges")
    falls = np.flatnonzero(offsets[1:] < offsets[:-1])
    if falls.size:
        _fail(root, name, f"decreases after row {int(falls[0])}")


def _check_range(root: Path, name: str, values: np.ndarray, bound: int, what: str) -> None:
    """Every value in [0, bound); the first one outside is named."""
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= bound:
        i = int(np.flatnonzero((values < 0) | (values >= bound))[0])
        _fail(root, name, f"{what} {int(values[i])} at position {i} is outside [0, {bound})")


def _check_locale_ends(root: Path, name: str, ends: np.ndarray, degree: np.ndarray) -> None:
    """Per row: locale ends never decrease and the last one is within the row's list."""
    if ends.shape[1] == 0:
        return
    falls = np.flatnonzero((ends[:, 1:] < ends[:, :-1]).any(axis=1))
    if falls.size:
        _fail(root, name, f"locale ends decrease in row {int(falls[0])}")
    past = np.flatnonzero(ends[:, -1] > degree)
    if past.size:
        i = int(past[0])
        _fail(
            root, name, f"row {i} ends at {int(ends[i, -1])}, past its {int(degree[i])} neighbours"
        )


def _check_key_runs(root: Path, side: str, graph: GraphStore, degree: np.ndarray) -> None:
    """A node's runs tile its list: ends rise to its degree, keys rise and are bias keys."""
    runs = getattr(graph, f"{side}_key_runs")
    run_offsets = getattr(graph, f"{side}_run_offsets")
    name = f"{side}_key_runs"
    if runs.ndim != 1:
        _fail(root, name, f"shape {runs.shape}, expected one dimension")
    _check_offsets(root, f"{side}_run_offsets", run_offsets, runs.shape[0])
    counts = np.diff(run_offsets)
    wrong = np.flatnonzero((counts == 0) != (degree == 0))
    if wrong.size:
        i = int(wrong[0])
        _fail(
            root,
            f"{side}_run_offsets",
            f"row {i} has {int(counts[i])} runs for {int(degree[i])} neighbours",
        )
    shift = graph.run_shift
    values = runs.astype(np.int64)
    ends, keys = values & ((1 << shift) - 1), values >> shift
    rows = np.repeat(np.arange(degree.shape[0]), counts)
    first = np.zeros(runs.shape[0], dtype=bool)
    first[run_offsets[:-1][counts > 0]] = True
    previous_end = np.concatenate(([0], ends[:-1]))
    previous_key = np.concatenate(([-1], keys[:-1]))
    bad = (ends <= np.where(first, 0, previous_end)) | (ends > degree[rows])
    bad |= ~first & (keys <= previous_key)
    bad |= (keys < 0) | (keys >= (graph.n_locales + 1) * (graph.n_topics + 1))
    last = np.flatnonzero(counts)
    bad[run_offsets[1:][last] - 1] |= ends[run_offsets[1:][last] - 1] != degree[last]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(
            root,
            name,
            f"run {i} (key {int(keys[i])}, end {int(ends[i])}) of row "
            f"{int(rows[i])} does not tile its {int(degree[rows[i]])} "
            f"neighbours in rising keys",
        )


def _check_categories(root: Path, graph: GraphStore, side: str) -> None:
    """Codes within their vocabularies (plus the 'missing' code) and keys derived from them."""
    locale = getattr(graph, f"{side}_locale")
    topic = getattr(graph, f"{side}_topic")
    _check_range(root, f"{side}_locale", locale, graph.n_locales + 1, "locale code")
    _check_range(root, f"{side}_topic", topic, graph.n_topics + 1, "topic code")
    key = getattr(graph, f"{side}_key")
    wrong = np.flatnonzero(key != locale * (graph.n_topics + 1) + topic)
    if wrong.size:
        _fail(
            root,
            f"{side}_key",
            f"bias key at position {int(wrong[0])} does not match its locale and topic codes",
        )


def _check_ids(
    root: Path, side: str, ids: np.ndarray, ids_sorted: np.ndarray, order: np.ndarray, n: int
) -> None:
    """The id index: order is in range, the sorted ids strictly increase and match ids[order]."""
    _check_range(root, f"{side}_ids_order", order, n, f"dense {side} id")
    if n > 1:
        falls = np.flatnonzero(ids_sorted[1:] <= ids_sorted[:-1])
        if falls.size:
            _fail(
                root,
                f"{side}_ids_sorted",
                f"not strictly increasing after position {int(falls[0])}",
            )
    if ids.dtype != ids_sorted.dtype or not np.array_equal(ids[order], ids_sorted):
        _fail(
            root,
            f"{side}_ids_sorted",
            f"does not match {side}_ids.npy in {side}_ids_order.npy's order",
        )
