"""Closed-loop relevance benchmark: does a tenant's trained ranker beat visit count on a case?

The whole loop a new user runs, through the real command line and server:

1. `walkrank graph build` of the train-phase graph (`edges_train`, `pins`);
2. `walkrank serve` with one tenant made from the shipped template
   `tenants/templates/own_data.yaml`; the train requests (shuffled by the seed) each ask for
   every candidate the tenant allows (`candidates.max_return`), as a client whose own ranker
   reads all of them; the truth pins among a request's returned candidates are reported with
   `ReportEvents` as saves (the template's `engagement` labels need no impressions: every
   other logged candidate is a negative);
3. `walkrank train` (with `--search` when asked) from the server's own candidate log;
4. `walkrank graph build` of the test-phase graph, `walkrank serve` of it with the trained
   model, the test requests asking for the top 100;
5. recall@50 and @100 over the test truth pairs of three orders: the ranker's (the served
   answer), visit count's (the same request's logged candidates by their walk score: what the
   server returns without a model) and popularity's (the test graph's most-connected pins,
   query pins excluded). Query pins never count as hits (the walk never returns them).

Each request carries the case's `request_time`, so ages and edge-time features are measured
from it and the log is stamped with it. `walkrank train` holds out the last 20% of requests
by request time, ties broken by request id: the cases give every request of a phase the same
time, so the held-out requests are the same for every seed. The seed shuffles the order the
train requests are sent in (one at a time) and, with the request's position, its walk seed;
the test requests go `--concurrency` at a time (docs/relevance.md).

    python benchmarks/relevance.py CASE_DIR [--json PATH] [--seed N] [--search] [--keep DIR]
                                   [--template TENANT.yaml] [--ranker NAME=VALUE ...]

`--template` replaces the shipped template with another tenant file named `own_data`;
`--ranker NAME=VALUE` overrides one setting of its `ranker` section (what a setting
contributes: e.g. the previous defaults, `--ranker trees=200 --ranker max_depth=6 ...`).

A case directory holds `edges_train.csv.gz`, `edges_test.csv.gz` (`pin_id, board_id,
created_at`), `pins.csv.gz` (`pin_id` + attributes), `requests_{train,test}.jsonl.gz` (one JSON
object a line: `request_key`, `user_id`, `interests`, `query_pins: [{pin_id, weight}]`) and
`truth_{train,test}.csv.gz` (`request_key, pin_id`). docs/relevance.md says where to get public
ones. `synthesize_case` writes a small generated one (the CI test runs the loop on it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from loadgen.harness import ServeProcess  # noqa: E402

TENANT = "own_data"
TEMPLATE = ROOT / "tenants" / "templates" / f"{TENANT}.yaml"
KS = (50, 100)
PHASES = ("train", "test")
EVENTS_PER_CALL = 5_000
IMPORTANCE_REQUESTS = 400
# The `walkrank` console script, run by this interpreter (no PATH lookup).
_ENTRY = "import sys; from walkrank.cli import main; sys.exit(main())"


# --- the case ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    key: str
    user_id: str
    interests: tuple[str, ...]
    pins: tuple[str, ...]
    weights: tuple[float, ...]
    time: float | None  # epoch seconds; None: the server's clock


def _epoch(value: str | None) -> float | None:
    """An ISO 8601 request time (naive means UTC) as epoch seconds."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def read_requests(path: Path) -> list[Request]:
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [
        Request(
            str(r["request_key"]),
            str(r.get("user_id", "")),
            tuple(str(t) for t in r.get("interests", ())),
            tuple(str(q["pin_id"]) for q in r["query_pins"]),
            tuple(float(q.get("weight", 1.0)) for q in r["query_pins"]),
            _epoch(r.get("request_time")),
        )
        for r in rows
    ]


def read_truth(path: Path) -> dict[str, set[str]]:
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={"request_key": "string", "pin_id": "string"}
        ),
    )
    truth: dict[str, set[str]] = {}
    for key, pin in zip(table["request_key"].to_pylist(), table["pin_id"].to_pylist(), strict=True):
        truth.setdefault(key, set()).add(pin)
    return truth


# --- running the product ----------------------------------------------------------------------


class Stages:
    """Wall time of each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 2)
            print(f"  {name}: {self.seconds[name]:.1f}s", flush=True)


def walkrank(args: Sequence[str], log: Path) -> int:
    """Run a `walkrank` command, its output appended to `log`; returns the exit code."""
    with open(log, "a") as out:
        out.write(f"\n$ walkrank {' '.join(args)}\n")
        out.flush()
        return subprocess.run(
            [sys.executable, "-c", _ENTRY, *args], stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode


def build_graph(case: Path, phase: str, out: Path, log: Path) -> None:
    code = walkrank(
        [
            "graph",
            "build",
            "--edges",
            str(case / f"edges_{phase}.csv.gz"),
            "--pins",
            str(case / "pins.csv.gz"),
            "--out",
            str(out),
        ],
        log,
    )
    if code != 0:
        raise RuntimeError(f"walkrank graph build ({phase}) exited {code}; see {log}")


def write_config(work: Path, graph: Path, logs: Path) -> Path:
    """A walkrank.yaml for the phase: its graph and log directory, the shared tenant and
    models. The log ring holds thousands of 2,000-candidate requests, so none is dropped."""
    path = work / f"walkrank_{logs.name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "graph": str(graph),
                "tenants_dir": str(work / "tenants"),
                "models_dir": str(work / "models"),
                "logs_dir": str(logs),
                "log_ring_mb": 256,
            }
        )
    )
    return path


def serve_requests(
    config: Path,
    requests: Sequence[Request],
    num_results: int,
    seed: int,
    concurrency: int,
    report: dict[str, set[str]] | None,
) -> dict[str, list[str]]:
    """Serve the phase (server output in the config's name with `.log`) and send its
    requests; returns each request's returned pin ids in order. With `report` (truth per
    request), the truth pins among the returned ones are reported as saves before the server
    stops (and flushes its logs)."""
    from walkrank_client import WalkRankClient

    server = ServeProcess(config, config.with_suffix(".log"))
    with server, WalkRankClient(server.target, timeout=60.0) as client:

        def ask(item: tuple[int, Request]) -> tuple[str, list[str]]:
            index, request = item
            answer = client.recommend(
                TENANT,
                list(request.pins),
                weights=list(request.weights),
                user_id=request.user_id,
                interests=list(request.interests),
                num_results=num_results,
                request_id=request.key,
                seed=seed * 1_000_003 + index,
                request_time=request.time,
            )
            return request.key, [c.pin_id for c in answer.candidates]

        with ThreadPoolExecutor(concurrency) as pool:
            returned = dict(pool.map(ask, enumerate(requests)))
        if report is not None:
            saves = [
                {"request_id": key, "pin_id": pin, "event": "save"}
                for key, pins in returned.items()
                for pin in pins
                if pin in report.get(key, ())
            ]
            for start in range(0, len(saves), EVENTS_PER_CALL):
                client.report_events(TENANT, saves[start : start + EVENTS_PER_CALL])
    return returned


def read_log(logs: Path) -> Any:
    from walkrank.logs.candidates import read_candidates

    return read_candidates(logs, TENANT)


# --- measuring -----------------------------------------------------------------------------------


def recall(orders: dict[str, Sequence[str]], truth: dict[str, set[str]], k: int) -> float:
    """Truth pairs found in a request's top k over all truth pairs of the phase."""
    total = sum(len(pins) for pins in truth.values())
    hits = sum(len(truth.get(key, set()).intersection(order[:k])) for key, order in orders.items())
    return hits / total if total else math.nan


def top_orders(log: Any, scores: np.ndarray, k: int) -> dict[str, list[str]]:
    """Each logged request's k best candidates by `scores` (aligned with the log's rows), ties
    in the walk's own order (the log keeps a request's candidates in walk order)."""
    codes = log["request_id"].combine_chunks().dictionary_encode()
    request = codes.indices.to_numpy()
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores), request))
    grouped = request[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    kept = order[position < k]
    keys = codes.dictionary.to_numpy(zero_copy_only=False)[request[kept]]
    pins = log["pin_id"].take(kept).to_pylist()
    out: dict[str, list[str]] = {}
    for key, pin in zip(keys, pins, strict=True):
        out.setdefault(key, []).append(pin)
    return out


def visit_count_orders(log: Any, k: int) -> dict[str, list[str]]:
    """Each request's logged candidates by walk score: what the server returns without a
    model."""
    return top_orders(log, log["visit_score"].to_numpy(), k)


def popularity_orders(graph: Path, requests: Sequence[Request], k: int) -> dict[str, list[str]]:
    """The graph's most-connected pins (board count), each request's query pins left out."""
    from walkrank.graph.store import GraphStore

    store = GraphStore.load(graph)
    degree = np.diff(np.asarray(store.pin_offsets))
    longest = k + max((len(r.pins) for r in requests), default=0)
    top = [str(p) for p in store.pin_external(np.argsort(-degree, kind="stable")[:longest])]
    return {r.key: [p for p in top if p not in frozenset(r.pins)][:k] for r in requests}


def feature_orders(log: Any, truth: dict[str, set[str]], k: int = 50) -> dict[str, float]:
    """Recall@k of each logged feature's own order (highest first) of the logged candidates:
    which single signal predicts the phase's truth, and how that changes between phases.
    Features constant within every request (the user's and the query's) order nothing."""
    import pyarrow.compute as pc

    columns = [c for c in log.column_names if c.startswith("f_")]
    spread = log.group_by("request_id").aggregate([(c, "min_max") for c in columns])
    return {
        column[2:]: round(recall(top_orders(log, log[column].to_numpy(), k), truth, k), 5)
        for column in columns
        if pc.any(
            pc.not_equal(
                pc.struct_field(spread[f"{column}_min_max"], "min"),
                pc.struct_field(spread[f"{column}_min_max"], "max"),
            )
        ).as_py()
    }


def coverage(log: Any, truth: dict[str, set[str]]) -> float:
    """Share of the truth pairs among their request's generated (logged) candidates: the most
    any order of the candidates can recall."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pairs = pc.binary_join_element_wise(log["request_id"], log["pin_id"], "\t")
    wanted = pa.array([f"{key}\t{pin}" for key, pins in truth.items() for pin in pins])
    found = pc.count_distinct(pairs.filter(pc.is_in(pairs, value_set=wanted))).as_py()
    return found / len(wanted) if len(wanted) else math.nan


def permutation_importance(
    models: Path, log: Any, truth: dict[str, set[str]], seed: int, k: int = 50
) -> dict[str, float]:
    """Ranker recall@k on (a sample of) the test log's requests, and its drop when one feature
    column is shuffled across rows: what the published model relies on."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from walkrank.model_registry import ModelRegistry
    from walkrank.ranking.scorer import Scorer

    loaded = ModelRegistry(models).load(TENANT)
    keys = sorted(set(log["request_id"].to_pylist()))
    keys = random.Random(seed).sample(keys, min(IMPORTANCE_REQUESTS, len(keys)))
    sample = log.filter(pc.is_in(log["request_id"], value_set=pa.array(keys)))
    names = list(loaded.feature_names)
    matrix = np.column_stack([sample[f"f_{n}"].to_numpy() for n in names]).astype(np.float32)
    scorer = Scorer.from_onnx(loaded.onnx_bytes, len(names))
    sampled_truth = {key: truth.get(key, set()) for key in keys}

    def recall_of(rows: np.ndarray) -> float:
        return recall(top_orders(sample, scorer.score(rows), k), sampled_truth, k)

    base = recall_of(matrix)
    rng = np.random.default_rng(seed)
    drops = {}
    for j, name in enumerate(names):
        shuffled = matrix.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        drops[name] = round(base - recall_of(shuffled), 5)
    return {
        "requests": len(keys),
        f"ranker_recall_at_{k}": round(base, 5),
        "drop_when_shuffled": dict(sorted(drops.items(), key=lambda kv: -kv[1])),
    }


def period_ceiling(
    tenant: Any, rounds: int, log: Any, truth: dict[str, set[str]], seed: int, k: int = 50
) -> dict[str, float]:
    """What the tenant's features can do without the shift from the logged period to the next:
    the same model (settings, rounds) trained on half of (a sample of) the test requests'
    own truth labels and measured on the other half, and the other way round; beside it the
    visit-count recall of the same requests. A diagnostic only: it learns from test labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from walkrank.ranking.fit import train_model
    from walkrank.training.pipeline import objective_for, request_groups, training_params

    keys = sorted(set(log["request_id"].to_pylist()))
    keys = random.Random(seed).sample(keys, min(IMPORTANCE_REQUESTS, len(keys)))
    folds = [keys[0::2], keys[1::2]]
    names = list(tenant.features)
    objective = objective_for(tenant, tenant.labels.strategy)
    params = {**training_params(tenant), "n_estimators": rounds, "early_stopping_rounds": 0}
    found = {"model": 0.0, "visit_count": 0.0}
    for train_keys, test_keys in (folds, folds[::-1]):
        parts = [
            log.filter(pc.is_in(log["request_id"], value_set=pa.array(part)))
            for part in (train_keys, test_keys)
        ]
        x = [
            np.column_stack([t[f"f_{n}"].to_numpy() for n in names]).astype(np.float32)
            for t in parts
        ]
        labels = np.array(
            [
                pin in truth.get(key, ())
                for key, pin in zip(
                    parts[0]["request_id"].to_pylist(), parts[0]["pin_id"].to_pylist(), strict=True
                )
            ],
            dtype=np.float32,
        )
        model = train_model(
            x[0],
            labels,
            objective=objective,
            groups=request_groups(parts[0]) if objective == "pairwise" else None,
            params=params,
            seed=seed,
        )
        held = {key: truth.get(key, set()) for key in test_keys}
        share = sum(map(len, held.values()))
        scores = {
            "model": model.booster.inplace_predict(x[1]),
            "visit_count": parts[1]["visit_score"].to_numpy(),
        }
        for name, values in scores.items():
            found[name] += recall(top_orders(parts[1], values, k), held, k) * share
    total = sum(len(truth.get(key, ())) for key in keys)
    return {
        "requests": len(keys),
        **{f"{name}_recall_at_{k}": round(hits / total, 5) for name, hits in found.items()},
    }


# --- the loop ------------------------------------------------------------------------------------


def run(
    case: Path,
    work: Path,
    *,
    seed: int = 0,
    search: bool = False,
    concurrency: int = 2,
    importance: bool = True,
    template: Path = TEMPLATE,
    ranker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The closed loop on one case in `work` (created) with the tenant file `template`, its
    ranker settings overridden by `ranker`; returns the figures."""
    case, work = case.resolve(), work.resolve()
    stages = Stages()
    log = work / "walkrank.log"
    (work / "tenants").mkdir(parents=True)
    raw = yaml.safe_load(template.read_text())
    raw.setdefault("ranker", {}).update(ranker or {})
    (work / "tenants" / f"{TENANT}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from walkrank.tenants import load_tenant

    tenant = load_tenant(work / "tenants" / f"{TENANT}.yaml")
    requests = {phase: read_requests(case / f"requests_{phase}.jsonl.gz") for phase in PHASES}
    truth = {phase: read_truth(case / f"truth_{phase}.csv.gz") for phase in PHASES}
    random.Random(seed).shuffle(requests["train"])

    graphs = {phase: work / f"graph_{phase}" for phase in PHASES}
    logs = {phase: work / f"logs_{phase}" for phase in PHASES}
    with stages("graph_train"):
        build_graph(case, "train", graphs["train"], log)
    with stages("serve_train"):
        serve_requests(
            write_config(work, graphs["train"], logs["train"]),
            requests["train"],
            tenant.candidates.max_return,
            seed,
            1,
            report=truth["train"],
        )
    with stages("train"):
        code = walkrank(
            [
                "train",
                "--tenant",
                TENANT,
                "--config",
                str(write_config(work, graphs["train"], logs["train"])),
                *(["--search"] if search else []),
            ],
            log,
        )
    if code not in (0, 1):  # 1: trained, refused to publish
        raise RuntimeError(f"walkrank train exited {code}; see {log}")
    with stages("graph_test"):
        build_graph(case, "test", graphs["test"], log)
    with stages("serve_test"):
        served = serve_requests(
            write_config(work, graphs["test"], logs["test"]),
            requests["test"],
            max(KS),
            seed,
            concurrency,
            report=None,
        )
    with stages("evaluate"):
        train_log, test_log = read_log(logs["train"]), read_log(logs["test"])
        visits = visit_count_orders(test_log, max(KS))
        popular = popularity_orders(graphs["test"], requests["test"], max(KS))
        metrics: dict[str, float] = {}
        for k in KS:
            figures = {
                "visit_count": recall(visits, truth["test"], k),
                "ranker": recall(served, truth["test"], k),
                "popularity": recall(popular, truth["test"], k),
            }
            for name, value in figures.items():
                metrics[f"{name}_recall_at_{k}"] = round(value, 5)
            for name in ("visit_count", "popularity"):
                lift = figures["ranker"] / figures[name] - 1 if figures[name] else math.nan
                metrics[f"lift_vs_{name}_at_{k}"] = round(lift, 4)
        metrics["lift_vs_visit_count"] = metrics["lift_vs_visit_count_at_50"]
        metrics["lift_vs_popularity"] = metrics["lift_vs_popularity_at_50"]
        published = code == 0
        result: dict[str, Any] = {
            "case": case.name,
            "seed": seed,
            "search": search,
            "published": published,
            "metrics": metrics,
            "candidate_coverage": {
                "train": round(coverage(train_log, truth["train"]), 5),
                "test": round(coverage(test_log, truth["test"]), 5),
            },
            # Each logged feature's own order: what predicts each phase (the period shift).
            "feature_orders_recall_at_50": {
                "train": feature_orders(train_log, truth["train"]),
                "test": feature_orders(test_log, truth["test"]),
            },
            "requests": {phase: len(requests[phase]) for phase in PHASES},
            "logged_requests": {
                "train": len(set(train_log["request_id"].to_pylist())),
                "test": len(set(test_log["request_id"].to_pylist())),
            },
            "truth_pairs": {phase: sum(map(len, truth[phase].values())) for phase in PHASES},
            "template": _shown(template),
            "ranker_overrides": dict(ranker or {}),
            "ranker": tenant.to_dict()["ranker"],
        }
        if published:
            from walkrank.model_registry import ModelRegistry

            metadata = ModelRegistry(work / "models").load(TENANT).metadata
            result["training"] = {
                "rows": metadata["rows"],
                "label_stats": metadata["label_stats"],
                "train_metrics": metadata["train_metrics"],
                "held_out": metadata["comparison"]["metrics"],
                "searched": len(metadata.get("search", [])) or None,
            }
            if importance:
                result["importance"] = permutation_importance(
                    work / "models", test_log, truth["test"], seed
                )
                result["period_ceiling"] = period_ceiling(
                    tenant, int(metadata["train_metrics"]["rounds"]), test_log, truth["test"], seed
                )
        else:
            refused = [
                line for line in log.read_text().splitlines() if "refusing to publish" in line
            ]
            result["refused"] = refused[-1] if refused else None
    result["seconds"] = {**stages.seconds, "total": round(sum(stages.seconds.values()), 2)}
    return result


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it (results stay machine-independent)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- a small generated case ----------------------------------------------------------------------


def synthesize_case(
    out: Path,
    *,
    seed: int = 0,
    n_users: int = 160,
    n_items: int = 500,
    n_topics: int = 6,
    actions_per_user: int = 40,
) -> Path:
    """A small case in the data contract: users with two favourite topics interact with items
    over 300 days, mostly within their topics and by the items' popularity; boards are
    `user:topic`; T1, T2, T3 = days 200, 250, 300. Popularity and the user's topics both matter,
    as in real data, so a ranker has something to learn beyond the walk."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    day = 86_400
    start = 946_684_800  # 2000-01-01
    t1, t2, t3 = 200, 250, 300
    item_topic = rng.integers(0, n_topics, n_items)
    popularity = rng.pareto(1.2, n_items) + 0.05
    quality = np.round(rng.uniform(1, 5, n_items), 2)
    events = []  # (user, item, day)
    for user in range(n_users):
        favourites = rng.choice(n_topics, 2, replace=False)
        for _ in range(rng.poisson(actions_per_user)):
            topic = rng.choice(favourites) if rng.random() < 0.8 else rng.integers(n_topics)
            pool = np.flatnonzero(item_topic == topic)
            weight = popularity[pool]
            events.append(
                (user, int(rng.choice(pool, p=weight / weight.sum())), float(rng.uniform(0, t3)))
            )
    events.sort(key=lambda e: e[2])
    first: dict[tuple[int, int], float] = {}
    for user, item, when in events:
        first.setdefault((user, item), when)

    with gzip.open(out / "pins.csv.gz", "wt") as handle:
        handle.write("pin_id,topic,quality\n")
        handle.writelines(f"{i},t{item_topic[i]},{quality[i]}\n" for i in range(n_items))
    for phase, (cut, end) in {"train": (t1, t2), "test": (t2, t3)}.items():
        with gzip.open(out / f"edges_{phase}.csv.gz", "wt") as handle:
            handle.write("pin_id,board_id,created_at\n")
            for (user, item), when in first.items():
                if when < cut:
                    handle.write(f"{item},{user}:t{item_topic[item]},{start + int(when * day)}\n")
        requests, truth = [], []
        for user in range(n_users):
            before = sorted(
                ((w, i) for (u, i), w in first.items() if u == user and w < cut), reverse=True
            )
            new = sorted(i for (u, i), w in first.items() if u == user and cut <= w < end)
            if len(before) < 3 or not new:
                continue
            key = f"synthetic-{phase}-{user}"
            topics = [
                f"t{t}"
                for t in np.bincount(
                    item_topic[[i for _, i in before]], minlength=n_topics
                ).argsort()[::-1][:3]
            ]
            requests.append(
                {
                    "request_key": key,
                    "user_id": str(user),
                    "request_time": datetime.fromtimestamp(start + cut * day, UTC)
                    .replace(tzinfo=None)
                    .isoformat(),
                    "interests": topics,
                    "query_pins": [
                        {"pin_id": str(i), "weight": round(math.exp(-(cut - w) / 180) + 0.05, 4)}
                        for w, i in before[:10]
                    ],
                }
            )
            truth.extend((key, i) for i in new)
        with gzip.open(out / f"requests_{phase}.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in requests)
        with gzip.open(out / f"truth_{phase}.csv.gz", "wt") as handle:
            handle.write("request_key,pin_id\n")
            handle.writelines(f"{key},{pin}\n" for key, pin in truth)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", type=Path, help="case directory (see the module docstring)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    parser.add_argument(
        "--seed", type=int, default=0, help="walk seeds and request order (default 0)"
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="train with `walkrank train --search` (the template's ranker.search grid)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="test requests in flight at once (default 2; train requests go one at a time)",
    )
    parser.add_argument(
        "--no-importance",
        action="store_true",
        help="skip the diagnostics: the permutation importance of the model's "
        "features and the in-period ceiling",
    )
    parser.add_argument(
        "--template",
        type=Path,
        default=TEMPLATE,
        help=f"tenant file named {TENANT!r} (default: the shipped template)",
    )
    parser.add_argument(
        "--ranker",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one ranker setting of the tenant file (repeatable)",
    )
    parser.add_argument(
        "--keep", type=Path, help="work in this directory (must not exist) and keep it"
    )
    args = parser.parse_args(argv)
    if not (args.case / "edges_train.csv.gz").is_file():
        parser.error(f"{args.case}: not a case directory (no edges_train.csv.gz)")
    overrides = {}
    for item in args.ranker:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--ranker {item}: expected NAME=VALUE")
        overrides[name] = yaml.safe_load(value)
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists")
    with tempfile.TemporaryDirectory(prefix="walkrank-relevance-") as tmp:
        work = args.keep or Path(tmp) / "work"
        print(
            f"{args.case.name}, seed {args.seed}{' (search)' if args.search else ''}: "
            f"working in {work}",
            flush=True,
        )
        result = run(
            args.case,
            work,
            seed=args.seed,
            search=args.search,
            concurrency=args.concurrency,
            importance=not args.no_importance,
            template=args.template,
            ranker=overrides,
        )
    print(json.dumps(result["metrics"], indent=2))
    print(f"published: {result['published']}; seconds: {result['seconds']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
