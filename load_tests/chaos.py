"""Chaos run: the fault-containment promise (docs/fault-containment.md) measured against a real
`walkrank serve`, reported as JSON.

    python load_tests/chaos.py --json benchmarks/results/chaos.json     # about 5 minutes
    python load_tests/chaos.py --json /tmp/chaos.json --quick           # about 1 minute

It starts `walkrank serve` in a subprocess on a loopback port, with a small synthetic graph
built in a temporary directory (`--graph` for another), the shipped tenants plus `chaoslog` (a
copy of home feed that only the log-writer phase calls), a published model for home feed, API
keys on and Prometheus metrics, and then runs, in order:

1. log writer kill: valid calls to `chaoslog` (every request logged) while the candidate-log
   writer child is SIGKILLed; rows submitted (the answers' `candidates_generated`) against
   rows written (the Parquet log, read after the server stopped) plus rows counted lost
   (`walkrank_log_dropped_rows_total`). It runs first, so no other tenant's rows are in the
   writer when it dies.
2. isolation: one tenant (email, quota 4) at 16x its quota beside another (related pins at a
   steady rate): the victim's p99 against its unloaded p99, and the refusals' p99, with the
   load generator's and the server's CPU (loadgen.isolation); then the same through an Envoy
   with per-tenant admission in front of the server (the `_envoy` figures, with Envoy's CPU).
   Each is followed by a variant, reported beside it (`_idle_aggressor`, never a target): the
   aggressor's generator at SCHED_IDLE, standing in for callers whose CPU is not on the
   server's cores.
3. fuzz: hostile calls of every RPC and raw bytes (loadgen.fuzz), 8 at a time.
4. cross-tenant events: each tenant's key reporting events for its own tenant that quote the
   other tenant's request ids.
5. reloads with broken files under load: bad YAML, a bad and a dangling CURRENT (beside a new
   tenant file), a corrupt model version, then everything restored.
6. SIGTERM during load with a long batch in flight: the exit must come within the grace
   period plus a second.

Every loop is bounded in count and in time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from loadgen.fuzz import (
    BATCH,
    CHANNEL_OPTIONS,
    EVENTS,
    HANG,
    HEALTH_CHECK,
    RECOMMEND,
    RELOAD,
    SERVER_FAULTS,
    SHARES,
    Call,
    Credentials,
    Outcome,
    call_strategies,
    draw_calls,
    send,
    violations,
)
from loadgen.harness import ServeProcess, free_port, graph_directory, write_server_config
from loadgen.traffic import draw_requests
from walkrank_client.pb.walkrank.v1 import admin_pb2, events_pb2, recommender_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIPPED = ("homefeed", "related_pins", "email")
LOG_TENANT = "chaoslog"
EXTRA_TENANT = "extra"
KEYS = {name: f"chaos-key-{name}" for name in (*SHIPPED, LOG_TENANT, EXTRA_TENANT)}
ADMIN_TOKEN = "chaos-admin-token"
#: The report's promise figures, with their targets (docs/fault-containment.md).
TARGETS = {
    "internal_errors": 0,
    "hangs": 0,
    "crashes": 0,
    "uncounted_log_loss_rows": 0,
    "cross_tenant_events_accepted": 0,
    "failed_calls_during_reload": 0,
}
MAX_ISOLATION_RATIO = 1.5
MAX_REFUSAL_P99_MS = 5.0
#: The isolation variants (the aggressor's generator at SCHED_IDLE), reported beside the
#: measurements, never as a target.
VARIANTS = ("_idle_aggressor", "_envoy_idle_aggressor")
VARIANT_KEYS = ("isolation_p99_ratio", "refusal_p99_ms")


#: The phases in the order they run (sigterm last: it stops the server).
PHASES = ("log_writer_kill", "isolation", "fuzz", "cross_tenant_events", "reloads", "sigterm")


class Settings:
    """Sizes and time limits of one run (`--quick` is the CI size)."""

    def __init__(self, quick: bool, fuzz: int | None, phases: tuple[str, ...] = PHASES) -> None:
        self.quick = quick
        self.phases = phases
        self.fuzz = fuzz or (1_000 if quick else 10_000)
        self.fuzz_max_s = 180.0 if quick else 900.0
        self.fuzz_threads = 8
        self.isolation_s = 2.0 if quick else 8.0
        self.log_load_s = 4.0 if quick else 10.0
        self.grace_s = 3.0 if quick else 5.0
        self.settle_s = 3.0  # the server notices a dead writer within a second


def machine() -> dict[str, Any]:
    """Cores, CPU model and L3 size: isolation figures mean little without them."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        info["cpu"] = match.group(1).strip() if match else None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if (index / "level").is_file() and (index / "level").read_text().strip() == "3":
            info["l3"] = (index / "size").read_text().strip()
    return info


def cpu_seconds() -> float:
    """This process's CPU (not its children's: the server is one, once it has exited)."""
    times = os.times()
    return times.user + times.system


def children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def log_writers(server_pid: int) -> list[int]:
    """The server's live children but multiprocessing's resource tracker: the candidate-log
    writer (spawned ones first)."""
    live = [
        pid
        for pid in children(server_pid)
        if process_state(pid) not in (None, "Z") and "resource_tracker" not in cmdline(pid)
    ]
    return sorted(live, key=lambda pid: "spawn_main" not in cmdline(pid))


def dropped_rows(metrics_address: str) -> float:
    """Candidate-log rows the server counted as never written, over every reason."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    total = 0.0
    for labels, value in re.findall(
        r"^walkrank_log_dropped_rows_total(\{[^}]*\})? (\S+)$", text, re.MULTILINE
    ):
        if 'log="' not in labels or 'log="candidates"' in labels:
            total += float(value)
    return total


class Background:
    """Valid calls back to back from `workers` threads until the block ends (or `max_s`)."""

    def __init__(
        self, channel: grpc.Channel, calls: list[Call], workers: int, max_s: float
    ) -> None:
        self.channel = channel
        self.calls = calls
        self.workers = workers
        self.max_s = max_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, offset: int) -> None:
        end = time.monotonic() + self.max_s
        number = offset
        while not self._stop.is_set() and time.monotonic() < end:
            outcome = send(self.channel, self.calls[number % len(self.calls)])
            self.outcomes.append(outcome)
            number += self.workers
            if outcome.code == grpc.StatusCode.UNAVAILABLE:  # no server: do not spin
                self._stop.wait(0.05)

    def __enter__(self) -> Background:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """No new calls (those in flight finish)."""
        self._stop.set()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for thread in self._threads:
            thread.join(timeout=self.max_s + 30)

    def failed(self) -> Counter[str]:
        return Counter(o.code_name for o in self.outcomes if o.code != grpc.StatusCode.OK)


class Chaos:
    """The server under test, its files, and the report being filled."""

    def __init__(self, root: Path, graph: Path, settings: Settings, seed: int) -> None:
        from walkrank.graph.store import GraphStore

        self.root = root
        self.settings = settings
        self.seed = seed
        self.graph = GraphStore.load(graph)
        self.tenants = root / "tenants"
        self.models = root / "models"
        self.logs = root / "logs"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.credentials = Credentials({name: KEYS[name] for name in SHIPPED}, ADMIN_TOKEN)
        self.statuses: Counter[str] = Counter()
        self.report: dict[str, Any] = {
            "fuzzed": 0,
            "statuses": {},
            "internal_errors": 0,
            "hangs": 0,
            "crashes": 0,
        }
        self.context: dict[str, Any] = {}
        self._prepare(graph)
        env = {
            **os.environ,
            "WALKRANK_ADMIN_TOKEN": ADMIN_TOKEN,
            "WALKRANK_API_KEYS": ",".join(f"{t}={k}" for t, k in KEYS.items()),
        }
        self.server = ServeProcess(self.config, root / "server.log", env=env)
        self.channel: grpc.Channel | None = None

    def _prepare(self, graph: Path) -> None:
        from loadgen.models import publish_random_model

        shutil.copytree(ROOT / "tenants", self.tenants)
        chaoslog = yaml.safe_load((self.tenants / "homefeed.yaml").read_text())
        chaoslog["name"] = LOG_TENANT
        chaoslog["logging"]["sample_rate"] = 1.0
        (self.tenants / f"{LOG_TENANT}.yaml").write_text(yaml.safe_dump(chaoslog))
        self.model_version = publish_random_model(
            self.models,
            self.tenants / "homefeed.yaml",
            trees=10,
            depth=3,
            rows=2_000,
            seed=self.seed,
        )
        self.config = write_server_config(
            self.root / "walkrank.yaml",
            graph,
            self.tenants,
            self.models,
            self.logs,
            workers=8,
            metrics_address=self.metrics_address,
            auth=True,
            grace_seconds=self.settings.grace_s,
        )

    # -- plumbing ----------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.server.process.poll() is None

    def tally(self, outcomes: list[Outcome]) -> None:
        """Server faults and hangs among any calls this run made."""
        for outcome in outcomes:
            if outcome.code in SERVER_FAULTS:
                self.report["internal_errors"] += 1
            elif outcome.code == HANG:
                self.report["hangs"] += 1

    def valid_calls(
        self, tenant: str, n: int, as_tenant: str | None = None, timeout: float | None = 2.0
    ) -> list[Call]:
        """`n` valid Recommend calls drawn from the served graph with the tenant's traffic
        model (`as_tenant`: sent under another tenant's name and key)."""
        name = as_tenant or tenant
        calls = []
        for message in draw_requests(self.graph, tenant, n, seed=self.seed):
            message["tenant"] = name
            request = json_format.ParseDict(message, recommender_pb2.RecommendRequest())
            calls.append(
                Call(RECOMMEND, request.SerializeToString(), (("x-api-key", KEYS[name]),), timeout)
            )
        return calls

    def call(self, call: Call) -> Outcome:
        outcome = send(self.channel, call)
        self.tally([outcome])
        return outcome

    def healthy(self) -> bool:
        """Overall health SERVING (no credentials needed)."""
        outcome = send(self.channel, Call(HEALTH_CHECK, b"", timeout=5.0))
        return (
            outcome.code == grpc.StatusCode.OK
            and health_pb2.HealthCheckResponse.FromString(outcome.responses[0]).status
            == health_pb2.HealthCheckResponse.SERVING
        )

    @contextmanager
    def started(self) -> Iterator[None]:
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.target, options=list(CHANNEL_OPTIONS))
        try:
            yield
        finally:
            self.channel.close()
            self.server.stop()

    def phase(self, name: str, run: Callable[[], None], stops_server: bool = False) -> None:
        """Run a phase if the server is up; note its time, and a crash if it went down."""
        if not self.alive():
            self.context.setdefault("skipped_phases", []).append(name)
            return
        started = time.monotonic()
        cpu = cpu_seconds()
        print(f"chaos: {name} ...", file=sys.stderr, flush=True)
        try:
            run()
        except Exception as exc:  # reported, and the run goes on with the next phase
            self.context.setdefault("phase_errors", {})[name] = f"{type(exc).__name__}: {exc}"
        self.context.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 2)
        self.context.setdefault("generator_cpu_s", {})[name] = round(cpu_seconds() - cpu, 2)
        if not stops_server and not self.alive():
            self.report["crashes"] += 1
            self.context["crash"] = {
                "phase": name,
                "exit_code": self.server.process.returncode,
                "log_tail": self.server.log_path.read_text()[-2000:],
            }

    # -- phases ------------------------------------------------------------------------------

    def log_writer_kill(self) -> None:
        calls = self.valid_calls("homefeed", 200, as_tenant=LOG_TENANT, timeout=5.0)
        before = dropped_rows(self.metrics_address)
        load_s = self.settings.log_load_s
        with Background(self.channel, calls, workers=2, max_s=load_s + 30) as load:
            time.sleep(load_s / 3)
            writers = log_writers(self.server.pid)
            for pid in writers[:1]:
                os.kill(pid, signal.SIGKILL)
            time.sleep(load_s * 2 / 3)
        time.sleep(self.settings.settle_s)
        counted = dropped_rows(self.metrics_address) - before
        restarted = [pid for pid in log_writers(self.server.pid) if pid not in writers]
        self.tally(load.outcomes)
        submitted = sum(
            recommender_pb2.RecommendResponse.FromString(o.responses[0]).candidates_generated
            for o in load.outcomes
            if o.code == grpc.StatusCode.OK
        )
        self.context["log_writer"] = {
            "writers_found": len(writers),
            "killed": writers[:1],
            "restarted": bool(restarted),
            "old_writer_state": process_state(writers[0]) if writers else None,
            "calls": len(load.outcomes),
            "failed_calls": dict(load.failed()),
            "rows_submitted": int(submitted),
            "rows_counted_lost": int(counted),
        }

    def isolation(self) -> None:
        """Direct to the server, then through Envoy with per-tenant admission."""
        from loadgen.isolation import (
            IDLE_SCHEDULING,
            Load,
            admission_proxy,
            measure_isolation,
            tagged,
        )
        from walkrank.envoy import find_envoy
        from walkrank.errors import ConfigError
        from walkrank.tenants import load_tenant

        victim_calls = self.valid_calls("related_pins", 200)
        aggressor_calls = self.valid_calls("homefeed", 200, as_tenant="email")
        # Both send their tenant header, as the SDK does.
        victim = Load(
            "victim",
            tuple(c.payload for c in victim_calls),
            concurrency=4,
            rps=50.0,
            metadata=victim_calls[0].metadata,
        )
        aggressor = Load(
            "aggressor",
            tuple(c.payload for c in aggressor_calls),
            concurrency=4,
            metadata=aggressor_calls[0].metadata,
        )
        victim, aggressor = tagged(victim, "related_pins"), tagged(aggressor, "email")
        quota = load_tenant(self.tenants / "email.yaml").limits.max_in_flight

        def measure(suffix: str, target: str, proxy_cpu_s: Callable[[], float] | None) -> None:
            """The measurement, then its variant with the aggressor's generator idle (where
            the platform has SCHED_IDLE; else the variant's figures stay null)."""
            for idle in (False, True) if IDLE_SCHEDULING else (False,):
                result = measure_isolation(
                    target,
                    self.server.cpu_seconds,
                    victim,
                    aggressor,
                    quota=quota,
                    factor=16,
                    duration_s=self.settings.isolation_s,
                    proxy_cpu_s=proxy_cpu_s,
                    idle_aggressor=idle,
                ).to_dict()
                self.record_isolation(suffix + ("_idle_aggressor" if idle else ""), result)

        measure("", self.server.target, None)
        try:
            find_envoy()
        except ConfigError as exc:  # the _envoy figures stay null (not measured)
            self.context["isolation_envoy"] = {"not_measured": str(exc)}
            return
        workdir = self.root / "envoy"
        workdir.mkdir(exist_ok=True)
        keys = {tenant: frozenset({key}) for tenant, key in KEYS.items()}
        with admission_proxy(self.server.target, self.tenants, workdir, keys) as proxy:
            measure("_envoy", proxy.settings.listen, proxy.cpu_seconds)

    def record_isolation(self, suffix: str, result: dict[str, Any]) -> None:
        """One isolation measurement's figures (`suffix`: "" direct, "_envoy" through Envoy,
        each + "_idle_aggressor" for its variant)."""
        self.report[f"isolation_p99_ratio{suffix}"] = result["isolation_p99_ratio"]
        self.report[f"refusal_p99_ms{suffix}"] = result["refusal_p99_ms"]
        self.context[f"isolation{suffix}"] = {
            **{k: v for k, v in result.items() if k != "server_cpu_s"},
            "generator_cores": {
                phase: {load: figures["generator_cores"] for load, figures in loads.items()}
                for phase, loads in result["phases"].items()
            },
            "server_cores": {
                phase: cpu / self.settings.isolation_s
                for phase, cpu in result["server_cpu_s"].items()
            },
            "proxy_cores": {
                phase: cpu / self.settings.isolation_s
                for phase, cpu in result["proxy_cpu_s"].items()
            },
            "statuses": {
                phase: {load: figures["statuses"] for load, figures in loads.items()}
                for phase, loads in result["phases"].items()
            },
        }

    def fuzz(self) -> None:
        known = [
            str(p)
            for p in self.graph.pin_external(
                np.argsort(-np.diff(np.asarray(self.graph.pin_offsets)))[:32]
            ).tolist()
        ]
        strategies = call_strategies(known, self.credentials)
        end = time.monotonic() + self.settings.fuzz_max_s
        long_details = 0

        def one(call: Call) -> tuple[Call, Outcome] | None:
            return (call, send(self.channel, call)) if time.monotonic() < end else None

        for share, fraction in SHARES.items():
            calls = draw_calls(
                strategies[share], round(self.settings.fuzz * fraction), seed=self.seed
            )
            with ThreadPoolExecutor(self.settings.fuzz_threads) as pool:
                made = [pair for pair in pool.map(one, calls) if pair is not None]
            outcomes = [outcome for _, outcome in made]
            self.tally(outcomes)
            self.report["fuzzed"] += len(outcomes)
            self.statuses.update(o.code_name for o in outcomes)
            long_details += sum(
                1
                for call, outcome in made
                if outcome.code != HANG
                and any("details of" in v for v in violations(call, outcome))
            )
            if not self.alive() or not self.healthy():
                self.context["fuzz_stopped"] = f"server not healthy after the {share} calls"
                break
        self.report["statuses"] = dict(sorted(self.statuses.items()))
        self.context["fuzz_long_error_details"] = long_details

    def cross_tenant_events(self) -> None:
        """Tenant A's key, events for tenant A, quoting request ids tenant B was answered."""
        answered: dict[str, list[tuple[str, str]]] = {}
        for tenant in ("homefeed", "email"):
            pairs = []
            for index, call in enumerate(
                self.valid_calls("homefeed", 5, as_tenant=tenant, timeout=5.0)
            ):
                request = recommender_pb2.RecommendRequest.FromString(call.payload)
                request.request_id = f"chaos-{tenant}-{index}"
                outcome = self.call(
                    Call(RECOMMEND, request.SerializeToString(), call.metadata, 5.0)
                )
                if outcome.code == grpc.StatusCode.OK:
                    answer = recommender_pb2.RecommendResponse.FromString(outcome.responses[0])
                    pairs += [(request.request_id, c.pin_id) for c in answer.candidates[:3]]
            answered[tenant] = pairs
        accepted, own = 0, {}
        for reporter, other in (("homefeed", "email"), ("email", "homefeed")):
            for quoted, counter in ((other, "foreign"), (reporter, "own")):
                events = [
                    events_pb2.Event(request_id=r, pin_id=p, event="click")
                    for r, p in answered[quoted]
                ]
                outcome = self.call(
                    Call(
                        EVENTS,
                        events_pb2.ReportEventsRequest(
                            tenant=reporter, events=events
                        ).SerializeToString(),
                        (("x-api-key", KEYS[reporter]),),
                        5.0,
                    )
                )
                count = (
                    events_pb2.ReportEventsResponse.FromString(outcome.responses[0]).accepted
                    if outcome.code == grpc.StatusCode.OK
                    else 0
                )
                if counter == "foreign":
                    accepted += count
                else:
                    own[reporter] = {"sent": len(events), "accepted": count}
            # The other tenant's name with this tenant's key: refused by authentication.
            outcome = self.call(
                Call(
                    EVENTS,
                    events_pb2.ReportEventsRequest(
                        tenant=other,
                        events=[
                            events_pb2.Event(request_id=r, pin_id=p, event="click")
                            for r, p in answered[other]
                        ],
                    ).SerializeToString(),
                    (("x-api-key", KEYS[reporter]),),
                    5.0,
                )
            )
            if outcome.code == grpc.StatusCode.OK:
                accepted += events_pb2.ReportEventsResponse.FromString(
                    outcome.responses[0]
                ).accepted
        self.report["cross_tenant_events_accepted"] = accepted
        self.context["own_events"] = own

    def reloads(self) -> None:
        registry = self.models / "homefeed"
        related = self.tenants / "related_pins.yaml"
        original = related.read_text()
        extra = yaml.safe_load(original)
        extra["name"] = EXTRA_TENANT
        current = registry / "CURRENT"
        corrupt = registry / str(self.model_version + 1)

        def bad_yaml() -> None:
            related.write_text("name: related_pins\nwalk: [unclosed\n")

        def bad_current_beside_new_tenant() -> None:
            (self.tenants / f"{EXTRA_TENANT}.yaml").write_text(yaml.safe_dump(extra))
            current.write_text("abc\n")

        def dangling_current() -> None:
            current.write_text("999\n")

        def corrupt_model() -> None:
            shutil.copytree(registry / str(self.model_version), corrupt)
            for model in corrupt.glob("*.onnx"):
                model.write_bytes(os.urandom(model.stat().st_size))
            current.write_text(f"{self.model_version + 1}\n")

        def restore() -> None:
            related.write_text(original)
            current.write_text(f"{self.model_version}\n")
            shutil.rmtree(corrupt, ignore_errors=True)

        steps = [
            ("bad YAML in related_pins.yaml", bad_yaml),
            ("CURRENT 'abc' beside a new tenant file", bad_current_beside_new_tenant),
            ("CURRENT naming a missing version", dangling_current),
            ("corrupt model version", corrupt_model),
            ("restored", restore),
        ]
        calls = self.valid_calls("homefeed", 100) + self.valid_calls("related_pins", 100)
        results = []
        with Background(self.channel, calls, workers=2, max_s=120) as load:
            time.sleep(0.5)
            for name, change in steps:
                change()
                outcome = self.call(
                    Call(
                        RELOAD,
                        admin_pb2.ReloadRequest().SerializeToString(),
                        (("x-admin-token", ADMIN_TOKEN),),
                        60.0,
                    )
                )
                step: dict[str, Any] = {"step": name, "code": outcome.code_name}
                if outcome.code == grpc.StatusCode.OK:
                    answer = admin_pb2.ReloadResponse.FromString(outcome.responses[0])
                    step["changes"] = [f"{c.tenant}:{c.kind}" for c in answer.changes]
                    step["errors"] = [
                        f"{Path(e.path).name}: {e.message[:160]}" for e in answer.errors
                    ]
                else:
                    step["details"] = outcome.details[:200]
                results.append(step)
                time.sleep(0.5)
        self.tally(load.outcomes)
        failed_reloads = sum(1 for s in results if s["code"] != "OK")
        failed = load.failed()
        self.report["failed_calls_during_reload"] = sum(failed.values()) + failed_reloads
        added = results[1].get("changes", [])
        self.context["reloads"] = {
            "steps": results,
            "serving_calls": len(load.outcomes),
            "failed_serving_calls": dict(failed),
            "failed_reload_calls": failed_reloads,
            "new_tenant_loaded_beside_bad_current": f"{EXTRA_TENANT}:added" in added,
        }

    def sigterm(self) -> None:
        calls = self.valid_calls("homefeed", 100)
        batch = json_format.ParseDict(
            draw_requests(self.graph, "email", 1, seed=self.seed, batch_users=200)[0],
            recommender_pb2.RecommendBatchRequest(),
        )
        long_call = Call(
            BATCH,
            batch.SerializeToString(),
            (("x-api-key", KEYS["email"]),),
            None,
            messages=len(batch.users),
        )
        process = self.server.process
        limit = self.settings.grace_s + 1.0
        with Background(self.channel, calls, workers=2, max_s=30) as load:
            in_flight = threading.Thread(target=send, args=(self.channel, long_call), daemon=True)
            in_flight.start()
            time.sleep(1.0)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            load.stop()
            while process.poll() is None and time.monotonic() - sent < limit + 10:
                time.sleep(0.02)
            exit_s = time.monotonic() - sent
            if process.poll() is None:
                process.kill()
                process.wait()
        if exit_s > limit:
            self.report["hangs"] += 1
        if process.returncode != 0 and exit_s <= limit:
            self.report["crashes"] += 1
        self.context["sigterm"] = {
            "exit_s": round(exit_s, 2),
            "grace_s": self.settings.grace_s,
            "within_grace_plus_1s": exit_s <= limit,
            "exit_code": process.returncode,
            "load_statuses": dict(Counter(o.code_name for o in load.outcomes)),
        }

    def log_accounting(self) -> None:
        """After the server stopped: rows submitted = written + counted lost, or not."""
        from walkrank.logs.candidates import read_candidates

        figures = self.context.get("log_writer")
        if figures is None:
            return
        written = read_candidates(self.logs, LOG_TENANT).num_rows
        figures["rows_written"] = int(written)
        uncounted = figures["rows_submitted"] - written - figures["rows_counted_lost"]
        figures["rows_unaccounted_raw"] = int(uncounted)
        self.report["uncounted_log_loss_rows"] = max(0, int(uncounted))

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.started():
            for name in self.settings.phases:
                if name == "sigterm":
                    self.context["server_cpu_s"] = round(self.server.cpu_seconds(), 2)
                self.phase(name, getattr(self, name), stops_server=name == "sigterm")
        try:
            self.log_accounting()
        except Exception as exc:
            self.context.setdefault("phase_errors", {})["log_accounting"] = (
                f"{type(exc).__name__}: {exc}"
            )
        report = {
            key: self.report.get(key)
            for key in (
                "fuzzed",
                "statuses",
                "internal_errors",
                "hangs",
                "crashes",
                "uncounted_log_loss_rows",
                "cross_tenant_events_accepted",
                "isolation_p99_ratio",
                "refusal_p99_ms",
                "isolation_p99_ratio_envoy",
                "refusal_p99_ms_envoy",
                "failed_calls_during_reload",
                *(f"{key}{variant}" for variant in VARIANTS for key in VARIANT_KEYS),
            )
        }
        report["targets_met"] = targets_met(report)
        report["machine"] = machine()
        report["settings"] = {
            "quick": self.settings.quick,
            "fuzz": self.settings.fuzz,
            "phases": list(self.settings.phases),
            "isolation_s": self.settings.isolation_s,
            "seed": self.seed,
            "graph": str(self.graph.path),
        }
        report["wall_s"] = round(time.monotonic() - started, 1)
        report["context"] = self.context
        return report


def targets_met(report: dict[str, Any]) -> dict[str, bool]:
    """Each promise figure against its target; an unmeasured figure (None) misses it."""
    met = {key: report.get(key) == target for key, target in TARGETS.items()}
    for suffix in ("", "_envoy"):
        ratio, refusal = (
            report.get(f"isolation_p99_ratio{suffix}"),
            report.get(f"refusal_p99_ms{suffix}"),
        )
        met[f"isolation_p99_ratio{suffix}"] = ratio is not None and ratio <= MAX_ISOLATION_RATIO
        met[f"refusal_p99_ms{suffix}"] = refusal is not None and refusal <= MAX_REFUSAL_P99_MS
    return met


#: The table's rows: report key, what it measures, target.
TABLE_ROWS = (
    ("fuzzed", "hostile calls sent (every RPC, raw bytes)", ">= 10,000"),
    ("internal_errors", "calls answered INTERNAL or UNKNOWN", "0"),
    ("hangs", "calls past their bound; SIGTERM exits past grace + 1 s", "0"),
    ("crashes", "server exits not asked for", "0"),
    ("uncounted_log_loss_rows", "log rows neither written nor counted lost", "0"),
    ("cross_tenant_events_accepted", "events accepted quoting another tenant's requests", "0"),
    ("failed_calls_during_reload", "failed calls (serving and Reload) while files broke", "0"),
    (
        "isolation_p99_ratio",
        "victim p99 beside a tenant at 16x quota / alone",
        f"<= {MAX_ISOLATION_RATIO}",
    ),
    ("refusal_p99_ms", "p99 of the over-quota refusals (ms)", f"<= {MAX_REFUSAL_P99_MS:g}"),
    (
        "isolation_p99_ratio_envoy",
        "the same, through Envoy with per-tenant admission",
        f"<= {MAX_ISOLATION_RATIO}",
    ),
    (
        "refusal_p99_ms_envoy",
        "the refusals' p99 through Envoy (ms)",
        f"<= {MAX_REFUSAL_P99_MS:g}",
    ),
    (
        "isolation_p99_ratio_idle_aggressor",
        "variant: direct, the aggressor's generator at SCHED_IDLE",
        "(variant)",
    ),
    ("refusal_p99_ms_idle_aggressor", "variant: its refusals' p99 (ms)", "(variant)"),
    (
        "isolation_p99_ratio_envoy_idle_aggressor",
        "variant: through Envoy, the aggressor's generator at SCHED_IDLE",
        "(variant)",
    ),
    ("refusal_p99_ms_envoy_idle_aggressor", "variant: its refusals' p99 (ms)", "(variant)"),
)
#: The isolation measurements under the table: context key suffix, how it is named.
MEASUREMENTS = (
    ("", "Direct"),
    ("_idle_aggressor", "Direct, variant with the aggressor's generator at SCHED_IDLE"),
    ("_envoy", "Through Envoy"),
    (
        "_envoy_idle_aggressor",
        "Through Envoy, variant with the aggressor's generator at SCHED_IDLE",
    ),
)
#: The isolation phases (loadgen.isolation), as the phase tables name them.
PHASE_NAMES = {
    "victim_alone": "victim alone",
    "aggressor_at_quota": "aggressor at its quota",
    "aggressor_flood": "aggressor at 16x",
    "beside_quota": "victim + aggressor at its quota",
    "together": "victim + aggressor at 16x + probe",
}


def markdown_table(report: dict[str, Any]) -> str:
    """The figures of a report as a Markdown table, with the machine and the CPU beside them."""

    def shown(value: Any) -> str:
        if value is None:
            return "not measured"
        return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"

    met = report.get("targets_met", {})
    lines = ["| figure | measures | target | measured | met |", "| --- | --- | --- | ---: | --- |"]
    for key, meaning, target in TABLE_ROWS:
        ok = met.get(key, report.get(key, 0) >= 10_000 if key == "fuzzed" else None)
        verdict = "-" if target == "(variant)" else "yes" if ok else "NO"
        lines.append(f"| `{key}` | {meaning} | {target} | {shown(report.get(key))} | {verdict} |")
    machine_info = report.get("machine", {})
    statuses = report.get("statuses") or {}
    lines += [
        "",
        "Statuses of the fuzzed calls: "
        + (", ".join(f"{code} {count:,}" for code, count in statuses.items()) or "none")
        + ".",
        f"Machine: {machine_info.get('cores')} cores ({machine_info.get('cpu')}, L3 "
        f"{machine_info.get('l3')}); run: {report.get('settings', {})}, "
        f"{report.get('wall_s')} s.",
    ]
    for suffix, how in MEASUREMENTS:
        isolation = report.get("context", {}).get(f"isolation{suffix}", {})
        lines += isolation_lines(isolation, how) + phase_table(isolation)
    return "\n".join(lines) + "\n"


def isolation_lines(isolation: dict[str, Any], how: str) -> list[str]:
    """One isolation measurement's latencies and CPU, for the lines under the table."""
    if not isolation:
        return []
    nan = float("nan")
    generator = isolation.get("generator_cores", {}).get("together", {})
    server = isolation.get("server_cores", {}).get("together", nan)
    proxy = isolation.get("proxy_cores", {}).get("together")
    line = (
        f"{how}: victim p99 {isolation.get('victim_alone_p99_ms', nan):.1f} ms alone, "
        f"{isolation.get('victim_beside_quota_p99_ms', nan):.1f} ms beside the aggressor at "
        f"its quota, {isolation.get('victim_loaded_p99_ms', nan):.1f} ms beside it at 16x; "
        f"refusals p99 {isolation.get('refusal_p99_ms', nan):.2f} ms (the flood's own "
        f"{isolation.get('flood_refusal_p99_ms', nan):.1f} ms). With both loads the generator "
        "used "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in generator.items())
        + f" cores, the server {server:.2f}"
        + (f", Envoy {proxy:.2f}" if proxy is not None else "")
        + " (of the machine's cores); CPU per refusal: server "
        f"{isolation.get('server_cpu_ms_per_refusal', nan):.3f} ms"
    )
    if proxy is not None:
        line += f", Envoy {isolation.get('proxy_cpu_ms_per_refusal', nan):.3f} ms"
    line += (
        f"; per served victim call: server "
        f"{isolation.get('server_cpu_ms_per_victim_call', nan):.3f} ms."
    )
    if "aggressor_together_rps" in isolation:
        line += (
            f" The aggressor made {isolation['aggressor_at_quota_rps']:,.0f} calls/s at its "
            f"quota, {isolation['aggressor_flood_rps']:,.0f} at 16x alone and "
            f"{isolation['aggressor_together_rps']:,.0f} at 16x beside the victim."
        )
    return [line]


def phase_table(isolation: dict[str, Any]) -> list[str]:
    """One isolation measurement's phases: the victim's latency, the aggressor's calls, and
    the CPU of each process (cores, the machine's all together: whether they were the limit).
    """
    phases = isolation.get("phases")
    if not phases:
        return []
    nan = float("nan")
    proxy = isolation.get("proxy_cores") or {}
    idle = isolation.get("server_idle_cores", 0.0) + isolation.get("proxy_idle_cores", 0.0)
    lines = [
        "",
        "| phase | victim p50 / p99 (ms) | aggressor calls/s (refused) | generator cores | "
        "server cores | Envoy cores | all processes' cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase, loads in phases.items():
        victim, aggressor = loads.get("victim"), loads.get("aggressor")
        generator = sum(load["generator_cores"] for load in loads.values())
        server, envoy = isolation["server_cores"][phase], proxy.get(phase)
        refused = (
            aggressor["statuses"].get("RESOURCE_EXHAUSTED", 0) / max(aggressor["calls"], 1)
            if aggressor
            else nan
        )
        lines.append(
            f"| {PHASE_NAMES.get(phase, phase)} | "
            + (f"{victim['ok_p50_ms']:.1f} / {victim['ok_p99_ms']:.1f}" if victim else "-")
            + " | "
            + (f"{aggressor['rps']:,.0f} ({refused:.0%})" if aggressor else "-")
            + f" | {generator:.2f} | {server:.2f} | "
            + (f"{envoy:.2f}" if envoy is not None else "-")
            + f" | {generator + server + (envoy or 0.0) + idle:.2f} |"
        )
    return [*lines, ""]


FIGURES_BEGIN = "<!-- chaos figures: begin (load_tests/chaos.py --table JSON --into DOC) -->"
FIGURES_END = "<!-- chaos figures: end -->"


def write_into(doc: Path, table: str) -> None:
    """Replace the text between the figure markers of `doc` with `table`."""
    text = doc.read_text()
    begin, end = text.find(FIGURES_BEGIN), text.find(FIGURES_END)
    if begin < 0 or end < begin:
        raise SystemExit(
            f"chaos.py: {doc} has no figure markers ({FIGURES_BEGIN} ... {FIGURES_END})"
        )
    doc.write_text(text[: begin + len(FIGURES_BEGIN)] + "\n" + table + text[end:])


def build_graph(value: str | None, scratch: Path) -> Path:
    """A synthetic preset built into the scratch directory (default tiny), or a graph dir."""
    from walkrank.graph.synthetic import PRESETS, build_synthetic

    if value is None or value in PRESETS:
        out = scratch / "graph"
        build_synthetic(out, value or "tiny")
        return out
    return graph_directory(value, "chaos.py", f"a preset ({', '.join(PRESETS)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="load_tests/chaos.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--json", type=Path, help="run, and write the report here")
    what.add_argument(
        "--table",
        type=Path,
        metavar="JSON",
        help="print a report's figures as a Markdown table (no run)",
    )
    parser.add_argument(
        "--into",
        type=Path,
        metavar="DOC",
        help="with --table: put the table between DOC's figure markers",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI size: 1,000 fuzzed calls, 2 s isolation phases"
    )
    parser.add_argument("--fuzz", type=int, help="fuzzed calls (default 10,000; quick 1,000)")
    parser.add_argument(
        "--graph",
        help="synthetic preset built in a temporary directory "
        "(default tiny) or an existing graph directory",
    )
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)}); "
        "a figure of a phase left out is reported as null",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the server's files (log, logs, "
        "tenants, models) in this directory instead of a temporary one",
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        table = markdown_table(json.loads(args.table.read_text()))
        if args.into is not None:
            write_into(args.into, table)
        print(table, end="")
        return 0
    phases = tuple(p for p in PHASES if p in args.phases.split(","))
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    settings = Settings(args.quick, args.fuzz, phases)
    with tempfile.TemporaryDirectory(prefix="walkrank-chaos-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        graph = build_graph(args.graph, root)
        report = Chaos(root, graph, settings, args.seed).run()
    report["settings"]["graph"] = args.graph or "tiny"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "context"}, indent=2, default=float))
    return 0 if all(report["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
