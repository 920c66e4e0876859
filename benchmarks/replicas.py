"""Replicas benchmark: the home-feed load direct, through Envoy, and over two replicas.

The load-test kit's home-feed load (the built-in generator, concurrency 8, the tenant's
100-tree depth-6 model, every request logged; as benchmarks/serving.py) against, in the same
run and alternating so the machine's drift hits all alike:

- `direct_1`: one replica called directly: today's single `walkrank serve` process;
- `envoy_1`: the same replica through Envoy (`walkrank serve --replicas 1`), so
  `envoy_overhead` = 1 - envoy_1 / direct_1 requests/s is what the balancer costs;
- `envoy_2`: two replicas through Envoy (`walkrank serve --replicas 2`).

Then on the two replicas, under the same load: resident memory (each replica maps the whole
graph; the proportional shares must add up to one copy), a model published and reloaded on
each replica, a SIGHUP rolling restart, and a replica killed with SIGKILL (failed calls and
the time Envoy took to eject it). Targets on a 2-core machine: overhead <= 10%, two replicas
faster than one direct with a p99 no worse, no errors. Each replica runs the launcher's
default compute slots, cores / N (`compute_slots` in the report).

    python benchmarks/replicas.py [--quick] [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from serving import TENANT, ghz_config, prepare

from loadgen.generator import RunResult, run_load
from loadgen.ghz_config import load_ghz_config
from loadgen.harness import process_cpu_seconds, stop_process, write_server_config
from loadgen.models import publish_random_model
from loadgen.report import write_report
from walkrank.envoy import host_health
from walkrank.replicas import (
    BANNER,
    ReplicaPlan,
    free_port_run,
    memory_kib,
    parse_banner,
    replica_pids,
)
from walkrank.serving.scheduler import slots_per_process
from walkrank_client import WalkRankClient

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = ("direct_1", "envoy_1", "envoy_2")
TARGET_OVERHEAD = 0.10
START_TIMEOUT_S = 300.0


class Launcher:
    """`walkrank serve --replicas N` as a child process; a context manager."""

    def __init__(self, config: Path, replicas: int, log_path: Path, envoy_concurrency: int) -> None:
        self.command = [
            sys.executable,
            "-m",
            "walkrank.cli",
            "serve",
            "--config",
            str(config),
            "--address",
            f"127.0.0.1:{free_port_run(1)}",
            "--replicas",
            str(replicas),
            "--replica-base-port",
            "0",
            "--envoy-admin-address",
            f"127.0.0.1:{free_port_run(1)}",
            "--envoy-concurrency",
            str(envoy_concurrency),
        ]
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self.plan: ReplicaPlan | None = None

    def __enter__(self) -> Launcher:
        log = open(self.log_path, "w")  # noqa: SIM115 (the child writes it until stopped)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while not line.startswith(BANNER):
            line = self.process.stdout.readline()
            if (not line and self.process.poll() is not None) or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(
                    f"launcher did not serve; log {self.log_path}:\n"
                    f"{self.log_path.read_text()[-3000:]}"
                )
        self.plan = parse_banner(line)
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return process_cpu_seconds(self.process.pid)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=90)


def figures(result: RunResult, server_cpu_s: float, cores: int) -> dict[str, Any]:
    s = result.summary
    return {
        "rps": round(s.rps, 1),
        "rps_per_core": round(s.rps / cores, 1),
        "p50_ms": round(s.p50_ms, 2),
        "p99_ms": round(s.p99_ms, 2),
        "count": s.count,
        "errors": s.error_count,
        "status_codes": s.status_codes,
        "server_cpu_cores": round(server_cpu_s / s.total_s, 2),
        "generator_cpu_cores": round((result.generator_cpu_s or 0.0) / s.total_s, 2),
    }


def measure(target: str, launcher: Launcher, config: Path, processes: int) -> dict[str, Any]:
    cpu_before = launcher.cpu_seconds()
    [result] = run_load([load_ghz_config(config)], target, processes)
    return figures(result, launcher.cpu_seconds() - cpu_before, os.cpu_count() or 1)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged = {
        key: round(float(np.median([r[key] for r in runs])), 2)
        for key in (
            "rps",
            "rps_per_core",
            "p50_ms",
            "p99_ms",
            "server_cpu_cores",
            "generator_cpu_cores",
        )
    }
    merged["errors"] = sum(r["errors"] for r in runs)
    merged["count"] = sum(r["count"] for r in runs)
    merged["runs"] = [{"rps": r["rps"], "p99_ms": r["p99_ms"]} for r in runs]
    return merged


def memory(launcher: Launcher, graph: Path) -> dict[str, Any]:
    """Per replica: whole-process Rss/Pss/private, and the graph mappings' Rss/Pss (MiB)."""
    assert launcher.process is not None
    mib = 1 / 1024
    replicas = []
    for address, pid in sorted(replica_pids(launcher.process.pid).items()):
        whole, mapped = memory_kib(pid), memory_kib(pid, graph)
        # The replica's children: its candidate-log writer process.
        writers = [
            memory_kib(int(child))
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
        replicas.append(
            {
                "address": address,
                "rss_mib": round(whole["Rss"] * mib, 1),
                "pss_mib": round(whole["Pss"] * mib, 1),
                "private_mib": round((whole["Private_Clean"] + whole["Private_Dirty"]) * mib, 1),
                "graph_rss_mib": round(mapped["Rss"] * mib, 1),
                "graph_pss_mib": round(mapped["Pss"] * mib, 1),
                "log_writer_rss_mib": round(sum(w["Rss"] for w in writers) * mib, 1),
                "log_writer_private_mib": round(
                    sum(w["Private_Clean"] + w["Private_Dirty"] for w in writers) * mib, 1
                ),
            }
        )
    envoy = [
        int(pid)
        for pid in Path(f"/proc/{launcher.process.pid}/task/{launcher.process.pid}/children")
        .read_text()
        .split()
        if "envoy" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    return {
        "graph_files_mib": round(sum(f.stat().st_size for f in graph.iterdir()) / 2**20, 1),
        "replicas": replicas,
        "graph_pss_sum_mib": round(sum(r["graph_pss_mib"] for r in replicas), 1),
        "envoy_rss_mib": round(memory_kib(envoy[0])["Rss"] * mib, 1) if envoy else None,
    }


def under_load(
    target: str, config: Path, processes: int, action: Callable[[], Any], after_s: float
) -> tuple[dict[str, Any], Any]:
    """Run the load; `after_s` seconds in, `action()`; the load's figures and its result."""
    outcome: dict[str, Any] = {}

    def load() -> None:
        [outcome["result"]] = run_load([load_ghz_config(config)], target, processes)

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(after_s)
    acted = action()
    thread.join()
    summary = outcome["result"].summary
    return {
        "count": summary.count,
        "errors": summary.error_count,
        "status_codes": summary.status_codes,
        "p99_ms": round(summary.p99_ms, 2),
    }, acted


def rolling(
    launcher: Launcher,
    work: Path,
    tenants: Path,
    models: Path,
    config: Path,
    processes: int,
    duration_s: float,
    seed: int,
) -> dict[str, Any]:
    """Model reload on each replica, a SIGHUP restart, a SIGKILL, each under load."""
    plan = launcher.plan
    assert plan is not None and launcher.process is not None
    version = publish_random_model(models, tenants / f"{TENANT}.yaml", seed=seed + 1)

    def reload_each() -> dict[str, str]:
        with WalkRankClient(list(plan.replicas), timeout=60.0) as client:
            return {
                a: "error" if isinstance(r, Exception) or r.errors else "ok"
                for a, r in client.reload_each([TENANT]).items()
            }

    reload, reloaded = under_load(plan.front, config, processes, reload_each, duration_s / 3)
    reload["replicas"] = reloaded
    reload["model_version"] = version

    def restart() -> None:
        before = set(replica_pids(launcher.process.pid).values())
        launcher.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (
            len(set(replica_pids(launcher.process.pid).values()) - before) < len(plan.replicas)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)

    restart_config = ghz_config(work, TENANT, duration_s * 3, 8)
    restarted, _ = under_load(plan.front, restart_config, processes, restart, duration_s / 3)

    def kill() -> float:
        victim = plan.replicas[-1]
        os.kill(replica_pids(launcher.process.pid)[victim], signal.SIGKILL)
        killed = time.monotonic()
        while not host_health(plan.envoy_admin).get(victim):
            time.sleep(0.005)
        return round(time.monotonic() - killed, 3)

    killed, ejected_s = under_load(plan.front, config, processes, kill, duration_s / 3)
    killed["ejected_after_s"] = ejected_s
    return {"reload_each": reload, "sighup_restart": restarted, "kill_one": killed}


def machine() -> dict[str, Any]:
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cores": os.cpu_count() or 1,
        "cpu": model,
        "l3": l3.read_text().strip() if l3.exists() else "unknown",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the quick graph (2M edges), 3 s per run, one repeat"
    )
    parser.add_argument("--duration", type=float, help="seconds per run (default 20)")
    parser.add_argument("--repeat", type=int, help="runs per setting (default 3, quick 1)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--generator-processes", type=int, default=2)
    parser.add_argument(
        "--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)"
    )
    parser.add_argument(
        "--skip-rolling", action="store_true", help="skip the reload / restart / kill runs"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    from walkrank.graph.store import GraphStore
    from walkrank.graph.synthetic import ensure_graph

    preset = "quick" if args.quick else "bench"
    duration = args.duration or (3.0 if args.quick else 20.0)
    repeat = args.repeat or (1 if args.quick else 3)
    graph_path = ensure_graph(preset, ROOT / ".cache" / "graphs")
    graph = GraphStore.load(graph_path, verify=False)
    work = Path(tempfile.mkdtemp(prefix="walkrank-bench-replicas-"))
    try:
        tenants, models = prepare(work, graph_path, 1000, args.seed)
        warm = ghz_config(work, TENANT, 2.0, args.concurrency)
        run = ghz_config(work, TENANT, duration, args.concurrency)
        configs = {
            n: write_server_config(
                work / f"walkrank-{n}.yaml",
                graph_path,
                tenants,
                models,
                work / f"logs-{n}",
                workers=8,
            )
            for n in (1, 2)
        }
        with (
            Launcher(configs[1], 1, work / "launcher-1.log", args.envoy_concurrency) as one,
            Launcher(configs[2], 2, work / "launcher-2.log", args.envoy_concurrency) as two,
        ):
            assert one.plan is not None and two.plan is not None
            targets = {
                "direct_1": (one.plan.replicas[0], one),
                "envoy_1": (one.plan.front, one),
                "envoy_2": (two.plan.front, two),
            }
            for target, _ in targets.values():
                run_load([load_ghz_config(warm)], target, args.generator_processes)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
            for _ in range(repeat):
                for name in SETTINGS:
                    target, launcher = targets[name]
                    runs[name].append(measure(target, launcher, run, args.generator_processes))
                    print(
                        f"{name}: {runs[name][-1]['rps']} req/s, p99 {runs[name][-1]['p99_ms']} ms",
                        flush=True,
                    )
            memory_two = memory(two, graph_path)
            rolled = (
                None
                if args.skip_rolling
                else rolling(
                    two, work, tenants, models, run, args.generator_processes, duration, args.seed
                )
            )
        report = build_report(preset, graph, duration, repeat, args, runs, memory_two, rolled)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    write_report(args.json, report)
    return 0


def build_report(
    preset: str,
    graph: Any,
    duration: float,
    repeat: int,
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    memory_two: dict[str, Any],
    rolled: dict[str, Any] | None,
) -> dict[str, Any]:
    settings = {name: medians(runs[name]) for name in SETTINGS}
    direct, via_one, via_two = (settings[n] for n in SETTINGS)
    overhead = 1 - via_one["rps"] / direct["rps"]
    errors = sum(s["errors"] for s in settings.values())
    return {
        **machine(),
        "graph": preset,
        "graph_edges": graph.n_edges,
        "graph_pins": graph.n_pins,
        "graph_mib": memory_two["graph_files_mib"],
        "concurrency": args.concurrency,
        "duration_s": duration,
        "repeat": repeat,
        "envoy_concurrency": args.envoy_concurrency,
        # What each replica ran: the launcher's default, cores / N (walkrank serve --replicas).
        "compute_slots": {
            name: slots_per_process(None, int(name.rpartition("_")[2])) for name in SETTINGS
        },
        **{f"{name}_rps": settings[name]["rps"] for name in SETTINGS},
        **{f"{name}_p99_ms": settings[name]["p99_ms"] for name in SETTINGS},
        **{f"{name}_rps_per_core": settings[name]["rps_per_core"] for name in SETTINGS},
        "envoy_overhead": round(overhead, 3),
        "envoy_2_vs_direct_1": round(via_two["rps"] / direct["rps"], 3),
        "errors": errors,
        "targets": {
            "envoy_overhead_at_most_10pct": overhead <= TARGET_OVERHEAD,
            "two_replicas_faster_than_one_direct": via_two["rps"] > direct["rps"],
            "two_replicas_p99_no_worse": via_two["p99_ms"] <= direct["p99_ms"],
            "no_errors": errors == 0,
        },
        "settings": settings,
        "memory_two_replicas": memory_two,
        "rolling": rolled,
    }


if __name__ == "__main__":
    sys.exit(main())
