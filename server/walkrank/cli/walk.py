"""`walkrank walk`: run one Pixie walk on a graph directory and print its candidates."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from walkrank.errors import DataError
from walkrank.graph.store import GraphStore
from walkrank.walks.engine import WalkParams, WalkResult, walk

_DEFAULTS = WalkParams()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "walk", help="Pixie walk from query pins; prints the top candidates and their features"
    )
    parser.add_argument("--graph", required=True, help="graph directory")
    parser.add_argument(
        "--pins",
        required=True,
        metavar="ID[,ID...]",
        help="external query pin ids, comma separated",
    )
    parser.add_argument(
        "--weights", metavar="W[,W...]", help="one weight per query pin (default: all 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=_DEFAULTS.steps,
        help=f"total step budget N (default {_DEFAULTS.steps:,})",
    )
    parser.add_argument(
        "--restart",
        type=float,
        default=_DEFAULTS.restart_probability,
        help="restart probability alpha (default %(default)s)",
    )
    parser.add_argument(
        "--early-stop-pins",
        type=int,
        default=_DEFAULTS.early_stop_pins,
        metavar="N_P",
        help="stop a query pin's walk once more than N_P pins "
        "reached --early-stop-visits visits; 0 = off (default %(default)s)",
    )
    parser.add_argument(
        "--early-stop-visits",
        type=int,
        default=_DEFAULTS.early_stop_visits,
        metavar="N_V",
        help="(default %(default)s)",
    )
    parser.add_argument("--locale", help="user locale to bias toward (a graph locale name)")
    parser.add_argument("--topic", help="user topic, used with --bias-by locale_topic")
    parser.add_argument(
        "--bias",
        type=float,
        default=_DEFAULTS.bias_strength,
        help="bias strength in [0, 1] (default %(default)s)",
    )
    parser.add_argument(
        "--bias-by",
        choices=("locale", "locale_topic"),
        default=_DEFAULTS.bias_by,
        help="(default %(default)s)",
    )
    parser.add_argument("--top", type=int, default=20, help="candidates to print (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_walk)


def _parse_weights(text: str | None, n_pins: int) -> np.ndarray:
    if text is None:
        return np.ones(n_pins, np.float32)
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != n_pins:
        raise DataError(f"--weights has {len(parts)} values but --pins has {n_pins}")
    try:
        return np.array([float(p) for p in parts], np.float32)
    except ValueError as exc:
        raise DataError(f"--weights: {exc}") from exc


def _vocab_code(graph: GraphStore, kind: str, name: str | None) -> int:
    if name is None:
        return -1
    vocab = graph.locales if kind == "locale" else graph.topics
    code = graph.locale_code(name) if kind == "locale" else graph.topic_code(name)
    if code == len(vocab):
        print(
            f"walkrank: note: {kind} {name!r} is not in the graph's {kind}s "
            f"({', '.join(vocab) or 'none'}); it does not bias the walk",
            file=sys.stderr,
        )
    return code


def _walk(args: argparse.Namespace) -> int:
    graph = GraphStore.load(args.graph)
    external = [p.strip() for p in args.pins.split(",") if p.strip()]
    if not external:
        raise DataError("--pins: no pin ids given")
    weights = _parse_weights(args.weights, len(external))
    params = WalkParams(
        steps=args.steps,
        restart_probability=args.restart,
        early_stop_pins=args.early_stop_pins,
        early_stop_visits=args.early_stop_visits,
        bias_strength=args.bias,
        bias_by=args.bias_by,
        max_candidates=max(args.top, 1),
    )
    dense = graph.pin_index(external)
    started = time.perf_counter()
    result = walk(
        graph,
        dense,
        weights,
        params,
        user_locale=_vocab_code(graph, "locale", args.locale),
        user_topic=_vocab_code(graph, "topic", args.topic),
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    unknown = [external[i] for i in result.unknown]
    if args.json:
        print(json.dumps(_as_json(graph, result, unknown, seconds), indent=2))
    else:
        _print_table(graph, result, unknown, external, seconds)
    return 0


def _candidates(graph: GraphStore, result: WalkResult) -> list[dict[str, Any]]:
    ids = graph.pin_external(result.pins).tolist()
    return [
        {
            "pin": pin,
            "score": float(score),
            "visits": int(visits),
            "query_hits": int(hits),
            "degree": int(degree),
        }
        for pin, score, visits, hits, degree in zip(
            ids, result.scores, result.visits, result.query_hits, result.degree, strict=True
        )
    ]


def _as_json(
    graph: GraphStore, result: WalkResult, unknown: list[str], seconds: float
) -> dict[str, Any]:
    return {
        "candidates": _candidates(graph, result),
        "unknown": unknown,
        "steps_walked": result.steps_walked,
        "steps_per_query": result.steps_per_query.tolist(),
        "empty_reason": result.empty_reason,
        "walk_ms": round(seconds * 1e3, 3),
    }


def _print_table(
    graph: GraphStore, result: WalkResult, unknown: list[str], external: list[str], seconds: float
) -> None:
    budget = ", ".join(
        f"{pin}: {steps:,}"
        for pin, steps in zip(external, result.steps_per_query.tolist(), strict=True)
    )
    print(f"walked {result.steps_walked:,} steps in {seconds * 1e3:.1f} ms ({budget})")
    if unknown:
        print(f"unknown pins (ignored): {', '.join(unknown)}")
    if result.empty_reason:
        print(f"no candidates: {result.empty_reason}")
        return
    rows = _candidates(graph, result)
    width = max(len(str(row["pin"])) for row in rows)
    print(
        f"{'rank':>4}  {'pin':>{width}}  {'score':>10}  {'visits':>7}  {'query_hits':>10}  "
        f"{'degree':>6}"
    )
    for rank, row in enumerate(rows, 1):
        print(
            f"{rank:>4}  {row['pin']!s:>{width}}  {row['score']:>10.1f}  {row['visits']:>7}  "
            f"{row['query_hits']:>10}  {row['degree']:>6}"
        )
