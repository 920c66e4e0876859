"""Pixie walk throughput and latency, against a plain reference kernel timed in the same run.

    python benchmarks/walks.py            # "bench" graph: 1M pins, 200k boards, 20M edges
    python benchmarks/walks.py --quick    # "quick" graph: 100k pins, 2M edges, < 1 minute
    python benchmarks/walks.py --graph DIR [--requests FILE]   # your graph (and queries)
    python benchmarks/walks.py --json out.json

Measures, on one loaded graph: steps/s of the walk engine (validation, budget split, walks,
top-k: a whole request) on one thread and with two threads running queries concurrently;
per-query latency (p50/p99) of a query with N = 100,000 steps with and without early stopping
(the engine's default n_p / n_v), unbiased and biased (locale 0.5, locale+topic 0.8); direct (a
row per pin) vs hash visit counters; and, on the same query pins, the fast kernel alone and the
deliberately plain reference kernel (one walker, np.random, a counter per pin); and the same
full walks with a real-time delta holding 1% of the graph's edges (`walkrank.graph.delta`)
beside the graph, against the graph alone, query by query (`delta_throughput_ratio`). Early
stopping is judged by the steps it walks and the overlap of its top 100 (and top 500) with the
full walk of the same seed; the overlap of two full walks of different seeds says how much of
that top 100 is sampling noise at N steps, and the shortest prefix of the full walk (in tenths
of its steps) whose top 100 overlaps it by 0.8 says how few steps any stopping rule could walk
for that overlap. With --truth (a relevance case's `request_key, pin_id` pairs), recall@50 of
the early-stopped and the full walks' visit-count order, averaged over --recall-seeds walk
seeds, and the early stop's change with a 95% paired-bootstrap interval over requests. Queries
are 5 pins drawn by degree, or, with --requests, the `query_pins` ([{pin_id, weight}]) of every
line of a JSON-lines file (.gz too; --queries: the first ones). Figures are medians over
queries (latency percentiles over all queries), printed beside the machine's L3 size and the
bytes of the arrays the walks read: a graph that fits in L3 walks faster than one that does not.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import statistics
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from walkrank.graph.delta import MAX_BATCH_EDGES, DeltaSegment, Edge
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import ensure_graph
from walkrank.walks import WalkParams, kernels, walk
from walkrank.walks.engine import new_slice_cache, new_visit_table

REPO = Path(__file__).resolve().parent.parent
QUERY_PINS = 5
STEPS = 100_000
DELTA_SHARE = 0.01  # of the graph's edges, in the real-time delta
BOOTSTRAP = 2000  # resamples of the requests for the recall interval
RECALL_KEYS = (  # with --truth; None without
    "recall_seeds",
    "recall_at_50_full",
    "recall_at_50_early_stop",
    "recall_at_50_early_stop_change",
    "recall_at_50_early_stop_change_ci95",
)
Query = tuple[np.ndarray, np.ndarray]  # dense pin ids (-1: unknown), weights


class Timed(NamedTuple):
    seconds: np.ndarray
    steps: np.ndarray
    candidates: list[np.ndarray]


def l3_bytes() -> int | None:
    """The last-level (L3) cache of CPU 0 in bytes, from sysfs; None where it is not shown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def _queries(graph: GraphStore, n: int, seed: int) -> list[Query]:
    """Query pins drawn like engagement: proportional to degree, distinct within a query."""
    degree = np.diff(graph.pin_offsets).astype(np.float64)
    rng = np.random.default_rng(seed)
    p = degree / degree.sum()
    return [
        (
            rng.choice(graph.n_pins, QUERY_PINS, replace=False, p=p).astype(np.int32),
            np.ones(QUERY_PINS),
        )
        for _ in range(n)
    ]


def _request_queries(graph: GraphStore, path: Path, n: int | None) -> tuple[list[Query], list[str]]:
    """The first n (None: all) requests of a JSON-lines file whose query has a pin with boards,
    and their `request_key`s ("" where a request has none)."""
    degree = np.diff(graph.pin_offsets)
    queries: list[Query] = []
    keys: list[str] = []
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as lines:
        for number, line in enumerate(lines, 1):
            try:
                request = json.loads(line)
                query = request["query_pins"]
                ids = np.array([q["pin_id"] for q in query], dtype=object)
                weights = np.array([float(q["weight"]) for q in query])
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(
                    f"{path}:{number}: expected query_pins [{{pin_id, weight}}]: {exc!r}"
                ) from exc
            pins = graph.pin_index(ids)
            if (degree[pins[pins >= 0]] > 0).any():
                queries.append((pins, weights))
                keys.append(str(request.get("request_key", "")))
            if len(queries) == n:
                break
    if not queries:
        raise SystemExit(f"{path}: no request has a query pin in the graph")
    return queries, keys


def _read_truth(path: Path) -> dict[str, set[str]]:
    """`request_key, pin_id` rows of a CSV file (.gz too): each request's relevant pins."""
    truth: dict[str, set[str]] = {}
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as rows:
        reader = csv.DictReader(rows)
        if not {"request_key", "pin_id"} <= set(reader.fieldnames or ()):
            raise SystemExit(f"{path}: expected the columns request_key, pin_id")
        for row in reader:
            truth.setdefault(row["request_key"], set()).add(row["pin_id"])
    return truth


def _found_at_50(
    graph: GraphStore, candidates: list[np.ndarray], keys: list[str], truth: dict[str, set[str]]
) -> np.ndarray:
    """Per request: its truth pairs among its top 50."""
    return np.array(
        [
            len(truth.get(key, set()) & {str(p) for p in graph.pin_external(pins[:50]).tolist()})
            for pins, key in zip(candidates, keys, strict=True)
        ],
        np.float64,
    )


def _recall_change(
    graph: GraphStore,
    queries: list[Query],
    keys: list[str],
    truth: dict[str, set[str]],
    modes: dict[str, WalkParams],
    first: dict[str, Timed],
    seeds: int,
) -> dict[str, Any]:
    """Recall@50 (truth pairs in the requests' top 50 over all their truth pairs) of the full
    and early-stopped walks, each request's hits averaged over `seeds` walk seeds (`first`:
    the walks of seed 0), and the early stop's relative change with a 95% interval from a
    paired bootstrap over requests. One seed's change moves by a few percent on a hundred
    requests (its walks' sampling noise), so one seed cannot tell a 2% loss from noise."""
    found = {mode: _found_at_50(graph, first[mode].candidates, keys, truth) for mode in modes}
    for s in range(1, seeds):
        walks = _timed_walks(graph, queries, modes, seed=s * len(queries))
        for mode in modes:
            found[mode] += _found_at_50(graph, walks[mode].candidates, keys, truth)
    total = max(sum(len(truth.get(key, set())) for key in keys), 1) * seeds
    full, early = found["full"], found["early"]
    draws = np.random.default_rng(0).integers(0, len(keys), (BOOTSTRAP, len(keys)))
    changes = early[draws].sum(axis=1) / np.maximum(full[draws].sum(axis=1), 1) - 1
    return {
        "recall_seeds": seeds,
        "recall_at_50_full": float(full.sum() / total),
        "recall_at_50_early_stop": float(early.sum() / total),
        "recall_at_50_early_stop_change": float(early.sum() / max(full.sum(), 1) - 1),
        "recall_at_50_early_stop_change_ci95": np.percentile(changes, [2.5, 97.5]).tolist(),
    }


def _prefix_fraction(graph: GraphStore, queries: list[Query], full: Timed, at: float) -> float:
    """Median over queries of the shortest prefix of the full walk (0.1, 0.2, ... of its
    steps; 1 if none) whose top 100 overlaps the full walk's by `at`. A walk of N f steps with
    the full walk's seed is its prefix (the same random streams), so this is the fewest steps
    a stopping rule that knew each query's outcome would walk for that overlap."""
    needed = np.ones(len(queries))
    for tenths in range(9, 0, -1):
        params = WalkParams(steps=STEPS * tenths // 10, early_stop_pins=0)
        prefix = _timed_walks(graph, queries, {"prefix": params})["prefix"].candidates
        for i, (x, y) in enumerate(zip(prefix, full.candidates, strict=True)):
            if np.intersect1d(x[:100], y[:100]).size >= at * max(1, min(100, y.shape[0])):
                needed[i] = tenths / 10
    return float(np.median(needed))


def _first_pin(query: Query) -> int:
    """The query's first known pin: the user's locale and topic, the single-pin kernels."""
    pins = query[0]
    return int(pins[pins >= 0][0])


def _timed_walks(
    graph: GraphStore,
    queries: list[Query],
    modes: dict[str, WalkParams],
    counter: str = "auto",
    seed: int = 0,
) -> dict[str, Timed]:
    """Per mode: per-query seconds, steps walked and candidate pins (best first, top 500).

    The modes of one query run back to back, so a noisy neighbour slows them alike and their
    ratios hold. A biased walk's user has the locale and topic of the query's first pin, as a
    user's own pins mostly are.
    """
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    steps: dict[str, list[int]] = {mode: [] for mode in modes}
    candidates: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    for i, (pins, weights) in enumerate(queries):
        first = _first_pin((pins, weights))
        user = {
            "user_locale": int(graph.pin_locale[first]),
            "user_topic": int(graph.pin_topic[first]),
        }
        for mode, params in modes.items():
            started = time.perf_counter()
            result = walk(graph, pins, weights, params, seed=seed + i, counter=counter, **user)
            seconds[mode].append(time.perf_counter() - started)
            steps[mode].append(result.steps_walked)
            candidates[mode].append(result.pins[:500])
    return {
        mode: Timed(np.array(seconds[mode]), np.array(steps[mode]), candidates[mode])
        for mode in modes
    }


def _overlap(a: list[np.ndarray], b: list[np.ndarray], k: int) -> float:
    """Median over queries of |top k of a & top k of b| / min(k, len(top k of b))."""
    shares = [
        np.intersect1d(x[:k], y[:k]).size / max(1, min(k, y.shape[0]))
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.median(shares))


def _two_threads(graph: GraphStore, queries: list[Query], params: WalkParams) -> float:
    """Aggregate steps/s with two threads each walking half the queries concurrently."""

    def run(part: list[Query]) -> int:
        return sum(
            walk(graph, pins, weights, params, seed=i).steps_walked
            for i, (pins, weights) in enumerate(part)
        )

    halves = [queries[0::2], queries[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = time.perf_counter()
        total = sum(pool.map(run, halves))
        return total / (time.perf_counter() - started)


def _kernel(graph: GraphStore, queries: list[Query], alpha: float) -> np.ndarray:
    """Per-query steps/s of the fast kernel alone on the reference's work: N steps, one pin."""
    rates = []
    for i, query in enumerate(queries):
        table = new_visit_table(1 << 18)
        settings = kernels.WalkSettings(
            np.int32(_first_pin(query)),
            np.int32(0),
            np.int64(STEPS),
            np.uint64(alpha * 2**32),
            np.uint64(0),
            np.int32(-1),
            np.int32(0),
            np.int32(0),
            np.int64(0),
            np.int64(4),
            np.uint64(i),
        )
        visits = kernels.VisitTable(
            False,
            table,
            np.zeros(table.shape[0]),
            np.zeros(table.shape[0], np.int32),
            np.ones(1),
        )
        cancel = np.zeros(1, np.uint8)
        started = time.perf_counter()
        kernels.walk_query_pin(
            *graph.walk_arrays,
            *graph.delta_arrays,
            *settings,
            *visits,
            *new_slice_cache(False),
            cancel,
        )
        rates.append(STEPS / (time.perf_counter() - started))
    return np.array(rates)


def _reference(graph: GraphStore, queries: list[Query], alpha: float) -> np.ndarray:
    """Per-query steps/s of the plain kernel walking all N steps from each query's first pin."""
    rates = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        kernels.reference_walk(
            graph.pin_offsets,
            graph.pin_adj,
            graph.board_offsets,
            graph.board_adj,
            _first_pin(query),
            STEPS,
            alpha,
            i,
        )
        rates.append(STEPS / (time.perf_counter() - started))
    return np.array(rates)


def _with_delta(graph: GraphStore, seed: int) -> tuple[GraphStore, dict[str, float]]:
    """The graph with a real-time delta of DELTA_SHARE of its edges between existing pins and
    boards, each drawn by degree: new edges land where the walks go most, the slow case (more
    steps meet a node with delta edges). Returns it and what adding and publishing cost."""
    rng = np.random.default_rng(seed)
    n = int(graph.n_edges * DELTA_SHARE)
    pin_degree = np.diff(graph.pin_offsets).astype(np.float64)
    board_degree = np.diff(graph.board_offsets).astype(np.float64)
    pins = graph.pin_ids[rng.choice(graph.n_pins, n, p=pin_degree / pin_degree.sum())]
    boards = graph.board_ids[rng.choice(graph.n_boards, n, p=board_degree / board_degree.sum())]
    edges = [Edge(str(p), str(b)) for p, b in zip(pins.tolist(), boards.tolist(), strict=True)]
    warm = DeltaSegment(graph, max_edges=1, flush_s=3600.0)  # load the compiled kernels
    warm.add(edges[:1])
    warm.close()

    def fill() -> tuple[DeltaSegment, float, float]:
        started = time.perf_counter()
        segment = DeltaSegment(graph, max_edges=n, flush_s=3600.0)
        for at in range(0, n, MAX_BATCH_EDGES):
            segment.add(edges[at : at + MAX_BATCH_EDGES])
        added = time.perf_counter()
        segment.publish()
        segment.close()
        return segment, added - started, time.perf_counter() - added

    tracemalloc.start()  # slows allocations: a pass of its own for the memory
    counted = fill()[0]
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del counted
    segment, add_s, publish_s = fill()
    return segment.view(), {
        "delta_edges": segment.edges,
        "delta_add_edges_per_second": n / add_s,
        "delta_publish_seconds": publish_s,
        "delta_bytes_per_edge": memory / max(segment.edges, 1),
    }


def _delta_ratio(
    graph: GraphStore, live: GraphStore, queries: list[Query], params: WalkParams
) -> tuple[float, float, float]:
    """Median steps per CPU second of full walks on the graph alone and with the delta, and
    the median of the per-query ratios. Each query's two walks run back to back (same seed,
    twice, in alternating order) and are timed by the walking thread's CPU time, so a noisy
    neighbour's share of the cores does not count (on an idle machine it is the wall time)."""
    rates = np.zeros((2, len(queries)))
    for i, (pins, weights) in enumerate(queries):
        for which in (0, 1, 1, 0):
            started = time.thread_time()
            steps = walk((graph, live)[which], pins, weights, params, seed=i).steps_walked
            rates[which, i] += steps / (time.thread_time() - started) / 2
    base, delta = np.median(rates, axis=1)
    return float(base), float(delta), float(np.median(rates[1] / rates[0]))


def _walk_arrays(graph: GraphStore) -> list[np.ndarray]:
    """The arrays a walk reads (`GraphStore.walk_arrays` less its scalar run shift)."""
    return [value for value in graph.walk_arrays if isinstance(value, np.ndarray)]


def _page_in(graph: GraphStore) -> float:
    """Touch every adjacency page once so the first timed queries do not pay for disk reads."""
    started = time.perf_counter()
    for array in _walk_arrays(graph):
        np.add.reduce(array[:: max(1, 4096 // array.itemsize)])
    return time.perf_counter() - started


def run(
    graph_dir: Path | None,
    quick: bool,
    requests: Path | None,
    n_queries: int | None,
    seed: int,
    truth: Path | None = None,
    recall_seeds: int = 5,
) -> dict[str, Any]:
    preset = "quick" if quick else "bench"
    path = graph_dir or ensure_graph(preset, cache_dir=REPO / ".cache" / "graphs")
    started = time.perf_counter()
    graph = GraphStore.load(path)
    load_seconds = time.perf_counter() - started
    page_in_seconds = _page_in(graph)

    keys: list[str] = []
    if requests:
        queries, keys = _request_queries(graph, requests, n_queries)
    else:
        queries = _queries(graph, n_queries or (60 if quick or graph_dir else 200), seed)
    n = len(queries)
    no_stop = WalkParams(steps=STEPS, early_stop_pins=0)
    modes = {"full": no_stop, "early": WalkParams(steps=STEPS)}
    biased = graph.n_locales > 0
    if biased:
        modes["locale"] = WalkParams(steps=STEPS, early_stop_pins=0, bias_strength=0.5)
        modes["topic"] = WalkParams(
            steps=STEPS, early_stop_pins=0, bias_strength=0.8, bias_by="locale_topic"
        )
    _timed_walks(graph, queries[:3], modes)  # compile or load the cached kernels
    kernels.reference_walk(
        graph.pin_offsets,
        graph.pin_adj,
        graph.board_offsets,
        graph.board_adj,
        _first_pin(queries[0]),
        10,
        0.5,
        0,
    )

    timed = _timed_walks(graph, queries, modes)
    full, early = timed["full"], timed["early"]
    other_seed = _timed_walks(graph, queries, {"full": no_stop}, seed=len(queries))["full"]
    prefix_fraction = _prefix_fraction(graph, queries, full, 0.8)
    recall: dict[str, Any] = dict.fromkeys(RECALL_KEYS)
    if truth:
        ab = {"full": no_stop, "early": modes["early"]}
        recall = _recall_change(graph, queries, keys, _read_truth(truth), ab, timed, recall_seeds)
    two = statistics.median(_two_threads(graph, queries, no_stop) for _ in range(3))
    n_counter = min(n, 40)
    counters = {
        counter: _timed_walks(graph, queries[:n_counter], {"full": no_stop}, counter=counter)[
            "full"
        ].seconds
        for counter in ("direct", "hash")
    }
    live, delta_costs = _with_delta(graph, seed)
    _delta_ratio(graph, live, queries[:3], no_stop)  # compile or load the cached kernel
    base_rate, delta_rate, delta_ratio = _delta_ratio(graph, live, queries, no_stop)
    reference_queries = queries[: max(10, n // 5)]
    reference = _reference(graph, reference_queries, no_stop.restart_probability)
    kernel = _kernel(graph, reference_queries, no_stop.restart_probability)

    steps_per_second = float(np.median(full.steps / full.seconds))
    reference_rate = float(np.median(reference))
    walk_bytes = sum(array.nbytes for array in _walk_arrays(graph))

    def ms(seconds: np.ndarray, q: float) -> float:
        return float(np.percentile(seconds, q) * 1e3)

    return {
        "graph": graph_dir.name if graph_dir else preset,  # names only: no local paths
        "graph_pins": graph.n_pins,
        "graph_edges": graph.n_edges,
        "graph_walk_bytes": walk_bytes,
        "l3_bytes": l3_bytes(),
        "bytes_per_edge": float(graph.manifest["bytes_per_edge"]),
        "locale_index_bytes_per_edge": float(graph.manifest["locale_index_bytes_per_edge"]),
        "key_runs_bytes_per_edge": float(graph.manifest["key_runs_bytes_per_edge"]),
        "load_seconds": round(load_seconds, 4),
        "page_in_seconds": round(page_in_seconds, 3),
        "queries": n,
        "query_source": (
            f"{requests.parent.name}/{requests.name}"
            if requests
            else f"{QUERY_PINS} pins by degree"
        ),
        "steps": STEPS,
        "early_stop_pins": modes["early"].early_stop_pins,
        "early_stop_visits": modes["early"].early_stop_visits,
        "steps_per_second": steps_per_second,
        "two_thread_steps_per_second": two,
        "two_thread_scaling": two / steps_per_second,
        "reference_steps_per_second": reference_rate,
        "speedup": steps_per_second / reference_rate,
        "kernel_steps_per_second": float(np.median(kernel)),
        "kernel_speedup": float(np.median(kernel)) / reference_rate,
        "p50_ms": ms(full.seconds, 50),
        "p99_ms": ms(full.seconds, 99),
        "early_stop_p50_ms": ms(early.seconds, 50),
        "early_stop_p99_ms": ms(early.seconds, 99),
        "early_stop_step_fraction": float(np.median(early.steps / full.steps)),
        "early_stop_overlap_at_100": _overlap(early.candidates, full.candidates, 100),
        "early_stop_overlap_at_500": _overlap(early.candidates, full.candidates, 500),
        "full_walk_seed_overlap_at_100": _overlap(other_seed.candidates, full.candidates, 100),
        "prefix_fraction_for_overlap_80": prefix_fraction,
        **recall,
        "locale_bias_p50_ms": ms(timed["locale"].seconds, 50) if biased else None,
        "locale_bias_p99_ms": ms(timed["locale"].seconds, 99) if biased else None,
        "locale_topic_bias_p50_ms": ms(timed["topic"].seconds, 50) if biased else None,
        "locale_topic_bias_p99_ms": ms(timed["topic"].seconds, 99) if biased else None,
        "direct_counter_p50_ms": float(np.median(counters["direct"]) * 1e3),
        "hash_counter_p50_ms": float(np.median(counters["hash"]) * 1e3),
        **delta_costs,
        "delta_share": DELTA_SHARE,
        "delta_base_steps_per_second": base_rate,
        "delta_steps_per_second": delta_rate,
        "delta_throughput_ratio": delta_ratio,
    }


def _print(r: dict[str, Any]) -> None:
    l3 = f"{r['l3_bytes'] / 2**20:.0f} MiB" if r["l3_bytes"] else "unknown"
    print(
        f"graph {r['graph']}: {r['graph_pins']:,} pins, {r['graph_edges']:,} edges, "
        f"{r['bytes_per_edge']:.2f} bytes/edge (+{r['locale_index_bytes_per_edge']:.2f} locale "
        f"index, +{r['key_runs_bytes_per_edge']:.2f} key runs); "
        f"load {r['load_seconds'] * 1e3:.1f} ms, "
        f"page-in {r['page_in_seconds']:.2f} s"
    )
    print(f"walk arrays {r['graph_walk_bytes'] / 2**20:.0f} MiB, L3 cache {l3}")
    print(
        f"{r['queries']} queries ({r['query_source']}), N = {r['steps']:,} steps "
        "(medians over queries)"
    )
    base = r["p50_ms"]

    def bias(name: str) -> str:
        if r[f"{name}_p50_ms"] is None:
            return "n/a: the graph has no locales"
        return (
            f"p50 {r[f'{name}_p50_ms']:.2f} ms  p99 {r[f'{name}_p99_ms']:.2f} ms  "
            f"({r[f'{name}_p50_ms'] / base:.2f}x unbiased)"
        )

    rows = [
        ("engine, 1 thread", f"{r['steps_per_second'] / 1e6:.1f}M steps/s"),
        (
            "engine, 2 threads",
            f"{r['two_thread_steps_per_second'] / 1e6:.1f}M steps/s "
            f"({r['two_thread_scaling']:.2f}x one thread)",
        ),
        ("kernel alone, 1 pin", f"{r['kernel_steps_per_second'] / 1e6:.1f}M steps/s"),
        ("reference kernel, 1 pin", f"{r['reference_steps_per_second'] / 1e6:.1f}M steps/s"),
        (
            "speedup",
            f"engine {r['speedup']:.1f}x, kernel alone {r['kernel_speedup']:.1f}x the reference",
        ),
        ("latency, no early stop", f"p50 {base:.2f} ms  p99 {r['p99_ms']:.2f} ms"),
        (
            f"latency, early stop {r['early_stop_pins']}/{r['early_stop_visits']}",
            f"p50 {r['early_stop_p50_ms']:.2f} ms  p99 {r['early_stop_p99_ms']:.2f} ms  "
            f"({r['early_stop_step_fraction']:.0%} of the steps)",
        ),
        (
            "early stop vs full walk",
            f"top-100 overlap {r['early_stop_overlap_at_100']:.2f}, "
            f"top-500 {r['early_stop_overlap_at_500']:.2f} (two full "
            f"walks' top 100: {r['full_walk_seed_overlap_at_100']:.2f}); a prefix of "
            f"{r['prefix_fraction_for_overlap_80']:.0%} of the full walk overlaps it by 0.8",
        ),
        ("latency, locale bias 0.5", bias("locale_bias")),
        ("latency, locale+topic bias 0.8", bias("locale_topic_bias")),
        (
            "visit counter p50",
            f"direct {r['direct_counter_p50_ms']:.2f} ms  hash {r['hash_counter_p50_ms']:.2f} ms",
        ),
        (
            f"real-time delta, {r['delta_share']:.0%} of the edges",
            f"{r['delta_steps_per_second'] / 1e6:.1f}M steps/s vs "
            f"{r['delta_base_steps_per_second'] / 1e6:.1f}M without "
            f"({r['delta_throughput_ratio']:.2f}x); {r['delta_bytes_per_edge']:.0f} bytes/edge, "
            f"publish {r['delta_publish_seconds'] * 1e3:.0f} ms",
        ),
    ]
    if r["recall_at_50_full"] is not None:
        lo, hi = r["recall_at_50_early_stop_change_ci95"]
        rows.append(
            (
                f"recall@50, visit count, {r['recall_seeds']} seeds",
                f"early stop {r['recall_at_50_early_stop']:.4f}, full walk "
                f"{r['recall_at_50_full']:.4f}: {r['recall_at_50_early_stop_change']:+.1%} "
                f"(95% interval {lo:+.1%} to {hi:+.1%})",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help='"quick" graph, under a minute')
    parser.add_argument(
        "--graph",
        type=Path,
        metavar="DIR",
        help="a graph directory (walkrank graph build) instead of a preset",
    )
    parser.add_argument(
        "--requests",
        type=Path,
        metavar="FILE",
        help="JSON lines with query_pins [{pin_id, weight}] (.gz too): the "
        "queries, instead of 5 pins drawn by degree",
    )
    parser.add_argument(
        "--truth",
        type=Path,
        metavar="FILE",
        help="CSV (.gz too) of request_key, pin_id pairs for the --requests: recall@50 of the "
        "early-stopped and the full walks",
    )
    parser.add_argument(
        "--queries",
        type=int,
        help="queries per measurement (default: 200, 60 with --quick or "
        "--graph, every request with --requests)",
    )
    parser.add_argument(
        "--recall-seeds",
        type=int,
        default=5,
        help="with --truth: walk seeds each request's recall is averaged over (default 5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    if args.requests and not args.requests.is_file():
        parser.error(f"--requests {args.requests}: no such file")
    if args.truth and not (args.requests and args.truth.is_file()):
        parser.error(f"--truth {args.truth}: needs --requests and an existing file")
    if args.recall_seeds < 1:
        parser.error(f"--recall-seeds {args.recall_seeds}: expected an integer >= 1")
    result = run(
        args.graph,
        args.quick,
        args.requests,
        args.queries,
        args.seed,
        args.truth,
        args.recall_seeds,
    )
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
