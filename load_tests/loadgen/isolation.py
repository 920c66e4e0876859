"""Overload isolation: what one tenant far past its quota costs another tenant.

`measure_isolation` runs five phases against a running server, each for `duration_s`:

1. the victim alone (its unloaded latency, and the server's CPU per served call);
2. the aggressor at its quota alone (the server's CPU per served aggressor call);
3. the aggressor at `factor` x its quota alone (the server's CPU per refusal, once the
   served calls of phase 2's cost are taken out);
4. the victim beside the aggressor at its quota (what the aggressor's admitted work costs);
5. the victim beside the aggressor at `factor` x its quota, and a probe: a few paced calls
   of the aggressor's tenant. The victim's latency beside the overload, and the refusals'.

`isolation_p99_ratio` is phase 5's victim p99 over phase 1's; `overload_p99_ratio` over
phase 4's, the cost of the refusals alone. `refusal_p99_ms` is the p99 of the probe's
refusals: how long a caller of the overloaded tenant waits to hear no. The flood's own
refusals (`flood_refusal_p99_ms`) say more about the generator than the server: its callers
send back to back, so each waits behind the others' turns in the generator's event loop
(Little's law: callers / calls per second).

Each load runs in its own process (asyncio `grpc.aio` callers on one channel, requests
serialized once), so the generator's CPU, which shares the server's cores, is measured and
reported beside every figure. Latency percentiles are nearest-rank, per status code. Every
load reports the calls it made a second (`rps`: for the aggressor, its attempts, refused or
not), so a reader sees what the aggressor offered in each phase.

With `--idle-aggressor` (a variant, reported beside the measurement, never instead of it) the
aggressor's generator processes run at SCHED_IDLE: they get a core only when nothing else
wants it, standing in for remote callers whose CPU is not on the server's machine, which is
what a server's tenants are. Whether the aggressor still offered 16x its quota shows in its
`rps`.

With `--envoy`, the same phases run through an Envoy in front of the server with per-tenant
admission (`walkrank.envoy`, `tenant_quotas`): every load sends its tenant in the
`x-walkrank-tenant` header, as the SDK does, and Envoy's CPU is reported beside the server's.

    cd load_tests && python -m loadgen.isolation --graph quick --json isolation.json
    cd load_tests && python -m loadgen.isolation --graph quick --envoy --json isolation.json
    cd load_tests && python -m loadgen.isolation --graph quick --envoy --idle-aggressor
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loadgen.report import nearest_rank
from walkrank.envoy import EnvoyProcess, EnvoySettings, tenant_quotas
from walkrank.serving.auth import TENANT_HEADER

RECOMMEND = "/walkrank.v1.Recommender/Recommend"
HERE = Path(__file__).resolve().parents[1]
#: The probe: paced calls of the overloaded tenant, whose refusals' latency is measured.
PROBE_RPS = 50.0
PROBE_CONCURRENCY = 2
#: Whether this platform has SCHED_IDLE (Linux), which the `--idle-aggressor` variant needs.
IDLE_SCHEDULING = hasattr(os, "SCHED_IDLE")


@dataclass(frozen=True)
class Load:
    """Callers sending `requests` (serialized, round-robin) back to back, or paced to `rps`."""

    name: str
    requests: tuple[bytes, ...]
    concurrency: int
    rps: float | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    method: str = RECOMMEND
    timeout_s: float = 5.0
    #: Run the generator at SCHED_IDLE (it gets a core only when nothing else wants one).
    idle: bool = False


def tagged(load: Load, tenant: str) -> Load:
    """`load` sending its tenant in the header Envoy admits by (as the SDK does)."""
    return replace(load, metadata=(*load.metadata, (TENANT_HEADER, tenant)))


@dataclass
class LoadResult:
    """Every call's latency and status code, and the generator process's CPU."""

    latencies_ms: np.ndarray
    codes: np.ndarray
    wall_s: float
    cpu_s: float

    def count(self, code: str | None = None) -> int:
        return int(len(self.codes) if code is None else np.sum(self.codes == code))

    def percentile_ms(self, p: int, code: str = "OK") -> float:
        values = np.sort(self.latencies_ms[self.codes == code])
        return nearest_rank(values, p) if len(values) else float("nan")

    def summary(self) -> dict[str, Any]:
        codes, counts = np.unique(self.codes, return_counts=True)
        out: dict[str, Any] = {
            "calls": self.count(),
            "rps": self.count() / self.wall_s,
            "statuses": dict(zip(codes.tolist(), counts.tolist(), strict=True)),
            "generator_cores": self.cpu_s / self.wall_s,
        }
        for code in ("OK", "RESOURCE_EXHAUSTED"):
            if self.count(code):
                key = "ok" if code == "OK" else "refused"
                out[f"{key}_p50_ms"] = self.percentile_ms(50, code)
                out[f"{key}_p99_ms"] = self.percentile_ms(99, code)
        return out


async def _drive(
    target: str, load: Load, duration_s: float, start: Callable[[], Any]
) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    codes: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_unary(load.method)
        await start()
        began = time.monotonic()
        end = began + duration_s
        issued = 0

        async def caller() -> None:
            nonlocal issued
            while time.monotonic() < end:
                number = issued
                issued += 1
                if load.rps:
                    delay = began + number / load.rps - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                sent = time.perf_counter()
                try:
                    await call(
                        load.requests[number % len(load.requests)],
                        timeout=load.timeout_s,
                        metadata=load.metadata,
                    )
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                latencies.append((time.perf_counter() - sent) * 1e3)
                codes.append(code)

        await asyncio.gather(*(caller() for _ in range(load.concurrency)))
        return latencies, codes, time.monotonic() - began


def _child(target: str, load: Load, duration_s: float, ready: Any, go: Any, out: Any) -> None:
    try:
        if load.idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        cpu = 0.0

        async def start() -> None:
            nonlocal cpu
            ready.put(load.name)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            times = os.times()
            cpu = times.user + times.system

        latencies, codes, wall = asyncio.run(_drive(target, load, duration_s, start))
        times = os.times()
        out.put((load.name, latencies, codes, wall, times.user + times.system - cpu, None))
    except BaseException as exc:  # reported, so the parent fails with the cause
        ready.put(load.name)
        out.put((load.name, [], [], 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def run_loads(target: str, loads: Sequence[Load], duration_s: float) -> dict[str, LoadResult]:
    """Run the loads at the same time, one process each, all starting on one signal."""
    context = mp.get_context("spawn")
    ready, go, out = context.Queue(), context.Event(), context.Queue()
    children = [
        context.Process(target=_child, args=(target, load, duration_s, ready, go, out), daemon=True)
        for load in loads
    ]
    for child in children:
        child.start()
    try:
        for _ in children:
            ready.get(timeout=60)
        go.set()
        results = {}
        for _ in children:
            name, latencies, codes, wall, cpu, failure = out.get(timeout=duration_s + 60)
            if failure is not None:
                raise RuntimeError(f"load {name!r} failed: {failure}")
            results[name] = LoadResult(
                np.asarray(latencies), np.asarray(codes, dtype=object), wall, cpu
            )
    finally:
        go.set()
        for child in children:
            child.join(timeout=10)
    return results


@dataclass
class IsolationReport:
    """The five phases' figures; `to_dict` is what a harness writes as JSON."""

    factor: int
    quota: int
    idle_aggressor: bool = False  # the aggressor's generator ran at SCHED_IDLE
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    idle_cores: float = 0.0  # the server's CPU use with no calls (polling threads, writers)
    #: The proxy's (Envoy's) CPU per phase, when the loads go through one, less its idle use
    #: (health checks, stats).
    proxy_cpu_s: dict[str, float] = field(default_factory=dict)
    proxy_idle_cores: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        alone = self.phases["victim_alone"]["victim"]
        at_quota = self.phases["beside_quota"]["victim"]
        loaded = self.phases["together"]["victim"]
        flood = self.phases["together"]["aggressor"]
        probe = self.phases["together"]["probe"]
        return {
            "factor": self.factor,
            "quota": self.quota,
            "idle_aggressor": self.idle_aggressor,
            "aggressor_at_quota_rps": self.phases["aggressor_at_quota"]["aggressor"]["rps"],
            "aggressor_flood_rps": self.phases["aggressor_flood"]["aggressor"]["rps"],
            "aggressor_together_rps": flood["rps"],
            "victim_alone_p50_ms": alone["ok_p50_ms"],
            "victim_alone_p99_ms": alone["ok_p99_ms"],
            "victim_beside_quota_p50_ms": at_quota["ok_p50_ms"],
            "victim_beside_quota_p99_ms": at_quota["ok_p99_ms"],
            "victim_loaded_p50_ms": loaded["ok_p50_ms"],
            "victim_loaded_p99_ms": loaded["ok_p99_ms"],
            "isolation_p99_ratio": loaded["ok_p99_ms"] / alone["ok_p99_ms"],
            "overload_p99_ratio": loaded["ok_p99_ms"] / at_quota["ok_p99_ms"],
            "refusal_p50_ms": probe.get("refused_p50_ms", float("nan")),
            "refusal_p99_ms": probe.get("refused_p99_ms", float("nan")),
            "flood_refusal_p50_ms": flood.get("refused_p50_ms", float("nan")),
            "flood_refusal_p99_ms": flood.get("refused_p99_ms", float("nan")),
            **self.cpu_per_call(self.server_cpu_s, "server"),
            **(self.cpu_per_call(self.proxy_cpu_s, "proxy") if self.proxy_cpu_s else {}),
            "phases": self.phases,
            "server_cpu_s": self.server_cpu_s,
            "proxy_cpu_s": self.proxy_cpu_s,
            "server_idle_cores": self.idle_cores,
            "proxy_idle_cores": self.proxy_idle_cores,
        }

    def cpu_per_call(self, cpu_s: dict[str, float], who: str) -> dict[str, float]:
        """`who`'s CPU ms (from `cpu_s`, per phase) per served victim call, per served
        aggressor call and per refusal."""
        victim = self.phases["victim_alone"]["victim"]
        at_quota = self.phases["aggressor_at_quota"]["aggressor"]
        flood = self.phases["aggressor_flood"]["aggressor"]
        served_ms = 1e3 * cpu_s["victim_alone"] / max(victim["calls"], 1)
        aggressor_ms = 1e3 * cpu_s["aggressor_at_quota"] / max(at_quota["calls"], 1)
        refused = flood["statuses"].get("RESOURCE_EXHAUSTED", 0)
        served = flood["statuses"].get("OK", 0)
        refusal_ms = (1e3 * cpu_s["aggressor_flood"] - served * aggressor_ms) / max(refused, 1)
        return {
            f"{who}_cpu_ms_per_victim_call": served_ms,
            f"{who}_cpu_ms_per_aggressor_call": aggressor_ms,
            f"{who}_cpu_ms_per_refusal": refusal_ms,
        }


def measure_isolation(
    target: str,
    server_cpu_s: Callable[[], float],
    victim: Load,
    aggressor: Load,
    quota: int,
    factor: int = 16,
    flood_rps: float | None = None,
    duration_s: float = 8.0,
    log: Callable[[str], None] = lambda line: None,
    proxy_cpu_s: Callable[[], float] | None = None,
    idle_aggressor: bool = False,
) -> IsolationReport:
    """The five phases (module docstring) against the server at `target`.

    `server_cpu_s` reads the server's CPU seconds so far (e.g. `ServeProcess.cpu_seconds`),
    `proxy_cpu_s` the proxy's when `target` is one; `aggressor.concurrency` is ignored:
    phase 2 uses `quota` callers, phases 3-5 `factor` x it, back to back or, with
    `flood_rps`, paced to that many calls a second (to compare refusals at equal rates).
    `idle_aggressor`: the aggressor's loads (not the probe's) run at SCHED_IDLE.
    """
    report = IsolationReport(factor=factor, quota=quota, idle_aggressor=idle_aggressor)
    proxy_cpu = proxy_cpu_s or float  # float() is 0.0: no proxy
    before, proxy_before = server_cpu_s(), proxy_cpu()
    time.sleep(2.0)
    report.idle_cores = (server_cpu_s() - before) / 2.0
    report.proxy_idle_cores = (proxy_cpu() - proxy_before) / 2.0
    at_quota = replace(aggressor, concurrency=quota, idle=idle_aggressor)
    flood = replace(aggressor, concurrency=quota * factor, rps=flood_rps, idle=idle_aggressor)
    probe = replace(aggressor, name="probe", concurrency=PROBE_CONCURRENCY, rps=PROBE_RPS)
    phases = {
        "victim_alone": [victim],
        "aggressor_at_quota": [at_quota],
        "aggressor_flood": [flood],
        "beside_quota": [victim, at_quota],
        "together": [victim, flood, probe],
    }
    for phase, loads in phases.items():
        before, proxy_before = server_cpu_s(), proxy_cpu()
        results = run_loads(target, loads, duration_s)
        report.server_cpu_s[phase] = server_cpu_s() - before - report.idle_cores * duration_s
        if proxy_cpu_s:
            report.proxy_cpu_s[phase] = (
                proxy_cpu() - proxy_before - report.proxy_idle_cores * duration_s
            )
        report.phases[phase] = {load.name: results[load.name].summary() for load in loads}
        log(
            f"{phase}: {json.dumps(report.phases[phase], default=float)} "
            f"server {report.server_cpu_s[phase] / duration_s:.2f} cores"
            + (f", proxy {report.proxy_cpu_s[phase] / duration_s:.2f}" if proxy_cpu_s else "")
        )
    return report


def default_loads(
    tenant_victim: str = "related_pins", tenant_aggressor: str = "email", victim_rps: float = 50.0
) -> tuple[Load, Load]:
    """The shipped data: related pins paced at `victim_rps` beside email single-user calls
    (home-feed query pins under the email tenant, whose quota is 4); each load sends its
    tenant header, as the SDK does."""
    from google.protobuf import json_format

    from walkrank_client.pb.walkrank.v1 import recommender_pb2

    def messages(data: str, tenant: str) -> tuple[bytes, ...]:
        out = []
        for item in json.loads((HERE / "data" / data).read_text()):
            item["tenant"] = tenant
            out.append(
                json_format.ParseDict(item, recommender_pb2.RecommendRequest()).SerializeToString()
            )
        return tuple(out)

    victim = Load(
        "victim", messages("related_pins.json", tenant_victim), concurrency=4, rps=victim_rps
    )
    aggressor = Load("aggressor", messages("homefeed.json", tenant_aggressor), concurrency=4)
    return tagged(victim, tenant_victim), tagged(aggressor, tenant_aggressor)


def admission_proxy(
    upstream: str,
    tenants_dir: Path,
    workdir: Path,
    tenant_keys: Mapping[str, frozenset[str]] | None = None,
) -> EnvoyProcess:
    """An Envoy (not yet started) in front of the server at `upstream`, admitting each
    tenant of `tenants_dir` up to its quota (with `tenant_keys`: only with its keys), on
    free loopback ports."""
    from loadgen.harness import free_port

    return EnvoyProcess(
        EnvoySettings(
            listen=f"127.0.0.1:{free_port()}",
            upstreams=(upstream,),
            admin=f"127.0.0.1:{free_port()}",
            tenant_quotas=tenant_quotas(tenants_dir, replicas=1),
            tenant_keys=tenant_keys,
        ),
        workdir,
    )


def main(argv: list[str] | None = None) -> int:
    from loadgen.harness import ServeProcess, write_server_config
    from walkrank.serving.config import ServerConfig
    from walkrank.tenants import load_tenant

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", default="quick")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--factor", type=int, default=16)
    parser.add_argument("--victim-rps", type=float, default=50.0)
    parser.add_argument(
        "--flood-rps", type=float, help="pace the flood's callers to this many calls a second"
    )
    parser.add_argument(
        "--workers", type=int, default=ServerConfig.workers, help="the server's gRPC worker threads"
    )
    parser.add_argument(
        "--envoy", action="store_true", help="through an Envoy with per-tenant admission"
    )
    parser.add_argument(
        "--idle-aggressor",
        action="store_true",
        help="run the aggressor's generator at SCHED_IDLE (standing in for remote callers)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.idle_aggressor and not IDLE_SCHEDULING:
        parser.error("--idle-aggressor needs SCHED_IDLE, which this platform does not have")
    from run import resolve_graph  # load_tests/run.py: run from load_tests/ (the docstring)

    victim, aggressor = default_loads(victim_rps=args.victim_rps)
    quota = load_tenant(HERE.parent / "tenants" / "email.yaml").limits.max_in_flight
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = write_server_config(
            root / "walkrank.yaml",
            resolve_graph(args.graph),
            HERE.parent / "tenants",
            root / "models",
            root / "logs",
            workers=args.workers,
        )
        with ServeProcess(config, root / "server.log") as server, contextlib.ExitStack() as stack:
            target, proxy_cpu_s = server.target, None
            if args.envoy:
                proxy = stack.enter_context(
                    admission_proxy(server.target, HERE.parent / "tenants", root)
                )
                target, proxy_cpu_s = proxy.settings.listen, proxy.cpu_seconds
            report = measure_isolation(
                target,
                server.cpu_seconds,
                victim,
                aggressor,
                quota=quota,
                factor=args.factor,
                flood_rps=args.flood_rps,
                duration_s=args.duration,
                log=lambda line: print(line, file=sys.stderr),
                proxy_cpu_s=proxy_cpu_s,
                idle_aggressor=args.idle_aggressor,
            )
    result = report.to_dict()
    text = json.dumps(result, indent=2, default=float)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
