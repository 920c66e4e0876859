"""Markdown tables of the relevance benchmark's results, so no figure in the docs is typed by hand.

Reads every `benchmarks/results/relevance/*.json` (written by `benchmarks/relevance.py
--json`) and renders a summary per case and configuration (mean and range over seeds) and a
row per run, and the diagnostics of the template's runs (truth pairs among the candidates,
the features the model relies on, the in-period ceiling, the fit). With `--write FILE` it
replaces the text between `<!-- relevance:NAME -->` and `<!-- /relevance:NAME -->` (NAME:
summary, runs, diagnostics) in FILE; otherwise it prints the tables.

    python benchmarks/tables.py [--results DIR] [--write docs/relevance.md]
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
    lines = ["| case | configuration | seeds | published | recall@50 visit count / ranker / "
             "popularity (mean) | ranker lift vs visit count @50 | vs popularity @50 | "
             "ranker lift vs visit count @100 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["case"], configuration(run)), []).append(run)
    for (case, config), group in groups.items():
        m = [r["metrics"] for r in group]
        means = " / ".join(f"{statistics.fmean(x[f'{name}_recall_at_50'] for x in m):.4f}"
                           for name in ("visit_count", "ranker", "popularity"))
        lines.append(
            f"| {case} | {config} | {', '.join(str(r['seed']) for r in group)} | "
            f"{sum(r['published'] for r in group)} of {len(group)} | {means} | "
            f"{_range([x['lift_vs_visit_count_at_50'] for x in m])} | "
            f"{_range([x['lift_vs_popularity_at_50'] for x in m])} | "
            f"{_range([x['lift_vs_visit_count_at_100'] for x in m])} |")
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| case | configuration | seed | published | R@50 visit count | R@50 ranker | "
             "R@50 popularity | R@100 visit count | R@100 ranker | R@100 popularity | "
             "truth in candidates (test) | seconds (train step / total) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        m = run["metrics"]
        figures = " | ".join(f"{m[f'{name}_recall_at_{k}']:.4f}" for k in (50, 100)
                             for name in ("visit_count", "ranker", "popularity"))
        lines.append(
            f"| {run['case']} | {configuration(run)} | {run['seed']} | "
            f"{'yes' if run['published'] else 'no'} | {figures} | "
            f"{run['candidate_coverage']['test']:.3f} | "
            f"{run['seconds']['train']:.0f} / {run['seconds']['total']:.0f} |")
    return "\n".join(lines)


def diagnostics_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| case | seed | truth pairs among candidates (train / test) | features the model "
             "relies on (recall@50 lost when shuffled) | in-period ceiling: model / visit "
             "count recall@50 | rounds kept, AUC training / held-out rows |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        if configuration(run) != "template" or not run.get("importance"):
            continue
        coverage = run["candidate_coverage"]
        drops = list(run["importance"]["drop_when_shuffled"].items())[:3]
        features = ", ".join(f"{name} {drop:.4f}" for name, drop in drops)
        ceiling = run["period_ceiling"]
        lift = ceiling["model_recall_at_50"] / ceiling["visit_count_recall_at_50"] - 1
        fit = run["training"]["train_metrics"]
        lines.append(
            f"| {run['case']} | {run['seed']} | {coverage['train']:.3f} / {coverage['test']:.3f} "
            f"| {features} | {ceiling['model_recall_at_50']:.4f} / "
            f"{ceiling['visit_count_recall_at_50']:.4f} ({_pct(lift)}) | "
            f"{fit['rounds']:.0f}, {fit['train_auc']:.3f} / {fit['valid_auc']:.3f} |")
    return "\n".join(lines)


def replace_between(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- {name} --> ... <!-- /{name} --> markers to replace")
    return pattern.sub(lambda match: match.group(1) + table + "\n" + match.group(2), text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--write", type=Path, help="Markdown file whose marked tables to replace")
    args = parser.parse_args(argv)
    runs = load(args.results)
    if not runs:
        raise SystemExit(f"{args.results}: no results")
    tables = {"relevance:summary": summary_table(runs), "relevance:runs": runs_table(runs),
              "relevance:diagnostics": diagnostics_table(runs)}
    if args.write is None:
        print("\n\n".join(tables.values()))
        return 0
    text = args.write.read_text()
    for name, table in tables.items():
        text = replace_between(text, name, table)
    args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
