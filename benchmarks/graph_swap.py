"""Graph swaps under load: home-feed calls against `walkrank serve` following a graph repository
while its CURRENT flips between two versions and `Admin.Reload` swaps them in.

The server serves the load-test kit's home-feed settings (benchmarks/serving.py: the shipped
tenant, a 100-tree depth-6 model, concurrency 8 from the built-in generator). Two versions of
the preset graph are published (the preset's seed and the next one: same ids, other edges).
Two runs of `--duration` seconds each:
- steady: no swaps, the baseline p99;
- swapping: every `--every` seconds CURRENT is pointed at the other version and Admin.Reload
  swaps it in (open, verify, page in, warm up, swap).
A call is "during a swap" when it overlaps [Reload sent, Reload answered + `--settle`], so the
first calls on the new graph count too. Targets: 0 failed calls; p99 during swaps <= 1.5x the
steady p99. Also measured in this process: the first calls on a freshly opened version with
and without paging it in.

    python benchmarks/graph_swap.py [--quick] [--duration S] [--every S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serving import NO_LOG, TENANT, ghz_config, prepare

from loadgen.generator import RunResult, run_load
from loadgen.ghz_config import load_ghz_config
from loadgen.harness import ServeProcess, write_server_config
from loadgen.report import nearest_rank, write_report
from loadgen.traffic import read_pipeline_inputs

ROOT = Path(__file__).resolve().parents[1]

TARGET_P99_RATIO = 1.5


def publish_versions(repo: Path, preset: str) -> list[float]:
    """Versions 1 and 2 of the preset (its seed, then the next); seconds per publish."""
    from walkrank.graph.build import build_graph
    from walkrank.graph.repository import GraphRepository
    from walkrank.graph.synthetic import PRESETS, generate_graph_tables

    seconds = []
    for offset in (0, 1):
        params = {**PRESETS[preset], "seed": PRESETS[preset]["seed"] + offset}
        tables = generate_graph_tables(**params)
        started = time.perf_counter()
        GraphRepository(repo).publish(
            lambda out, t=tables, p=params: build_graph(
                out, t.edges, t.pins, t.boards, source={"benchmark": "graph_swap", **p}
            ),
            keep=None,
        )
        seconds.append(time.perf_counter() - started)
    return seconds


def first_calls(repo: Path, work: Path, tenants: Path, models: Path, calls: int) -> dict[str, Any]:
    """Milliseconds of the first `calls` pipeline calls on a freshly opened version, paged in
    or not (the same requests, kernels already loaded), and the page-in itself."""
    from walkrank.model_registry import ModelRegistry
    from walkrank.serving.graphs import open_graph
    from walkrank.serving.pipeline import recommend
    from walkrank.serving.tenant_table import TenantTable

    table = TenantTable(tenants, ModelRegistry(models))
    table.reload()
    runtime = table.get(NO_LOG)
    inputs = read_pipeline_inputs(work / "data" / f"{NO_LOG}.json", NO_LOG, "first", calls)
    warm = open_graph(repo / "1")
    for request in inputs[:5]:  # load the compiled kernels once
        recommend(warm.store, runtime, request)
    warm.release()
    del warm
    result: dict[str, Any] = {}
    for label, page_in in (("without_page_in", False), ("with_page_in", True)):
        served = open_graph(repo / "2", page_in=page_in)
        times = []
        for request in inputs:
            started = time.perf_counter()
            recommend(served.store, runtime, request)
            times.append((time.perf_counter() - started) * 1e3)
        result[label] = {
            "first_call_ms": round(times[0], 2),
            "first_calls_mean_ms": round(float(np.mean(times)), 2),
            "open_and_verify_s": round(served.open_s, 4),
            "page_in_s": round(served.page_in_s, 4),
        }
        served.release()
        del served
    return result


class Swapper(threading.Thread):
    """Every `every` seconds: point CURRENT at the other version, then Admin.Reload."""

    def __init__(self, repo: Path, target: str, every: float) -> None:
        super().__init__(name="swapper", daemon=True)
        self.repo, self.target, self.every = repo, target, every
        self.stop = threading.Event()
        self.windows: list[tuple[float, float]] = []  # (Reload sent, answered), monotonic
        self.problems: list[str] = []

    def run(self) -> None:
        from walkrank.graph.repository import CURRENT_FILE
        from walkrank.pointers import write_version
        from walkrank_client.pb.walkrank.v1 import admin_pb2, admin_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            version = 1
            while not self.stop.wait(self.every):
                version = 3 - version
                # Written directly, not `rollback` (which verifies): this process shares the
                # server's cores, and a publisher runs elsewhere.
                write_version(self.repo / CURRENT_FILE, version)
                sent = time.monotonic()
                response = admin.Reload(admin_pb2.ReloadRequest(), timeout=60)
                self.windows.append((sent, time.monotonic()))
                kinds = [c.kind for c in response.changes]
                if response.errors or kinds != ["graph"]:
                    self.problems.append(
                        f"swap to {version}: changes {kinds}, errors "
                        f"{[e.message for e in response.errors]}"
                    )


def split(
    result: RunResult, windows: list[tuple[float, float]], settle_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """OK latencies of calls overlapping a swap window, and of the others."""
    sent, latency = result.sent_at, result.latencies_ms
    ended = sent + latency / 1e3
    during = np.zeros(len(sent), dtype=bool)
    for start, end in windows:
        during |= (sent <= end + settle_s) & (ended >= start)
    ok = np.asarray(result.codes) == "OK"
    return latency[during & ok], latency[~during & ok]


def percentiles(latencies: np.ndarray) -> dict[str, Any]:
    ordered = np.sort(latencies)
    if not len(ordered):
        return {"count": 0}
    return {
        "count": int(len(ordered)),
        "p50_ms": round(nearest_rank(ordered, 50), 2),
        "p99_ms": round(nearest_rank(ordered, 99), 2),
        "max_ms": round(float(ordered[-1]), 2),
    }


def server_swap_timings(log_text: str) -> dict[str, Any]:
    """The server's own account of each swap (its log line)."""
    found = re.findall(
        r"opened and verified in ([\d.]+) s, paged in ([\d.]+) s, ready after "
        r"([\d.]+) s",
        log_text,
    )
    if not found:
        return {}
    opened, paged, ready = (np.array([float(f[i]) for f in found]) for i in range(3))
    return {
        "swaps_logged": len(found),
        "open_and_verify_s_median": round(float(np.median(opened)), 3),
        "page_in_s_median": round(float(np.median(paged)), 3),
        "ready_s_median": round(float(np.median(ready)), 3),
        "ready_s_max": round(float(ready.max()), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick graph (2M edges)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per run (default 60, 20 with --quick)"
    )
    parser.add_argument("--every", type=float, default=3.0, help="seconds between swaps")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds after a Reload answers that still count as the swap",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--generator-processes", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    preset = "quick" if args.quick else "bench"
    duration = args.duration or (20.0 if args.quick else 60.0)
    work = Path(tempfile.mkdtemp(prefix="walkrank-bench-swap-"))
    try:
        repo = work / "graphs"
        publish_s = publish_versions(repo, preset)
        print(
            f"published versions 1 and 2 of {preset!r} in {publish_s[0]:.1f} s and "
            f"{publish_s[1]:.1f} s",
            flush=True,
        )
        from walkrank.graph.repository import CURRENT_FILE
        from walkrank.pointers import write_version

        write_version(repo / CURRENT_FILE, 1)
        tenants, models = prepare(work, repo / "1", 1000, args.seed)
        first = first_calls(repo, work, tenants, models, 20)
        (tenants / f"{NO_LOG}.yaml").rename(work / f"{NO_LOG}.yaml")  # served: home feed only
        warm = ghz_config(work, TENANT, 3.0, args.concurrency)
        run = ghz_config(work, TENANT, duration, args.concurrency)
        config = write_server_config(
            work / "walkrank.yaml", repo, tenants, models, work / "logs", workers=8
        )
        with ServeProcess(config, work / "server.log") as server:
            run_load([load_ghz_config(warm)], server.target, args.generator_processes)
            [steady] = run_load([load_ghz_config(run)], server.target, args.generator_processes)
            swapper = Swapper(repo, server.target, args.every)
            swapper.start()
            [swapping] = run_load([load_ghz_config(run)], server.target, args.generator_processes)
            swapper.stop.set()
            swapper.join()
        log_text = (work / "server.log").read_text()
        during, between = split(swapping, swapper.windows, args.settle)
        steady_ok = steady.latencies_ms[np.asarray(steady.codes) == "OK"]
        failed = sum(c != "OK" for c in steady.codes) + sum(c != "OK" for c in swapping.codes)
        reloads_ms = [(end - start) * 1e3 for start, end in swapper.windows]
        report: dict[str, Any] = {
            "graph": preset,
            "cores": os.cpu_count(),
            "concurrency": args.concurrency,
            "duration_s": duration,
            "swap_every_s": args.every,
            "settle_s": args.settle,
            "publish_s": [round(s, 1) for s in publish_s],
            "swaps": len(swapper.windows),
            "swap_problems": swapper.problems,
            "reload_ms_median": round(float(np.median(reloads_ms)), 1) if reloads_ms else None,
            "reload_ms_max": round(max(reloads_ms), 1) if reloads_ms else None,
            "server": server_swap_timings(log_text),
            "failed_calls": int(failed),
            "errors": {**steady.summary.errors, **swapping.summary.errors},
            "steady": {**percentiles(steady_ok), "rps": round(steady.summary.rps, 1)},
            "during_swaps": percentiles(during),
            "between_swaps": percentiles(between),
            "swapping_run_rps": round(swapping.summary.rps, 1),
            "first_calls": first,
        }
        report["during_vs_steady_p99"] = (
            round(report["during_swaps"]["p99_ms"] / report["steady"]["p99_ms"], 3)
            if report["during_swaps"]["count"]
            else None
        )
        report["target_met"] = (
            failed == 0
            and not swapper.problems
            and len(swapper.windows) > 0
            and report["during_vs_steady_p99"] is not None
            and report["during_vs_steady_p99"] <= TARGET_P99_RATIO
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
