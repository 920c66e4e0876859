"""End-to-end serving benchmark: home-feed calls over gRPC against `walkrank serve`.

Home-feed settings (the shipped tenant: 5 query pins, 100,000-step budget with early stopping,
2,000 candidates, 500 returned, every request logged) scored by a 100-tree depth-6 model, at
concurrency 8 from the built-in load generator (2 processes, 8 connections), for `--duration`
seconds after a warm-up, `--repeat` times (logging on and off alternating); the figures are
medians. Target: >= 100 requests/s per core with p99 <= 50 ms and no errors.

Measured in the same run:
- logging overhead: the same calls to a copy of the tenant with `logging.sample_rate: 0`;
- `walkrank serve --processes 2` (SO_REUSEPORT) against the thread-pool server;
- the reference: the same pipeline called directly in this process, one call at a time, so
  the served figure reads as a ratio to what one core does without gRPC and threads;
- the generator's and the server's CPU time: the generator runs on the server's cores;
- the server's CPU per answered call, split into its compute threads (the pipeline), its log
  writer process and the rest (gRPC, the front door, metrics), and the candidate log rows it
  dropped: CPU per call moves far less than throughput with the load of a shared machine;
- the share of their time the compute threads spend blocked, neither on a core nor waiting
  for one: with more calls in flight than slots that is waiting for the GIL, a core the
  pipeline leaves idle (the direct reference, one thread, never waits for it).

    python benchmarks/serving.py [--quick] [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from loadgen.generator import RunResult, run_load  # noqa: E402
from loadgen.ghz_config import load_ghz_config  # noqa: E402
from loadgen.harness import ServeProcess, free_port, write_server_config  # noqa: E402
from loadgen.models import publish_random_model  # noqa: E402
from loadgen.report import write_report  # noqa: E402
from loadgen.traffic import draw_requests, read_pipeline_inputs, write_requests  # noqa: E402
from walkrank.serving.scheduler import OS_THREAD_PREFIX  # noqa: E402

TENANT = "homefeed"
NO_LOG = "homefeed_nolog"
PROTO = ROOT / "protos" / "walkrank" / "v1" / "recommender.proto"
TARGET_RPS_PER_CORE = 100.0
TARGET_P99_MS = 50.0


def prepare(work: Path, graph_path: Path, requests: int, seed: int) -> tuple[Path, Path]:
    """Tenants (logging on / off), their 100-tree depth-6 models, request data."""
    from walkrank.graph.store import GraphStore

    tenants, models, data = work / "tenants", work / "models", work / "data"
    tenants.mkdir(parents=True)
    shutil.copy(ROOT / "tenants" / f"{TENANT}.yaml", tenants / f"{TENANT}.yaml")
    nolog = yaml.safe_load((ROOT / "tenants" / f"{TENANT}.yaml").read_text())
    nolog["name"] = NO_LOG
    nolog["logging"]["sample_rate"] = 0.0
    (tenants / f"{NO_LOG}.yaml").write_text(yaml.safe_dump(nolog, sort_keys=False))
    for name in (TENANT, NO_LOG):
        publish_random_model(models, tenants / f"{name}.yaml", trees=100, depth=6, seed=seed)
    messages = draw_requests(GraphStore.load(graph_path), TENANT, requests, seed=seed)
    write_requests(data / f"{TENANT}.json", messages)
    write_requests(data / f"{NO_LOG}.json", [{**m, "tenant": NO_LOG} for m in messages])
    return tenants, models


def ghz_config(work: Path, tenant: str, duration_s: float, concurrency: int) -> Path:
    path = work / f"{tenant}-{duration_s:g}s.json"
    path.write_text(
        json.dumps(
            {
                "name": tenant,
                "proto": str(PROTO),
                "import-paths": [str(ROOT / "protos")],
                "call": "walkrank.v1.Recommender.Recommend",
                "insecure": True,
                "duration": f"{duration_s:g}s",
                "duration-stop": "wait",
                "concurrency": concurrency,
                "connections": concurrency,
                "timeout": "2s",
                "data-file": str(work / "data" / f"{tenant}.json"),
            },
            indent=2,
        )
    )
    return path


def scraped(metrics_address: str) -> dict[str, float]:
    """Scored candidates and OK calls per tenant from the server's /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for name, labels, value in re.findall(
        r"^(walkrank_\w+_total)\{([^}]*)\} (\S+)$", text, re.MULTILINE
    ):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        # Every generated candidate is featurised and scored.
        if name == "walkrank_candidates_total" and tags.get("kind") == "generated":
            values[f"scored/{tags['tenant']}"] = float(value)
        if name == "walkrank_requests_total" and tags.get("code") == "OK":
            values[f"ok/{tags['tenant']}"] = float(value)
        if name == "walkrank_log_dropped_rows_total" and tags.get("log") == "candidates":
            values["log_dropped"] = values.get("log_dropped", 0.0) + float(value)
    return values


@dataclass
class Measured:
    """One run: its result and the server's CPU seconds during it, split into its compute
    threads (the pipeline), its log writer process (the server's descendants; None with
    `--processes`, whose forked servers are descendants too) and the rest (gRPC, the front
    door, metrics)."""

    result: RunResult
    server_cpu_s: float
    compute_cpu_s: float
    writer_cpu_s: float | None
    # The compute threads' time neither on a core nor waiting for one, over their whole time:
    # waiting for the GIL (the load keeps more calls in flight than slots, so rarely for work);
    # None with `--processes`, whose compute threads are in the forked servers.
    compute_blocked_share: float | None


def _cpu_s(stat: Path) -> float:
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _compute_threads(pid: int) -> tuple[float, float, int]:
    """The process's compute threads (named by `walkrank.serving.scheduler`): their CPU
    seconds, their seconds runnable but waiting for a core (schedstat), and their count."""
    cpu, waiting, count = 0.0, 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(OS_THREAD_PREFIX):
                cpu += _cpu_s(task / "stat")
                waiting += int((task / "schedstat").read_text().split()[1]) / 1e9
                count += 1
        except OSError:  # the thread ended
            continue
    return cpu, waiting, count


def measure(server: ServeProcess, config: Path, processes: int) -> Measured:
    """One run, with the server's CPU during it."""
    stat = Path(f"/proc/{server.pid}/stat")
    compute_before = _compute_threads(server.pid)
    before = server.cpu_seconds(), _cpu_s(stat), time.perf_counter()
    [result] = run_load([load_ghz_config(config)], server.target, processes)
    total, own, wall = (
        now - then
        for now, then in zip(
            (server.cpu_seconds(), _cpu_s(stat), time.perf_counter()), before, strict=True
        )
    )
    compute_after = _compute_threads(server.pid)
    compute, waiting = (compute_after[i] - compute_before[i] for i in (0, 1))
    threads_s = compute_after[2] * wall
    return Measured(
        result,
        total,
        compute,
        total - own if server.processes == 1 else None,
        max(0.0, threads_s - compute - waiting) / threads_s if threads_s else None,
    )


def direct_reference(
    graph_path: Path, work: Path, tenants: Path, models: Path, calls: int
) -> tuple[float, float]:
    """Milliseconds per call of the pipeline itself (same requests, no gRPC, one thread): the
    median call's wall time and its CPU time."""
    from walkrank.graph.store import GraphStore
    from walkrank.model_registry import ModelRegistry
    from walkrank.serving.pipeline import NO_DEADLINE_S, recommend
    from walkrank.serving.tenant_table import TenantTable

    graph = GraphStore.load(graph_path)
    table = TenantTable(tenants, ModelRegistry(models))
    table.reload()
    runtime = table.get(NO_LOG)
    inputs = read_pipeline_inputs(work / "data" / f"{NO_LOG}.json", NO_LOG, "reference", calls)
    # No deadline: the warm-up compiles the kernels when their cache is stale (seconds), and
    # the figure is the pipeline's time, whatever the tenant's deadline_ms.
    unbounded = functools.partial(recommend, time_remaining=lambda: NO_DEADLINE_S)
    for request in inputs[:10]:
        unbounded(graph, runtime, request)
    times, cpu = [], []
    for request in inputs:
        start, start_cpu = time.perf_counter(), time.thread_time()
        unbounded(graph, runtime, request)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
    return float(np.median(times)), float(np.median(cpu))


def figures(run: Measured, scored_per_call: float, cores: int) -> dict[str, Any]:
    s = run.result.summary
    ok_rps = s.ok / s.total_s
    per_call_ms = 1e3 / max(1, s.ok)
    return {
        "requests_per_second": round(s.rps, 1),
        "requests_per_second_per_core": round(s.rps / cores, 1),
        "p50_ms": round(s.p50_ms, 2),
        "p90_ms": round(s.p90_ms, 2),
        "p99_ms": round(s.p99_ms, 2),
        "count": s.count,
        "errors": s.error_count,
        "status_codes": s.status_codes,
        "pins_scored_per_second": round(ok_rps * scored_per_call),
        "pins_scored_per_second_per_core": round(ok_rps * scored_per_call / cores),
        "server_cpu_cores": round(run.server_cpu_s / s.total_s, 2),
        "generator_cpu_cores": round((run.result.generator_cpu_s or 0.0) / s.total_s, 2),
        # CPU per answered call: what each call cost the server's cores, whatever else ran on
        # them (a shared machine's load changes throughput far more than this).
        "server_cpu_ms_per_call": round(run.server_cpu_s * per_call_ms, 3),
        "compute_cpu_ms_per_call": round(run.compute_cpu_s * per_call_ms, 3),
        "compute_blocked_share": (
            None if run.compute_blocked_share is None else round(run.compute_blocked_share, 3)
        ),
        "log_writer_cpu_ms_per_call": (
            None if run.writer_cpu_s is None else round(run.writer_cpu_s * per_call_ms, 3)
        ),
    }


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the runs (errors: the total), plus every run's
    requests/s and p99, so the spread on a shared machine is on record."""

    def median(key: str) -> int | float:
        value = float(np.median([r[key] for r in runs]))
        return round(value) if isinstance(runs[0][key], int) else round(value, 2)

    merged: dict[str, Any] = {
        key: median(key)
        for key, value in runs[0].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    merged["count"] = sum(r["count"] for r in runs)
    merged["errors"] = sum(r["errors"] for r in runs)
    merged["status_codes"] = {
        code: sum(r["status_codes"].get(code, 0) for r in runs)
        for code in {c for r in runs for c in r["status_codes"]}
    }
    merged["runs"] = [
        {"requests_per_second": r["requests_per_second"], "p99_ms": r["p99_ms"]} for r in runs
    ]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick graph (2M edges)")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured run (default 20, 8 with --quick)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--generator-processes", type=int, default=2)
    parser.add_argument(
        "--skip-processes",
        action="store_true",
        help="skip the walkrank serve --processes 2 comparison",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per setting; figures are medians (default 3)"
    )
    args = parser.parse_args(argv)
    from walkrank.graph.synthetic import ensure_graph

    preset = "quick" if args.quick else "bench"
    duration = args.duration or (8.0 if args.quick else 20.0)
    cores = os.cpu_count() or 1
    graph_path = ensure_graph(preset, ROOT / ".cache" / "graphs")
    work = Path(tempfile.mkdtemp(prefix="walkrank-bench-serving-"))
    try:
        tenants, models = prepare(work, graph_path, 1000, args.seed)
        reference_ms, reference_cpu_ms = direct_reference(graph_path, work, tenants, models, 200)
        print(
            f"reference: pipeline called directly, one thread: {reference_ms:.2f} ms per call "
            f"(median) = {1e3 / reference_ms:.0f} calls/s on one core",
            flush=True,
        )
        warm = ghz_config(work, TENANT, 3.0, args.concurrency)
        runs = {
            name: ghz_config(work, name, duration, args.concurrency) for name in (TENANT, NO_LOG)
        }
        metrics_address = f"127.0.0.1:{free_port()}"
        config = write_server_config(
            work / "walkrank.yaml",
            graph_path,
            tenants,
            models,
            work / "logs",
            workers=8,
            metrics_address=metrics_address,
        )
        with ServeProcess(config, work / "server.log") as server:
            run_load([load_ghz_config(warm)], server.target, args.generator_processes)
            before = scraped(metrics_address)
            # Logging on and off alternate, so the machine's drift hits both alike.
            measured = {TENANT: [], NO_LOG: []}
            for _ in range(args.repeat):
                for name in (TENANT, NO_LOG):
                    measured[name].append(measure(server, runs[name], args.generator_processes))
            after = scraped(metrics_address)
        scored_per_call = (after[f"scored/{TENANT}"] - before.get(f"scored/{TENANT}", 0.0)) / max(
            1.0, after[f"ok/{TENANT}"] - before.get(f"ok/{TENANT}", 0.0)
        )
        main_figures, off = (
            median_figures([figures(run, scored_per_call, cores) for run in measured[name]])
            for name in (TENANT, NO_LOG)
        )
        processes = None
        if not args.skip_processes:
            # --processes needs a fixed port and each forked server would bind the metrics port.
            config = write_server_config(
                work / "walkrank-2.yaml", graph_path, tenants, models, work / "logs-2", workers=8
            )
            with ServeProcess(config, work / "server-2.log", processes=2) as server:
                run_load([load_ghz_config(warm)], server.target, args.generator_processes)
                processes = figures(
                    measure(server, runs[TENANT], args.generator_processes), scored_per_call, cores
                )
        report: dict[str, Any] = {
            "graph": preset,
            "cores": cores,
            "concurrency": args.concurrency,
            "duration_s": duration,
            "repeat": args.repeat,
            **main_figures,
            "candidates_scored_per_call": round(scored_per_call, 1),
            "reference_direct_ms": round(reference_ms, 2),
            "served_vs_direct_one_core": round(
                main_figures["requests_per_second_per_core"] * reference_ms / 1e3, 2
            ),
            # The same question asked of CPU time rather than throughput (so idle cores and
            # other load on a shared machine do not enter it): the direct call's CPU
            # milliseconds over the server's CPU milliseconds per call, logging on.
            "reference_direct_cpu_ms": round(reference_cpu_ms, 2),
            "served_vs_direct_cpu": round(
                reference_cpu_ms / main_figures["server_cpu_ms_per_call"], 2
            ),
            "logging_off": off,
            "logging_overhead_throughput": round(
                1 - main_figures["requests_per_second"] / off["requests_per_second"], 3
            ),
            "logging_overhead_p50": round(1 - off["p50_ms"] / main_figures["p50_ms"], 3),
            "logging_overhead_cpu": round(
                1 - off["server_cpu_ms_per_call"] / main_figures["server_cpu_ms_per_call"], 3
            ),
            "log_rows_dropped": round(
                after.get("log_dropped", 0.0) - before.get("log_dropped", 0.0)
            ),
            "processes_2": processes,
            "target_met": (
                main_figures["requests_per_second_per_core"] >= TARGET_RPS_PER_CORE
                and main_figures["p99_ms"] <= TARGET_P99_MS
                and main_figures["errors"] == 0
            ),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    write_report(args.json, report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    rows = [("threads, logging on", report), ("threads, logging off", report["logging_off"])]
    if report["processes_2"]:
        rows.append(("--processes 2, logging on", report["processes_2"]))
    print(
        f"\ngraph {report['graph']}, {report['cores']} cores, concurrency "
        f"{report['concurrency']}, {report['duration_s']:g} s per run, medians of "
        f"{report['repeat']} runs (threads)"
    )
    print(
        f"{'server':28} {'req/s':>7} {'/core':>6} {'p50':>7} {'p90':>7} {'p99':>7} "
        f"{'errors':>6} {'scored/s/core':>13} {'srv cores':>9} {'gen cores':>9}"
    )
    for name, r in rows:
        print(
            f"{name:28} {r['requests_per_second']:7.1f} {r['requests_per_second_per_core']:6.1f} "
            f"{r['p50_ms']:7.2f} {r['p90_ms']:7.2f} {r['p99_ms']:7.2f} {r['errors']:6d} "
            f"{r['pins_scored_per_second_per_core']:13,d} {r['server_cpu_cores']:9.2f} "
            f"{r['generator_cpu_cores']:9.2f}"
        )
    for name, r in rows[:2]:
        print(
            f"{name} runs (req/s, p99 ms): "
            + ", ".join(
                f"{run['requests_per_second']:.1f} / {run['p99_ms']:.1f}" for run in r["runs"]
            )
        )
    print(
        f"logging overhead: {report['logging_overhead_throughput']:.1%} of throughput, "
        f"{report['logging_overhead_p50']:.1%} of p50, {report['logging_overhead_cpu']:.1%} of "
        f"the server's CPU per call; log rows dropped: {report['log_rows_dropped']:,}"
    )
    for name, r in rows[:2]:
        writer = r["log_writer_cpu_ms_per_call"]
        rest = r["server_cpu_ms_per_call"] - r["compute_cpu_ms_per_call"] - writer
        print(
            f"server CPU per call, {name}: {r['server_cpu_ms_per_call']:.2f} ms = compute "
            f"threads {r['compute_cpu_ms_per_call']:.2f} + log writer {writer:.2f} + gRPC and "
            f"the rest {rest:.2f}; compute threads blocked (the GIL) "
            f"{r['compute_blocked_share']:.1%} of their time"
        )
    print(
        f"reference (direct pipeline, one thread): {report['reference_direct_ms']:.2f} ms/call;"
        f" served req/s per core x direct ms = {report['served_vs_direct_one_core']:.2f}; "
        f"direct CPU {report['reference_direct_cpu_ms']:.2f} ms / server CPU per call = "
        f"{report['served_vs_direct_cpu']:.2f}"
    )
    print(
        f"target (>= {TARGET_RPS_PER_CORE:g} req/s per core, p99 <= {TARGET_P99_MS:g} ms, no "
        f"errors): {'met' if report['target_met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    sys.exit(main())
