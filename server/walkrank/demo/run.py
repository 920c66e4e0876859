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

import numpy as np
import pyarrow as pa

from walkrank.demo.traffic import full_ranker, run_phase
from walkrank.demo.world import SIZES, DemoWorld, generate_world, shipped_tenants_dir
from walkrank.model_registry import ModelRegistry
from walkrank.serving.config import ServerConfig
from walkrank.serving.server import WalkRankServer
from walkrank.tenants import TenantConfig, load_tenants
from walkrank.training.estimators import MIN_EXPLORED_REQUESTS
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
    # Per tenant: its primary metric's lift estimated offline (naive, IPS, SNIPS) on phase 2's
    # logs against the lift measured online; and its exploration traffic's measured metrics.
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)
    explored: dict[str, dict[str, float]] = field(default_factory=dict)
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
            phase_2 = time.time()
            surfaces = run_phase(world, client, "lightweight", seed + 200)
            report.phases["lightweight"] = _summaries(surfaces)
            report.explored = {name: s.explored.summary() for name, s in surfaces.items()}
    finally:
        server.stop()
    progress("[demo] offline estimates of the served models on phase 2's logs")
    for name, tenant in sorted(tenants.configs.items()):
        if name in report.model_versions:
            metric = report.primary[name]
            report.offline[name] = {
                "metric": metric,
                "online": report.lift(name, metric),
                **offline_lifts(world, tenant, config.logs_dir, config.models_dir, phase_2, metric),
            }
    report.seconds = time.perf_counter() - started
    write_report(report)
    return report


def _summaries(surfaces: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {tenant: surface.stats.summary() for tenant, surface in surfaces.items()}


def offline_lifts(
    world: DemoWorld,
    tenant: TenantConfig,
    logs: Path,
    models: Path,
    since: float,
    metric: str,
) -> dict[str, Any]:
    """The serving model's lift over visit count on `metric`, estimated from the requests
    logged since `since`: naive (labels as logged, on the requests the model served) and, on
    the exploration requests, slots-aware (the exposure-aware estimate), IPS and
    self-normalised IPS (per pin), with 95% intervals; and the lift the world's truth gives
    on those exploration requests (`replayed_lift`)."""
    from walkrank.training.estimators import compare_policies
    from walkrank.training.evaluate import online_estimates, targets_from_joined
    from walkrank.training.pipeline import StepTimer, load_joined, score_with_model

    loaded = ModelRegistry(models).load(tenant.name)
    joined = load_joined(tenant, logs, (since, None), StepTimer(tenant.name, lambda _: None))
    targets = targets_from_joined(joined, tenant.labels.weights)
    model = score_with_model(loaded.onnx_bytes, loaded.feature_names, joined, what=tenant.name)
    visits = joined["visit_score"].to_numpy().astype(np.float64)
    outcome = "funnel_efficiency" if metric == "funnel_efficiency" else "actions_per_returned"
    y = targets.impressed if outcome == "funnel_efficiency" else targets.actions
    assert targets.explored is not None and targets.returned is not None
    assert targets.propensity is not None
    served = ~targets.explored
    _, request = np.unique(targets.request[served], return_inverse=True)
    naive = compare_policies(
        request,
        np.asarray(y, np.float64)[served],
        targets.propensity[served],
        targets.returned[served],
        visits[served],
        model[served],
    )
    estimates = online_estimates(targets, visits, model)
    out: dict[str, Any] = {
        "served_requests": naive.requests,
        "naive": naive.lift["naive"].to_dict(),
        "explored_requests": 0,
    }
    if estimates is not None:
        explored = estimates[outcome]
        out.update(
            explored_requests=explored.requests,
            enough_requests=explored.enough,
            slots=explored.slots,
            slate=explored.lift["slate"].to_dict(),
            ips=explored.lift["ips"].to_dict(),
            snips=explored.lift["snips"].to_dict(),
            support=explored.support["b"],
            replayed=replayed_lift(
                world,
                tenant.name,
                joined.filter(pa.array(targets.explored)),
                visits[targets.explored],
                model[targets.explored],
                metric,
            ),
        )
    return out


REPLAYS = 20


def replayed_lift(
    world: DemoWorld,
    tenant: str,
    explored: pa.Table,
    visits: np.ndarray,
    model: np.ndarray,
    metric: str,
    seed: int = 0,
) -> float | None:
    """The model's true lift over visit count on the exploration requests themselves: each
    ranker's returned set replayed through the client's full ranker and the users, REPLAYS
    times. Only the demo can know it (it knows the truth); it tells how much of an estimate's
    gap to the online lift comes from the few users who explore rather than the estimator."""
    rng = np.random.default_rng(seed)
    request = explored["request_id"].to_numpy(zero_copy_only=False)
    pins = world.graph.pin_index(explored["pin_id"].to_pylist())
    returned = explored["returned"].to_numpy(zero_copy_only=False)
    users = explored["user_id"].to_numpy(zero_copy_only=False)
    totals = np.zeros((2, 2))  # ranker x (outcomes, returned pins)
    for rid in np.unique(request):
        rows = np.flatnonzero(request == rid)
        user, n = int(str(users[rows[0]]).removeprefix("user")), int(returned[rows].sum())
        for k, scores in enumerate((visits, model)):
            chosen = pins[rows[np.argsort(-scores[rows], kind="stable")[:n]]]
            for _ in range(REPLAYS):
                client = full_ranker(world, tenant, user, chosen, rng)
                outcome = (
                    len(client.shown)
                    if metric == "funnel_efficiency"
                    else int(client.acts.sum() + client.saves.sum())
                )
                totals[k] += (outcome, n)
    (vc, vc_n), (ours, ours_n) = totals
    return float((ours / ours_n) / (vc / vc_n) - 1) if vc and ours_n else None


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
    if report.offline:
        lines += ["", *offline_table(report)]
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


def offline_table(report: DemoReport) -> list[str]:
    """The table "offline estimate vs online lift": what evaluation would have predicted for
    each served model, naive and exposure-aware, beside the lift phase 2 measured."""
    lines = [
        "## Offline estimate vs online lift",
        "",
        "Each served model's lift over visit count on its tenant's primary metric, estimated "
        "from phase 2's logs: naive (the labels as logged, on the requests the model served: "
        "biased by its own exposure); exposure-aware (slots-aware, on the exploration "
        "requests: it replays the competition for the client's slots on the client's scores); "
        "and per-pin SNIPS on "
        "the same requests (which ignores that competition and overstates the lift); with 95% "
        "bootstrap intervals; beside the lift measured online (phase 2 against phase 1, "
        "exploration traffic excluded), and beside the true lift on the exploration requests "
        "themselves (each ranker's set replayed through the world's full ranker and users: "
        "the gap between it and the online lift is the few exploring users', not the "
        "estimator's). With fewer than "
        f"{MIN_EXPLORED_REQUESTS} exploration requests only the interval is worth reading. "
        "Exploration's cost is its share times the gap between its traffic and the model's, "
        "measured in phase 2.",
        "",
        "| tenant | metric | naive (biased) | exposure-aware (slots-aware) | per-pin SNIPS | "
        "exploration requests | slots | true lift on them | online lift | "
        "exposure-aware within 30% | exploration cost |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for tenant, row in sorted(report.offline.items()):
        online, slate = row["online"], row.get("slate", {}).get("value")
        close = (
            "n/a"
            if slate is None or not online
            else ("yes" if abs(slate - online) <= 0.3 * abs(online) else "no")
        )
        estimate = _lift_cell(row.get("slate"))
        if row.get("slate") and not row.get("enough_requests"):
            estimate += " (too few requests)"
        lines.append(
            f"| {tenant} | {row['metric']} | {_lift_cell(row['naive'])} | {estimate} | "
            f"{_lift_cell(row.get('snips'))} | {row['explored_requests']:,} | "
            f"{row.get('slots') or 'n/a'} | {_percent(row.get('replayed'))} | {online:+.1%} | "
            f"{close} | "
            f"{_exploration_cost(report, tenant, row['metric'])} |"
        )
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _lift_cell(interval: dict[str, float | None] | None) -> str:
    if not interval or interval["value"] is None:
        return "n/a"
    low, high = interval["low"], interval["high"]
    bounds = "" if low is None or high is None else f" [{low:+.1%}, {high:+.1%}]"
    return f"{interval['value']:+.1%}{bounds}"


def _exploration_cost(report: DemoReport, tenant: str, metric: str) -> str:
    """share x (explored - served) / served of the metric, as measured in phase 2."""
    explored, served = report.explored.get(tenant), report.phases["lightweight"][tenant]
    if not explored or not explored.get("requests") or not served[metric]:
        return "n/a"
    share = explored["requests"] / (explored["requests"] + served["requests"])
    return f"{share * (explored[metric] - served[metric]) / served[metric]:+.2%}"


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
                "offline_vs_online": report.offline,
                "explored": report.explored,
            },
            indent=2,
        )
    )
    write_chart(report, report.out_dir / "demo.png")
