"""Markdown tables of the benchmarks' JSON results, so no figure in the docs is typed by hand.

Relevance: every `benchmarks/results/relevance/*.json` (written by `benchmarks/relevance.py
--json`) gives a summary per case and configuration (mean and range over seeds), a row per
run, the diagnostics of the template's runs (truth pairs among the candidates, the
features the model relies on, the in-period ceiling, the fit) and each phase's best
single-feature orders. Performance:
`benchmarks/results/{walks,scoring,serving,replicas,graph_build}.json` (each benchmark's `--json`)
give one table each. With `--write FILE` it replaces the text between `<!-- NAME -->` and
`<!-- /NAME -->` for every table whose markers FILE has (relevance:summary, relevance:runs,
relevance:diagnostics, relevance:feature_orders, performance:walks, performance:scoring,
performance:serving, performance:replicas, performance:graph_build); otherwise it prints the
tables.

    python benchmarks/tables.py [--results DIR] [--write docs/relevance.md]
    python benchmarks/tables.py --write docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "relevance"


def load(results: Path) -> list[dict[str, Any]]:
    runs = [json.loads(path.read_text()) for path in sorted(results.glob("*.json"))]
    return sorted(runs, key=lambda r: (r["case"], configuration(r), r["seed"]))


def configuration(run: dict[str, Any]) -> str:
    """What was trained: the tenant file, its ranker overrides, and --search."""
    name = Path(run["template"]).stem
    name = "template" if name == "own_data" else name
    overrides = run.get("ranker_overrides") or {}
    if overrides:
        name += " with " + ", ".join(f"{k} {v}" for k, v in overrides.items())
    return name + (" --search" if run["search"] else "")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.0f}%"


def _range(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return _pct(mean)
    return f"{_pct(mean)} ({_pct(min(values))} to {_pct(max(values))})"


def summary_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| case | configuration | seeds | published | recall@50 visit count / ranker / "
        "popularity (mean) | ranker lift vs visit count @50 | vs popularity @50 | "
        "ranker lift vs visit count @100 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["case"], configuration(run)), []).append(run)
    for (case, config), group in groups.items():
        m = [r["metrics"] for r in group]
        means = " / ".join(
            f"{statistics.fmean(x[f'{name}_recall_at_50'] for x in m):.4f}"
            for name in ("visit_count", "ranker", "popularity")
        )
        lines.append(
            f"| {case} | {config} | {', '.join(str(r['seed']) for r in group)} | "
            f"{sum(r['published'] for r in group)} of {len(group)} | {means} | "
            f"{_range([x['lift_vs_visit_count_at_50'] for x in m])} | "
            f"{_range([x['lift_vs_popularity_at_50'] for x in m])} | "
            f"{_range([x['lift_vs_visit_count_at_100'] for x in m])} |"
        )
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| case | configuration | seed | published | R@50 visit count | R@50 ranker | "
        "R@50 popularity | R@100 visit count | R@100 ranker | R@100 popularity | "
        "truth in candidates (test) | seconds (train step / total) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        m = run["metrics"]
        figures = " | ".join(
            f"{m[f'{name}_recall_at_{k}']:.4f}"
            for k in (50, 100)
            for name in ("visit_count", "ranker", "popularity")
        )
        lines.append(
            f"| {run['case']} | {configuration(run)} | {run['seed']} | "
            f"{'yes' if run['published'] else 'no'} | {figures} | "
            f"{run['candidate_coverage']['test']:.3f} | "
            f"{run['seconds']['train']:.0f} / {run['seconds']['total']:.0f} |"
        )
    return "\n".join(lines)


def diagnostics_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| case | seed | truth pairs among candidates (train / test) | features the model "
        "relies on (recall@50 lost when shuffled) | in-period ceiling: model / visit "
        "count recall@50 | rounds kept, fit on training / held-out rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if configuration(run) != "template" or not run.get("importance"):
            continue
        coverage = run["candidate_coverage"]
        drops = list(run["importance"]["drop_when_shuffled"].items())[:3]
        features = ", ".join(f"{name} {drop:.4f}" for name, drop in drops)
        ceiling = run["period_ceiling"]
        lift = ceiling["model_recall_at_50"] / ceiling["visit_count_recall_at_50"] - 1
        fit = run["training"]["train_metrics"]
        # Binary models report AUC; pairwise ones NDCG at the primary metric's K.
        measure = next(k[6:] for k in sorted(fit) if k.startswith("valid_") and "logloss" not in k)
        lines.append(
            f"| {run['case']} | {run['seed']} | {coverage['train']:.3f} / {coverage['test']:.3f} "
            f"| {features} | {ceiling['model_recall_at_50']:.4f} / "
            f"{ceiling['visit_count_recall_at_50']:.4f} ({_pct(lift)}) | "
            f"{fit['rounds']:.0f}, {measure} {fit[f'train_{measure}']:.3f} / "
            f"{fit[f'valid_{measure}']:.3f} |"
        )
    return "\n".join(lines)


def feature_orders_table(runs: list[dict[str, Any]], top: int = 4) -> str:
    """Per case and phase (the template's lowest seed), the single features whose own order of
    the logged candidates recalls the most at 50, beside the walk's (visit count) order."""
    lines = [
        "| case | phase | best single-feature orders (recall@50) | walk_score (visit count) |",
        "| --- | --- | --- | --- |",
    ]
    seen = set()
    for run in runs:
        orders = run.get("feature_orders_recall_at_50")
        if configuration(run) != "template" or not orders or run["case"] in seen:
            continue
        seen.add(run["case"])
        for phase in ("train", "test"):
            ranked = sorted(orders[phase].items(), key=lambda item: -item[1])[:top]
            best = ", ".join(f"{name} {value:.4f}" for name, value in ranked)
            walk = next(
                (orders[phase][n] for n in ("walk_score_rank", "walk_score") if n in orders[phase]),
                None,
            )
            shown = "n/a" if walk is None else f"{walk:.4f}"
            lines.append(f"| {run['case']} | {phase} | {best} | {shown} |")
    return "\n".join(lines)


def _row(what: str, figure: str, target: str = "") -> str:
    return f"| {what} | {figure} | {target} |"


def walks_table(r: dict[str, Any]) -> str:
    """`benchmarks/walks.py --json`: one query of 5 pins, medians over queries."""
    unbiased = r["p50_ms"]
    lines = [
        f"Graph `{r['graph']}`: {r['graph_pins']:,} pins, {r['graph_edges']:,} edges, walk "
        f"arrays {r['graph_walk_bytes'] / 2**20:.0f} MiB, L3 {r['l3_bytes'] / 2**20:.0f} MiB; "
        f"{r['queries']} queries ({r['query_source']}), N = {r['steps']:,} steps.",
        "",
        "| what | figure | target |",
        "| --- | --- | --- |",
        _row(
            "whole query, 1 thread",
            f"{r['steps_per_second'] / 1e6:.1f}M steps/s, "
            f"{r['speedup']:.1f}x the plain reference kernel "
            f"({r['reference_steps_per_second'] / 1e6:.1f}M)",
            ">= 5x",
        ),
        _row(
            "whole query, 2 threads",
            f"{r['two_thread_steps_per_second'] / 1e6:.1f}M "
            f"steps/s ({r['two_thread_scaling']:.2f}x)",
        ),
        _row(
            "walk kernel alone, 1 pin",
            f"{r['kernel_steps_per_second'] / 1e6:.1f}M "
            f"steps/s ({r['kernel_speedup']:.1f}x the reference)",
        ),
        _row("latency p50 / p99, no early stopping", f"{unbiased:.2f} / {r['p99_ms']:.2f} ms"),
        _row(
            f"early stopping {r['early_stop_pins']}/{r['early_stop_visits']}",
            f"p50 {r['early_stop_p50_ms']:.2f} ms, {r['early_stop_step_fraction']:.0%} of "
            f"the steps, top-100 overlap with the full walk "
            f"{r['early_stop_overlap_at_100']:.2f} (two full walks, other seeds: "
            f"{r['full_walk_seed_overlap_at_100']:.2f})",
            "<= 50% of the steps at >= 0.80",
        ),
        _row(
            "shortest prefix of the full walk at 0.80 top-100 overlap (median over queries)",
            f"{r['prefix_fraction_for_overlap_80']:.0%} of the steps",
        ),
        _row(
            "locale bias 0.5, p50",
            f"{r['locale_bias_p50_ms']:.2f} ms "
            f"({r['locale_bias_p50_ms'] / unbiased:.2f}x unbiased)",
            "<= 1.3x",
        ),
        _row(
            "locale + topic bias 0.8, p50",
            f"{r['locale_topic_bias_p50_ms']:.2f} ms "
            f"({r['locale_topic_bias_p50_ms'] / unbiased:.2f}x unbiased)",
            "<= 1.6x",
        ),
        _row(
            f"real-time delta of {r['delta_share']:.0%} of the edges",
            f"{r['delta_throughput_ratio']:.2f}x the base-only steps/s, "
            f"{r['delta_bytes_per_edge']:.0f} bytes per delta edge",
            ">= 0.8x",
        ),
        _row(
            "direct vs hash visit counter, p50",
            f"{r['direct_counter_p50_ms']:.2f} vs {r['hash_counter_p50_ms']:.2f} ms",
        ),
        _row(
            "graph size, load",
            f"{r['bytes_per_edge']:.2f} bytes per edge (+"
            f"{r['locale_index_bytes_per_edge']:.2f} locale index, +"
            f"{r['key_runs_bytes_per_edge']:.2f} key runs); verified load "
            f"{r['load_seconds']:.2f} s",
        ),
    ]
    return "\n".join(lines)


def walks_real_table(results: Path) -> str:
    """`benchmarks/walks.py --graph --requests --truth --json walks_<case>.json`: early stopping
    on real-data graphs, against the full walk on the same requests (recall averaged over
    walk seeds, its change with a paired-bootstrap interval over requests)."""
    lines = [
        "| graph | queries | steps walked | top-100 overlap (two full walks) | shortest prefix "
        "at 0.8 | recall@50 early stop / full walk (seeds) | change (95% interval) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in sorted(results.glob("walks_*.json")):
        r = json.loads(path.read_text())
        lo, hi = r["recall_at_50_early_stop_change_ci95"]
        lines.append(
            f"| {path.stem.removeprefix('walks_')} ({r['graph_edges']:,} edges) | "
            f"{r['queries']:,} | {r['early_stop_step_fraction']:.0%} | "
            f"{r['early_stop_overlap_at_100']:.2f} ({r['full_walk_seed_overlap_at_100']:.2f}) | "
            f"{r['prefix_fraction_for_overlap_80']:.0%} | {r['recall_at_50_early_stop']:.4f} / "
            f"{r['recall_at_50_full']:.4f} ({r['recall_seeds']}) | "
            f"{r['recall_at_50_early_stop_change']:+.1%} ({lo:+.1%} to {hi:+.1%}) |"
        )
    return "\n".join(lines)


def _serving_row(name: str, s: dict[str, Any]) -> str:
    return (
        f"| {name} | {s['requests_per_second']:.1f} | {s['requests_per_second_per_core']:.1f}"
        f" | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['errors']} | "
        f"{s['pins_scored_per_second_per_core']:,} | {s['server_cpu_cores']:.2f} | "
        f"{s['generator_cpu_cores']:.2f} |"
    )


def serving_table(r: dict[str, Any]) -> str:
    """`benchmarks/serving.py --json`: home feed over gRPC, medians of the runs."""
    lines = [
        f"Graph `{r['graph']}`, {r['cores']} cores, concurrency {r['concurrency']}, "
        f"{r['duration_s']:g} s per run, medians of {r['repeat']} run(s).",
        "",
        "| server | req/s | req/s per core | p50 ms | p90 ms | p99 ms | errors | pins "
        "scored/s per core | server cores | generator cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        _serving_row("logging on", r),
    ]
    if r.get("logging_off"):
        lines.append(_serving_row("logging off (`sample_rate: 0`)", r["logging_off"]))
    if r.get("processes_2"):
        lines.append(_serving_row("`--processes 2`, logging on", r["processes_2"]))
    lines += [
        "",
        f"The pipeline called directly on one thread takes {r['reference_direct_ms']:.2f}"
        f" ms per call; served req/s per core x that = "
        f"{r['served_vs_direct_one_core']:.2f} (1.0: gRPC and scheduling cost nothing). "
        f"Logging costs {r['logging_overhead_throughput']:.1%} of the throughput.",
    ]
    if "server_cpu_ms_per_call" in r:  # the server's CPU per call, by where it went
        on, off = r, r["logging_off"]
        lines += [
            "",
            "| server CPU per call, ms | total | compute threads | log writer process | gRPC and "
            "the rest |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, s in (("logging on", on), ("logging off", off)):
            rest = (
                s["server_cpu_ms_per_call"]
                - s["compute_cpu_ms_per_call"]
                - s["log_writer_cpu_ms_per_call"]
            )
            lines.append(
                f"| {name} | {s['server_cpu_ms_per_call']:.2f} | "
                f"{s['compute_cpu_ms_per_call']:.2f} | {s['log_writer_cpu_ms_per_call']:.2f} | "
                f"{rest:.2f} |"
            )
        lines += [
            "",
            f"The direct call's CPU ({r['reference_direct_cpu_ms']:.2f} ms) over the server's "
            f"CPU per call: {r['served_vs_direct_cpu']:.2f}. Logging costs "
            f"{r['logging_overhead_cpu']:.1%} of the server's CPU per call; "
            f"{r['log_rows_dropped']:,} log rows dropped.",
        ]
    return "\n".join(lines)


def replicas_table(r: dict[str, Any]) -> str:
    """`benchmarks/replicas.py --json`: one replica direct, one and two behind Envoy."""
    lines = [
        f"Graph `{r['graph']}` ({r['graph_edges']:,} edges, {r['graph_mib']:.0f} MiB), "
        f"{r['cores']} cores, L3 {r['l3']}, concurrency {r['concurrency']}, "
        f"{r['duration_s']:g} s per run, medians of {r['repeat']} run(s).",
        "",
        "| setting | req/s | req/s per core | p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in (
        ("direct_1", "one replica, direct"),
        ("envoy_1", "one replica, Envoy"),
        ("envoy_2", "two replicas, Envoy"),
    ):
        lines.append(
            f"| {label} | {r[f'{name}_rps']:.1f} | {r[f'{name}_rps_per_core']:.1f} | "
            f"{r[f'{name}_p99_ms']:.1f} |"
        )
    memory = r["memory_two_replicas"]
    lines += [
        "",
        f"Envoy's overhead {r['envoy_overhead']:.1%} (target <= 10%); two replicas "
        f"{r['envoy_2_vs_direct_1']:.2f}x one direct; {r['errors']} errors. Memory with two "
        f"replicas: graph files {memory['graph_files_mib']:.0f} MiB, the replicas' "
        f"proportional shares of the graph add up to {memory['graph_pss_sum_mib']:.0f} MiB.",
    ]
    rolling = r.get("rolling")
    if rolling:
        lines += [
            "",
            "| under load, two replicas through Envoy | calls | failed | p99 ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, label in (
            ("reload_each", "new model, Admin.Reload on each replica"),
            ("sighup_restart", "rolling restart (SIGHUP)"),
            ("kill_one", "one replica SIGKILLed"),
        ):
            if name in rolling:
                run = rolling[name]
                lines.append(
                    f"| {label} | {run['count']:,} | {run['errors']} | {run['p99_ms']:.1f} |"
                )
        if "ejected_after_s" in rolling.get("kill_one", {}):
            lines += [
                "",
                f"Envoy ejected the killed replica "
                f"{rolling['kill_one']['ejected_after_s']:.2f} s after the kill.",
            ]
    return "\n".join(lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def graph_build_table(r: dict[str, Any]) -> str:
    """`benchmarks/graph_build.py --json`: the out-of-core build per size, the in-memory
    builder beside it where it ran, the growth of time per edge, and the extrapolation to
    200M edges when not measured."""
    lines = [
        f"DuckDB memory limit {r['memory_limit']}, {r['cores']} cores.",
        "",
        "| edges | time | CPU time | peak RSS | peak / graph | graph | in-memory peak RSS "
        "| same checksums |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, f in r["sizes"].items():
        memory = f.get("in_memory")
        same = f.get("same_checksums_as_in_memory")
        lines.append(
            f"| {label} | {f['seconds']:.0f} s | {f['cpu_seconds']:.0f} s "
            f"| {_mb(f['peak_rss_bytes'])} "
            f"| {f['peak_rss_over_graph']:.2f}x | {_mb(f['graph_bytes'])} "
            f"| {_mb(memory['peak_rss_bytes']) if memory else ''} "
            f"| {'' if same is None else 'yes' if same else 'NO'} |"
        )
    x = r.get("extrapolated")
    if x:
        lines.append(
            f"| {x['edges'] / 1e6:g}M (extrapolated from {x['from_edges'][0] / 1e6:g}M and "
            f"{x['from_edges'][1] / 1e6:g}M, not measured) | | | {_mb(x['peak_rss_bytes'])} "
            f"| {x['peak_rss_over_graph']:.2f}x | {_mb(x['graph_bytes'])} | | |"
        )
    growth = r.get("time_growth")
    if growth:
        lines += [
            "",
            f"Time per edge at {growth['to_edges'] / 1e6:g}M over that at "
            f"{growth['from_edges'] / 1e6:g}M edges: {growth['cpu_seconds_per_edge_ratio']:.2f}x "
            f"in CPU time, {growth['seconds_per_edge_ratio']:.2f}x in wall time.",
        ]
    return "\n".join(lines)


_ENGINES = {
    "walkrank_served": "served (tree kernel)",
    "xgboost": "xgboost `inplace_predict`",
    "ort_onnxmltools": "onnxruntime, onnxmltools export",
    "ort_hummingbird": "onnxruntime, hummingbird-ml export",
}


def scoring_table(r: dict[str, Any]) -> str:
    """`benchmarks/scoring.py --json`: rows per second of each engine, one thread, per model
    and batch size, and each against xgboost's in the same run."""
    lines = [
        f"One thread per engine{' (`--quick`: fewer repetitions)' if r.get('quick') else ''}; "
        f"rows per second, and in brackets against xgboost's; the served scores differ from "
        f"onnxruntime's by at most {r['max_abs_diff']:.1g}.",
    ]
    for label, model in r["models"].items():
        trees, depth = label.split("x")
        batches = list(model["batches"])
        lines += [
            "",
            f"{trees} trees of depth {depth}, served by `{model['engine_served']}`:",
            "",
            "| engine | " + " | ".join(f"batch {int(b):,}" for b in batches) + " |",
            "| --- |" + " ---: |" * len(batches),
        ]
        for engine, name in _ENGINES.items():
            cells = [model["batches"][b][engine] for b in batches]
            lines.append(
                f"| {name} | "
                + " | ".join(
                    f"{c['rows_per_second']:,.0f} ({c['ratio_vs_xgboost']:.2f}x)" for c in cells
                )
                + " |"
            )
    return "\n".join(lines)


def _lift_text(before: float, after: float) -> str:
    return f"{after / before - 1:+.1%}" if before else "n/a"


def demo_lifts_table(r: dict[str, Any]) -> str:
    """`walkrank demo`'s `demo.json`: phase 1 (visit count) against phase 2 (the models)."""
    before, after = r["phases"]["visit_count"], r["phases"]["lightweight"]
    lines = [
        "| tenant (primary metric) | funnel efficiency | actions per 1,000 returned "
        "| local share |",
        "| --- | --- | --- | --- |",
    ]
    names = {"homefeed": "home feed", "related_pins": "related pins", "email": "email"}
    metric_names = {"funnel_efficiency": "funnel efficiency", "actions_per_1000": "actions"}
    order = [t for t in names if t in before] + sorted(set(before) - set(names))
    for tenant in order:
        a, b = before[tenant], after[tenant]
        cells = [
            f"{a['funnel_efficiency']:.4f} -> {b['funnel_efficiency']:.4f} "
            f"({_lift_text(a['funnel_efficiency'], b['funnel_efficiency'])})",
            f"{a['actions_per_1000']:.1f} -> {b['actions_per_1000']:.1f} "
            f"({_lift_text(a['actions_per_1000'], b['actions_per_1000'])})",
            f"{a['local_share']:.3f} -> {b['local_share']:.3f}",
        ]
        metric = r["primary_metric"][tenant]
        label = f"{names.get(tenant, tenant)} ({metric_names.get(metric, metric)})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval_text(e: dict[str, float | None]) -> str:
    if e.get("value") is None:
        return "n/a"
    low, high = e.get("low"), e.get("high")
    bounds = f" [{low:+.0%}, {high:+.0%}]" if low is not None and high is not None else ""
    return f"{e['value']:+.0%}{bounds}"


def demo_estimates_table(r: dict[str, Any]) -> str:
    """`demo.json`'s offline estimates of each model's lift beside the online lift."""
    lines = [
        f"World `{r['size']}`, {r['seconds']:.0f} s.",
        "",
        "| tenant | online lift | naive (biased) | per-pin SNIPS | exposure-aware (slots) "
        "| exploration requests | true lift on them | within 30% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for tenant, e in sorted(r["offline_vs_online"].items()):
        online, slate = e["online"], e.get("slate", {}).get("value")
        within = slate is not None and abs(slate - online) <= 0.3 * abs(online)
        lines.append(
            f"| {tenant} | {online:+.1%} | {_interval_text(e['naive'])} "
            f"| {_interval_text(e.get('snips', {}))} | {_interval_text(e.get('slate', {}))} "
            f"| {e['explored_requests']} | {e['replayed']:+.1%} | {'yes' if within else 'no'} |"
        )
    return "\n".join(lines)


PERFORMANCE = {
    "performance:walks": ("walks.json", walks_table),
    "performance:scoring": ("scoring.json", scoring_table),
    "performance:serving": ("serving.json", serving_table),
    "performance:replicas": ("replicas.json", replicas_table),
    "performance:graph_build": ("graph_build.json", graph_build_table),
    "demo:lifts": ("demo.json", demo_lifts_table),
    "demo:estimates": ("demo.json", demo_estimates_table),
}


def performance_tables(results: Path) -> dict[str, str]:
    """The performance tables whose benchmark JSON exists under `results`."""
    tables = {}
    if any(results.glob("walks_*.json")):
        tables["performance:walks_real"] = walks_real_table(results)
    for name, (file, render) in PERFORMANCE.items():
        path = results / file
        if path.exists():
            tables[name] = render(json.loads(path.read_text()))
    return tables


def replace_between(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- {name} --> ... <!-- /{name} --> markers to replace")
    return pattern.sub(lambda match: match.group(1) + table + "\n" + match.group(2), text)


def all_tables(relevance_results: Path) -> dict[str, str]:
    """Every generated table by its marker name: the relevance runs under
    `relevance_results` and the benchmarks' JSON in its parent."""
    runs = load(relevance_results)
    tables = performance_tables(relevance_results.parent)
    if runs:
        tables |= {
            "relevance:summary": summary_table(runs),
            "relevance:template": summary_table(
                [run for run in runs if configuration(run) == "template"]
            ),
            "relevance:runs": runs_table(runs),
            "relevance:diagnostics": diagnostics_table(runs),
            "relevance:feature_orders": feature_orders_table(runs),
        }
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--write", type=Path, help="Markdown file whose marked tables to replace")
    args = parser.parse_args(argv)
    tables = all_tables(args.results)
    if not tables:
        raise SystemExit(f"{args.results.parent}: no results")
    if args.write is None:
        print("\n\n".join(tables.values()))
        return 0
    text = args.write.read_text()
    marked = {name: table for name, table in tables.items() if f"<!-- {name} -->" in text}
    if not marked:
        raise SystemExit(f"{args.write}: no <!-- NAME --> markers of these tables")
    for name, table in marked.items():
        text = replace_between(text, name, table)
    args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
