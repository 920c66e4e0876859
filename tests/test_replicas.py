"""`walkrank serve --replicas 2`: real Envoy in front of two real replicas, under load.

Rolling changes lose no call, a replica that fails to load keeps its old version, a killed
replica costs at most its calls in flight and leaves the rotation within the health-check
interval, and the replicas hold the graph in the page cache once.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_cli_serve import serve_fails, serve_process, stdout_of, write_config
from test_deploy import envoy_or_skip
from test_server import REPO, pins, publish_model

from walkrank.envoy import active_admission, host_health, tenant_cluster
from walkrank.graph.repository import GraphRepository
from walkrank.graph.store import GraphStore
from walkrank.replicas import (
    BANNER,
    free_port_run,
    memory_kib,
    parse_banner,
    plan_replicas,
    replica_pids,
)
from walkrank.serving.config import ServerConfig
from walkrank.serving.scheduler import OS_THREAD_PREFIX, available_cores
from walkrank_client import WalkRankClient, WalkRankClientError

pytestmark = pytest.mark.slow

HEALTH_INTERVAL_S = 1.0  # walkrank.envoy.EnvoySettings default
TENANT = "related_pins"


@dataclass
class Launcher:
    process: subprocess.Popen[str]
    front: str
    replicas: list[str]
    admin: str
    models: Path
    tenants: Path
    graph: GraphStore
    graphs: GraphRepository

    def replica_pids(self) -> dict[str, int]:
        return replica_pids(self.process.pid)

    def replica_pid(self, address: str) -> int:
        return self.replica_pids()[address]

    def wait_all_healthy(self, timeout_s: float = 120.0) -> None:
        wait_until(
            lambda: all(flags == [] for flags in host_health(self.admin).values()),
            "every replica healthy in Envoy",
            timeout_s,
        )


def wait_until(condition, what: str, timeout_s: float) -> float:
    """Seconds it took `condition()` to hold; fails the test after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if condition():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory, small_graph: GraphStore
) -> Iterator[Launcher]:
    envoy_or_skip()
    root = tmp_path_factory.mktemp("replicas")
    tenants = root / "tenants"
    tenants.mkdir()
    (tenants / f"{TENANT}.yaml").write_text((REPO / "tenants" / f"{TENANT}.yaml").read_text())
    models = root / "models"
    publish_model(models, tenants, TENANT, seed=1)
    graphs = GraphRepository(root / "graphs")
    graphs.publish(functools.partial(shutil.copytree, small_graph.path))
    front, admin = f"127.0.0.1:{free_port_run(1)}", f"127.0.0.1:{free_port_run(1)}"
    config = write_config(root, graphs.root, front, workers=8, grace_seconds=5)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "walkrank.cli",
            "serve",
            "--config",
            str(config),
            "--replicas",
            "2",
            "--replica-base-port",
            "0",
            "--envoy-admin-address",
            admin,
            "--envoy-concurrency",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 180
        while not banner.startswith(BANNER) and time.monotonic() < deadline:
            banner = process.stdout.readline()
            assert banner or process.poll() is None, "launcher exited before serving"
        plan = parse_banner(banner)
        assert (plan.front, plan.envoy_admin) == (front, admin), banner
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
        yield Launcher(
            process, front, list(plan.replicas), admin, models, tenants, small_graph, graphs
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


@dataclass
class Load:
    """Threads calling Recommend through Envoy back to back; every call that still failed
    after the client's `retries` (on UNAVAILABLE, default none) is counted, with when."""

    target: str
    query: list[list[str]]
    threads: int = 4
    retries: int = 0
    ok: int = 0
    failures: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, worker: int) -> None:
        with WalkRankClient(
            self.target, timeout=10.0, retries=self.retries, backoff=0.01
        ) as client:
            n = worker
            while not self._stop.is_set():
                try:
                    client.recommend(TENANT, self.query[n % len(self.query)])
                    with self._lock:
                        self.ok += 1
                except WalkRankClientError as exc:
                    with self._lock:
                        self.failures.append((time.monotonic(), exc.code.name, exc.details))
                n += self.threads

    def __enter__(self) -> Load:
        self._workers = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        wait_until(lambda: self.ok >= 20, "calls flowing", 30)
        return self

    def calls_after(self, ok: int, count: int = 20) -> None:
        wait_until(lambda: self.ok >= ok + count, f"{count} more calls", 30)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)


def queries(graph: GraphStore) -> list[list[str]]:
    return [pins(graph, i) for i in range(0, 400, 7)]


def served_by(address: str) -> int:
    with WalkRankClient(address, timeout=10.0) as client:
        return client.get_tenant(TENANT).counters.requests


def model_version(address: str) -> str:
    with WalkRankClient(address, timeout=10.0) as client:
        return client.get_tenant(TENANT).model_version


def test_envoy_balances_each_call_over_both_replicas(launched: Launcher) -> None:
    before = [served_by(a) for a in launched.replicas]
    # One client, one connection to Envoy: the spread is per call, not per connection.
    with WalkRankClient(launched.front, timeout=10.0, retries=0) as client:
        for query in queries(launched.graph)[:40]:
            client.recommend(TENANT, query)
    served = [served_by(a) - b for a, b in zip(launched.replicas, before, strict=True)]
    assert sum(served) == 40
    assert min(served) >= 10, served
    assert sorted(host_health(launched.admin)) == sorted(launched.replicas)


def test_replicas_hold_the_graph_in_the_page_cache_once(launched: Launcher) -> None:
    graph = [memory_kib(launched.replica_pid(a), launched.graphs.root) for a in launched.replicas]
    assert all(g["Rss"] > 0 for g in graph)
    # Each replica maps the whole graph (Rss), but the pages are shared: their proportional
    # shares add up to one copy.
    assert sum(g["Pss"] for g in graph) <= max(g["Rss"] for g in graph) * 1.05 + 8


def compute_threads(pid: int) -> int:
    """The process's compute threads, by the OS name walkrank.serving.scheduler gives them."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum((task / "comm").read_text().startswith(OS_THREAD_PREFIX) for task in tasks)


def test_the_replicas_share_the_cores_between_their_compute_threads(launched: Launcher) -> None:
    """No compute_slots in the config: each of the 2 replicas runs half the cores' compute
    threads (at least one), so the host runs one pipeline per core, as one process would."""
    expected = max(1, available_cores() // 2)
    for address, pid in launched.replica_pids().items():
        assert compute_threads(pid) == expected, address


def test_processes_share_the_cores_between_their_compute_threads(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    """`--processes 2` splits the cores as `--replicas 2` does; `--compute-slots` overrides."""
    for options, expected in (((), max(1, available_cores() // 2)), (("--compute-slots", "3"), 3)):
        root = tmp_path / ("override" if options else "default")
        root.mkdir()
        config = write_config(root, small_graph.path, f"127.0.0.1:{free_port_run(1)}")
        with serve_process(config, "--processes", "2", *options) as (process, _):
            assert "serving" in stdout_of(process).readline()  # the second child's banner
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            counts = [compute_threads(int(child)) for child in children.split()]
            assert [count for count in counts if count] == [expected, expected]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0


def test_publish_then_reload_each_replica_under_load_fails_no_call(launched: Launcher) -> None:
    old = model_version(launched.replicas[0])
    new = f"v{publish_model(launched.models, launched.tenants, TENANT, seed=2)}"
    assert new != old
    with Load(launched.front, queries(launched.graph)) as load:
        for address in launched.replicas:  # one at a time, as an operator's fan-out does
            with WalkRankClient(address, timeout=30.0) as client:
                assert not client.reload([TENANT]).errors
            load.calls_after(load.ok)
    assert load.failures == []
    assert [model_version(a) for a in launched.replicas] == [new, new]


def test_a_replica_that_fails_to_load_keeps_its_version_and_its_traffic(launched: Launcher) -> None:
    serving = model_version(launched.replicas[0])
    current = (launched.models / TENANT / "CURRENT").read_text()
    (launched.models / TENANT / "CURRENT").write_text("999\n")  # a version that is not there
    try:
        with (
            Load(launched.front, queries(launched.graph)) as load,
            WalkRankClient(launched.replicas, timeout=30.0) as fan_out,
        ):
            results = fan_out.reload_each([TENANT])
            load.calls_after(load.ok)
        assert all(r.errors for r in results.values()), results
        assert load.failures == []
        assert [model_version(a) for a in launched.replicas] == [serving, serving]
        assert all(flags == [] for flags in host_health(launched.admin).values())
    finally:
        (launched.models / TENANT / "CURRENT").write_text(current)


def test_a_new_graph_version_reaches_every_replica_under_load(launched: Launcher) -> None:
    """Publish into the served graph repository, reload each replica: each swaps the new
    version in between calls, and no call fails."""
    version = launched.graphs.publish(
        functools.partial(shutil.copytree, launched.graph.path)
    ).version
    with (
        Load(launched.front, queries(launched.graph)) as load,
        WalkRankClient(launched.replicas, timeout=60.0) as fan_out,
    ):
        results = fan_out.reload_each()
        load.calls_after(load.ok)
    assert all(not r.errors for r in results.values()), results
    assert load.failures == []
    for address in launched.replicas:
        with WalkRankClient(address, timeout=10.0) as client:
            assert client.graph_info().version == str(version)


def test_sighup_restarts_replicas_one_at_a_time_under_load(launched: Launcher) -> None:
    """A rolling restart (a changed config, a new release) loses no call: each replica
    drains before it stops, and the next waits until the new one serves."""
    pids = set(launched.replica_pids().values())
    with Load(launched.front, queries(launched.graph)) as load:
        launched.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len(set(launched.replica_pids().values()) - pids) == 2,
            "both replicas restarted",
            180,
        )
        launched.wait_all_healthy()
        load.calls_after(load.ok)
    assert load.failures == []


def test_a_killed_replica_costs_its_calls_in_flight_and_is_ejected(launched: Launcher) -> None:
    """SIGKILL under load. Callers without retries lose the call they had on the replica, and
    at most one more sent as it went down (the kernel still completed the connection) and
    none after Envoy ejected it; callers whose client retries once lose nothing."""
    victim = launched.replicas[1]
    query = queries(launched.graph)
    with (
        Load(launched.front, query, threads=2) as bare,
        Load(launched.front, query, threads=2, retries=1) as retrying,
    ):
        killed_at = time.monotonic()
        os.kill(launched.replica_pid(victim), signal.SIGKILL)
        ejected_s = wait_until(
            lambda: host_health(launched.admin)[victim] != [], "the killed replica ejected", 10
        )
        bare.calls_after(bare.ok, 40)  # the rest keep flowing
    assert len(bare.failures) <= 2 * bare.threads, "\n".join(map(str, bare.failures))
    assert {code for _, code, _ in bare.failures} <= {"UNAVAILABLE"}
    assert [t for t, _, _ in bare.failures if t > killed_at + ejected_s + 0.5] == []
    assert retrying.failures == []
    assert ejected_s <= 2 * HEALTH_INTERVAL_S + 0.5, ejected_s
    launched.wait_all_healthy()  # the launcher restarts it and Envoy takes it back


def test_launcher_refuses_what_it_cannot_do(tmp_path: Path, small_graph: GraphStore) -> None:
    config = write_config(tmp_path, small_graph.path)
    assert "fixed port" in serve_fails(config, "--replicas", "2")


def test_metrics_port_zero_gives_each_replica_a_free_port(tmp_path: Path) -> None:
    front = free_port_run(4)
    config = ServerConfig(
        graph=tmp_path / "graph",
        tenants_dir=tmp_path / "tenants",
        models_dir=tmp_path / "models",
        logs_dir=tmp_path / "logs",
        address=f"127.0.0.1:{front}",
        metrics_address="127.0.0.1:0",
    )
    plan = plan_replicas(config, 2, None, f"127.0.0.1:{front + 3}")
    assert plan.metrics == ("127.0.0.1:0", "127.0.0.1:0")
    fixed = plan_replicas(
        config.replace(metrics_address=f"127.0.0.1:{free_port_run(2)}"),
        2,
        None,
        f"127.0.0.1:{front + 3}",
    )
    first = int(fixed.metrics[0].rsplit(":", 1)[1])
    assert fixed.metrics[1] == f"127.0.0.1:{first + 1}"


def envoy_of(launcher_pid: int) -> int:
    """The launcher's Envoy child process (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    [pid] = [p for p in children if "envoy" in Path(f"/proc/{p}/cmdline").read_text()]
    return int(pid)


def test_tenant_quotas_follow_the_tenant_files_while_envoy_runs(launched: Launcher) -> None:
    """Edit a tenant's max_in_flight and add a tenant under load: the launcher gives Envoy the
    new per-tenant clusters (quota x 2 replicas) without restarting it, and no call fails."""
    envoy_pid = envoy_of(launched.process.pid)
    source = launched.tenants / f"{TENANT}.yaml"
    original = source.read_text()
    added = launched.tenants / "email.yaml"

    def replace_file(path: Path, text: str) -> None:
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        partial.rename(path)

    def quotas() -> dict[str, int]:
        return active_admission(launched.admin)[0]

    assert quotas() == {tenant_cluster(TENANT): 48 * 2}
    try:
        with Load(launched.front, queries(launched.graph)) as load:
            replace_file(source, original.replace("max_in_flight: 48", "max_in_flight: 3"))
            replace_file(added, (REPO / "tenants" / "email.yaml").read_text())
            wait_until(
                lambda: quotas() == {tenant_cluster(TENANT): 6, tenant_cluster("email"): 8},
                "Envoy admits the new quotas",
                60,
            )
            load.calls_after(load.ok)
            # The tenant's calls now go through a cluster holding it to 3 per replica.
            added.unlink()
            wait_until(
                lambda: quotas() == {tenant_cluster(TENANT): 6}, "email's cluster removed", 60
            )
            load.calls_after(load.ok)
        assert load.failures == []
    finally:
        replace_file(source, original)
        added.unlink(missing_ok=True)
    wait_until(lambda: quotas() == {tenant_cluster(TENANT): 96}, "the quota restored", 60)
    assert envoy_of(launched.process.pid) == envoy_pid  # the same Envoy all along
