"""`walkrank demo`: the whole product on one command.

Phase 1 serves every tenant by visit count while the surfaces report what they showed and
what users did; each tenant then trains its model from the serving-stage log with its own
label strategy, the running server reloads, and phase 2 serves with the models. The home feed
also trains the other label strategies on the same logs, as the article compared them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walkrank.demo.traffic import run_phase
from walkrank.demo.world import SIZES, generate_world, shipped_tenants_dir
from walkrank.serving.config import ServerConfig
from walkrank.serving.server import WalkRankServer
from walkrank.tenants import load_tenants
from walkrank.training.pipeline import train_tenant
from walkrank_client import WalkRankClient

STRATEGIES = ("engagement", "funnel", "blended_funnel", "distillation")
METRICS = ("funnel_efficiency", "actions_per_1000", "local_share")


@dataclass
class DemoReport:
    size: str
    phases: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)
    strategies: dict[str, dict[str, float]] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    out_dir: Path | None = None

    def lift(self, tenant: str, metric: str) -> float:
        before = self.phases["visit_count"][tenant][metric]
        after = self.phases["lightweight"][tenant][metric]
        return (after - before) / before if before else float("inf")


def live_primary_metric(strategy: str) -> str:
    """The live demo metric a label strategy optimises: actions, or passing the full ranker."""
    return "actions_per_1000" if strategy == "engagement" else "funnel_efficiency"


def run_demo(
    out: Path, size: str = "full", seed: int = 7, progress: Callable[[str], None] = print
) -> DemoReport:
    started = time.perf_counter()
    out = out.resolve()
    for stale in ("models", "logs", "report"):
        shutil.rmtree(out / stale, ignore_errors=True)
    progress(f"[demo] world ({size}): building graph and users under {out}")
    world = generate_world(out, SIZES[size], seed)
    tenants = load_tenants(shipped_tenants_dir())
    if tenants.errors:
        raise RuntimeError(f"shipped tenants failed to load: {tenants.errors}")
    config = ServerConfig(
        graph=out / "graph",
        tenants_dir=shipped_tenants_dir(),
        models_dir=out / "models",
        logs_dir=out / "logs",
        address="127.0.0.1:0",
        workers=4,
    )
    report = DemoReport(size=size, out_dir=out / "report")
    server = WalkRankServer(config)
    port = server.start()
    progress(f"[demo] server on 127.0.0.1:{port} with tenants {sorted(tenants.configs)}")
    try:
        with WalkRankClient(f"127.0.0.1:{port}", timeout=30.0) as client:
            progress("[demo] phase 1: visit count")
            report.phases["visit_count"] = _summaries(
                run_phase(world, client, "visit_count", seed + 100)
            )
            server.candidate_log.flush()
            server.event_log.flush()
            for name, tenant in sorted(tenants.configs.items()):
                progress(f"[demo] training {name} ({tenant.labels.strategy})")
                trained = train_tenant(
                    tenant,
                    config.logs_dir,
                    config.models_dir,
                    progress=lambda line: progress(f"    {line}"),
                )
                report.primary[name] = live_primary_metric(tenant.labels.strategy)
                if trained.version is not None:
                    report.model_versions[name] = f"v{trained.version}"
            home = tenants.configs["homefeed"]
            for strategy in STRATEGIES:
                progress(f"[demo] homefeed with the {strategy} strategy (compared, not served)")
                trained = train_tenant(
                    home,
                    config.logs_dir,
                    config.models_dir,
                    strategy_override=strategy,
                    publish=False,
                    force=True,
                    progress=lambda _line: None,
                )
                report.strategies[strategy] = dict(trained.comparison.candidate_metrics)
            client.reload()
            progress("[demo] phase 2: lightweight ranking")
            report.phases["lightweight"] = _summaries(
                run_phase(world, client, "lightweight", seed + 200)
            )
    finally:
        server.stop()
    report.seconds = time.perf_counter() - started
    write_report(report)
    return report


def _summaries(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {tenant: surface.summary() for tenant, surface in stats.items()}


def render_markdown(report: DemoReport) -> str:
    lines = [
        "# WalkRank demo: visit count vs lightweight ranking",
        "",
        f"World size `{report.size}`, {report.seconds:.0f} s. Funnel efficiency is the "
        "share of returned pins the full ranker showed; actions are clicks and saves per "
        "thousand returned pins; local share is the share of returned pins in the user's "
        "locale; latency is the server's time per request.",
        "",
        "| tenant | metric | visit count | lightweight | lift |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for tenant in sorted(report.phases["visit_count"]):
        before = report.phases["visit_count"][tenant]
        after = report.phases["lightweight"][tenant]
        for metric in (*METRICS, "p50_ms", "p99_ms"):
            mark = " (primary)" if report.primary.get(tenant) == metric else ""
            lift = f"{report.lift(tenant, metric):+.1%}" if metric in METRICS else ""
            lines.append(
                f"| {tenant} | {metric}{mark} | {before[metric]:.4g} | "
                f"{after[metric]:.4g} | {lift} |"
            )
    if report.strategies:
        names = sorted({k for row in report.strategies.values() for k in row})
        lines += [
            "",
            "## Home feed: label strategies on the same logs (held-out window)",
            "",
            "| strategy | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---:" for _ in names) + " |",
        ]
        for strategy, row in report.strategies.items():
            lines.append(
                f"| {strategy} | "
                + " | ".join(f"{row.get(n, float('nan')):.4g}" for n in names)
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_chart(report: DemoReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = sorted(report.phases["visit_count"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS, strict=True):
        xs = range(len(tenants))
        before = [report.phases["visit_count"][t][metric] for t in tenants]
        after = [report.phases["lightweight"][t][metric] for t in tenants]
        ax.bar([x - 0.2 for x in xs], before, 0.4, label="visit count", color="#9aa5b1")
        ax.bar([x + 0.2 for x in xs], after, 0.4, label="lightweight ranking", color="#c8102e")
        ax.set_xticks(list(xs), tenants)
        ax.set_title(metric.replace("_", " "))
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("WalkRank demo: visit count vs lightweight ranking")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: DemoReport) -> None:
    assert report.out_dir is not None
    report.out_dir.mkdir(parents=True, exist_ok=True)
    (report.out_dir / "demo.md").write_text(render_markdown(report))
    (report.out_dir / "demo.json").write_text(
        json.dumps(
            {
                "size": report.size,
                "seconds": report.seconds,
                "phases": report.phases,
                "primary_metric": report.primary,
                "strategies": report.strategies,
                "model_versions": report.model_versions,
            },
            indent=2,
        )
    )
    write_chart(report, report.out_dir / "demo.png")
