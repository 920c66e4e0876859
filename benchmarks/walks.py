"""Pixie walk throughput and latency, against a plain reference kernel timed in the same run.

    python benchmarks/walks.py            # "bench" graph: 1M pins, 200k boards, 20M edges
    python benchmarks/walks.py --quick    # "quick" graph: 100k pins, 2M edges, < 1 minute
    python benchmarks/walks.py --json out.json

Measures, on one loaded graph: steps/s of the walk engine (validation, budget split, walks,
top-k: a whole request) on one thread and with two threads running queries concurrently;
per-query latency (p50/p99) of a 5-pin query with N = 100,000 steps with and without early
stopping, unbiased and biased (locale 0.5, locale+topic 0.8); dense vs hash visit counters;
and, on the same query pins, the fast kernel alone and the deliberately plain reference
kernel (one walker, np.random, a dense counter).
Figures are medians over queries (latency percentiles over all queries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import ensure_graph
from walkrank.walks import WalkParams, kernels, walk
from walkrank.walks.engine import new_visit_table

REPO = Path(__file__).resolve().parent.parent
QUERY_PINS = 5
STEPS = 100_000


def _queries(graph: GraphStore, n: int, seed: int) -> list[np.ndarray]:
    """Query pins drawn like engagement: proportional to degree, distinct within a query."""
    degree = np.diff(graph.pin_offsets).astype(np.float64)
    rng = np.random.default_rng(seed)
    p = degree / degree.sum()
    return [rng.choice(graph.n_pins, QUERY_PINS, replace=False, p=p).astype(np.int32)
            for _ in range(n)]


def _timed_walks(graph: GraphStore, queries: list[np.ndarray], params: WalkParams,
                 counter: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Per-query seconds and steps walked. A biased walk's user has the locale and topic of
    the query's first pin, as a user's own pins mostly are."""
    weights = np.ones(QUERY_PINS, np.float32)
    seconds, steps = [], []
    for i, query in enumerate(queries):
        user = {"user_locale": int(graph.pin_locale[query[0]]),
                "user_topic": int(graph.pin_topic[query[0]])}
        started = time.perf_counter()
        result = walk(graph, query, weights, params, seed=i, counter=counter, **user)
        seconds.append(time.perf_counter() - started)
        steps.append(result.steps_walked)
    return np.array(seconds), np.array(steps)


def _two_threads(graph: GraphStore, queries: list[np.ndarray], params: WalkParams) -> float:
    """Aggregate steps/s with two threads each walking half the queries concurrently."""
    weights = np.ones(QUERY_PINS, np.float32)

    def run(part: list[np.ndarray]) -> int:
        return sum(walk(graph, q, weights, params, seed=i).steps_walked
                   for i, q in enumerate(part))

    halves = [queries[0::2], queries[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = time.perf_counter()
        total = sum(pool.map(run, halves))
        return total / (time.perf_counter() - started)


def _kernel(graph: GraphStore, queries: list[np.ndarray], alpha: float) -> np.ndarray:
    """Per-query steps/s of the fast kernel alone on the reference's work: N steps, one pin."""
    rates = []
    for i, query in enumerate(queries):
        table = new_visit_table(1 << 18)
        started = time.perf_counter()
        kernels.walk_query_pin(
            graph.pin_offsets, graph.pin_adj, graph.board_offsets, graph.board_adj,
            graph.pin_key, graph.board_key, graph.pin_locale_ends, graph.board_locale_ends,
            np.int32(query[0]), np.int32(0), np.int64(STEPS), np.uint64(alpha * 2**32),
            np.uint64(0), np.int32(-1), np.int32(0), np.int32(0), np.int64(0),
            np.int64(4), np.uint64(i), False, table, np.zeros(table.shape[0]),
            np.zeros(table.shape[0], np.int32), np.ones(1), np.zeros(1, np.uint8),
        )
        rates.append(STEPS / (time.perf_counter() - started))
    return np.array(rates)


def _reference(graph: GraphStore, queries: list[np.ndarray], alpha: float) -> np.ndarray:
    """Per-query steps/s of the plain kernel walking all N steps from each query's first pin."""
    rates = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        kernels.reference_walk(graph.pin_offsets, graph.pin_adj, graph.board_offsets,
                               graph.board_adj, int(query[0]), STEPS, alpha, i)
        rates.append(STEPS / (time.perf_counter() - started))
    return np.array(rates)


def _page_in(graph: GraphStore) -> float:
    """Touch every adjacency page once so the first timed queries do not pay for disk reads."""
    started = time.perf_counter()
    for name in ("pin_offsets", "pin_adj", "board_offsets", "board_adj", "pin_key", "board_key",
                 "pin_locale_ends", "board_locale_ends"):
        array = getattr(graph, name)
        np.add.reduce(array[:: max(1, 4096 // array.itemsize)])
    return time.perf_counter() - started


def run(quick: bool, n_queries: int | None, seed: int) -> dict[str, Any]:
    preset = "quick" if quick else "bench"
    path = ensure_graph(preset, cache_dir=REPO / ".cache" / "graphs")
    started = time.perf_counter()
    graph = GraphStore.load(path)
    load_seconds = time.perf_counter() - started
    page_in_seconds = _page_in(graph)

    n = n_queries or (60 if quick else 200)
    queries = _queries(graph, n, seed)
    no_stop = WalkParams(steps=STEPS, early_stop_pins=0)
    early = WalkParams(steps=STEPS)
    _timed_walks(graph, queries[:3], no_stop)  # compile or load the cached kernels
    kernels.reference_walk(graph.pin_offsets, graph.pin_adj, graph.board_offsets,
                           graph.board_adj, int(queries[0][0]), 10, 0.5, 0)

    seconds, steps = _timed_walks(graph, queries, no_stop)
    es_seconds, es_steps = _timed_walks(graph, queries, early)
    locale_s, _ = _timed_walks(graph, queries, WalkParams(steps=STEPS, early_stop_pins=0,
                                                          bias_strength=0.5))
    topic_s, _ = _timed_walks(graph, queries, WalkParams(steps=STEPS, early_stop_pins=0,
                                                         bias_strength=0.8,
                                                         bias_by="locale_topic"))
    two = statistics.median(_two_threads(graph, queries, no_stop) for _ in range(3))
    n_counter = min(n, 40)
    dense_s, _ = _timed_walks(graph, queries[:n_counter], no_stop, counter="dense")
    hash_s, _ = _timed_walks(graph, queries[:n_counter], no_stop, counter="hash")
    reference_queries = queries[: max(10, n // 5)]
    reference = _reference(graph, reference_queries, no_stop.restart_probability)
    kernel = _kernel(graph, reference_queries, no_stop.restart_probability)

    steps_per_second = float(np.median(steps / seconds))
    reference_rate = float(np.median(reference))
    return {
        "graph": preset,
        "graph_pins": graph.n_pins,
        "graph_edges": graph.n_edges,
        "bytes_per_edge": float(graph.manifest["bytes_per_edge"]),
        "locale_index_bytes_per_edge": float(graph.manifest["locale_index_bytes_per_edge"]),
        "load_seconds": round(load_seconds, 4),
        "page_in_seconds": round(page_in_seconds, 3),
        "queries": n,
        "query_pins": QUERY_PINS,
        "steps": STEPS,
        "steps_per_second": steps_per_second,
        "two_thread_steps_per_second": two,
        "two_thread_scaling": two / steps_per_second,
        "reference_steps_per_second": reference_rate,
        "speedup": steps_per_second / reference_rate,
        "kernel_steps_per_second": float(np.median(kernel)),
        "kernel_speedup": float(np.median(kernel)) / reference_rate,
        "p50_ms": float(np.percentile(seconds, 50) * 1e3),
        "p99_ms": float(np.percentile(seconds, 99) * 1e3),
        "early_stop_p50_ms": float(np.percentile(es_seconds, 50) * 1e3),
        "early_stop_p99_ms": float(np.percentile(es_seconds, 99) * 1e3),
        "early_stop_step_fraction": float(np.median(es_steps / steps)),
        "locale_bias_p50_ms": float(np.percentile(locale_s, 50) * 1e3),
        "locale_bias_p99_ms": float(np.percentile(locale_s, 99) * 1e3),
        "locale_topic_bias_p50_ms": float(np.percentile(topic_s, 50) * 1e3),
        "locale_topic_bias_p99_ms": float(np.percentile(topic_s, 99) * 1e3),
        "dense_counter_p50_ms": float(np.median(dense_s) * 1e3),
        "hash_counter_p50_ms": float(np.median(hash_s) * 1e3),
    }


def _print(r: dict[str, Any]) -> None:
    print(f"graph {r['graph']}: {r['graph_pins']:,} pins, {r['graph_edges']:,} edges, "
          f"{r['bytes_per_edge']:.2f} bytes/edge (+{r['locale_index_bytes_per_edge']:.2f} locale "
          f"index); load {r['load_seconds'] * 1e3:.1f} ms, "
          f"page-in {r['page_in_seconds']:.2f} s")
    print(f"{r['queries']} queries of {r['query_pins']} pins, N = {r['steps']:,} steps "
          "(medians over queries)")
    rows = [
        ("engine, 1 thread", f"{r['steps_per_second'] / 1e6:.1f}M steps/s"),
        ("engine, 2 threads", f"{r['two_thread_steps_per_second'] / 1e6:.1f}M steps/s "
                              f"({r['two_thread_scaling']:.2f}x one thread)"),
        ("kernel alone, 1 pin", f"{r['kernel_steps_per_second'] / 1e6:.1f}M steps/s"),
        ("reference kernel, 1 pin", f"{r['reference_steps_per_second'] / 1e6:.1f}M steps/s"),
        ("speedup", f"engine {r['speedup']:.1f}x, kernel alone "
                    f"{r['kernel_speedup']:.1f}x the reference"),
        ("latency, no early stop", f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"),
        ("latency, early stop", f"p50 {r['early_stop_p50_ms']:.2f} ms  "
                                f"p99 {r['early_stop_p99_ms']:.2f} ms  "
                                f"({r['early_stop_step_fraction']:.0%} of the steps)"),
        ("latency, locale bias 0.5", f"p50 {r['locale_bias_p50_ms']:.2f} ms  "
                                     f"p99 {r['locale_bias_p99_ms']:.2f} ms  "
                                     f"({r['locale_bias_p50_ms'] / r['p50_ms']:.2f}x unbiased)"),
        ("latency, locale+topic bias 0.8", f"p50 {r['locale_topic_bias_p50_ms']:.2f} ms  "
                                           f"p99 {r['locale_topic_bias_p99_ms']:.2f} ms  "
                                           f"({r['locale_topic_bias_p50_ms'] / r['p50_ms']:.2f}x "
                                           "unbiased)"),
        ("visit counter p50", f"dense {r['dense_counter_p50_ms']:.2f} ms  "
                              f"hash {r['hash_counter_p50_ms']:.2f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help='"quick" graph, under a minute')
    parser.add_argument("--queries", type=int, help="queries per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    result = run(args.quick, args.queries, args.seed)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
