"""`walkrank serve --replicas N`: N server processes on one host behind one Envoy.

Each replica is a plain `walkrank serve` on its own loopback port (the front port + 1, + 2,
... unless `--replica-base-port` says otherwise), mapping the same graph files, so the page
cache holds the graph once whatever N is. Envoy listens on the configured address and
balances per call (walkrank.envoy). The launcher:

- starts the replicas, waits until each is SERVING, then starts Envoy and waits until Envoy
  has health-checked every replica;
- restarts a replica that exits on its own (Envoy routes around it meanwhile), backing off
  when one keeps dying;
- on SIGHUP restarts the replicas one at a time (a new graph directory, a changed config):
  each drains (its in-flight calls finish, Envoy sees NOT_SERVING and stops sending), the new
  one must be SERVING before the next goes; tenant and model changes need no restart, only
  `walkrank-client --address REPLICA,REPLICA,... reload --each` (docs/deployment.md);
- follows the tenant directory: when a tenant file is added, edited or removed, Envoy's
  per-tenant admission (quota = `limits.max_in_flight` x N) changes while it runs, with no
  call failed (walkrank.envoy.update_admission);
- on SIGTERM/SIGINT stops the replicas gracefully (in-flight calls finish through Envoy),
  then Envoy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from walkrank.cli import announce
from walkrank.envoy import (
    EnvoySettings,
    envoy_command,
    routing,
    split_address,
    tenant_quotas,
    update_admission,
    write_config,
)
from walkrank.errors import ConfigError
from walkrank.serving.config import ServerConfig, check_port_free

log = logging.getLogger("walkrank.replicas")

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (1.0, 30.0)  # first wait, longest wait before restarting a crashed replica
#: What the launcher prints once Envoy routes to every replica (`parse_banner` reads it).
BANNER = "walkrank: envoy on"
STABLE_S = 60.0  # a replica up this long has its backoff reset
# A stopping replica reports NOT_SERVING this long before it stops taking calls: Envoy's
# health check (every second) sees it and sends no more (`walkrank serve --drain-seconds`).
REPLICA_DRAIN_S = 2.5
#: How long Envoy may take over each step of an admission change before the change is
#: retried later (the supervision loop, and so a stop, waits meanwhile).
ADMISSION_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaPlan:
    """Where everything listens: Envoy in front, replicas and their metrics behind."""

    front: str
    replicas: tuple[str, ...]
    metrics: tuple[str | None, ...]
    envoy_admin: str


def plan_replicas(
    config: ServerConfig, count: int, base_port: int | None, envoy_admin: str
) -> ReplicaPlan:
    """Replica `i` on 127.0.0.1:(base + i) (base: the front port + 1; 0: any free run of
    ports, chosen once and kept across restarts), its metrics on the configured metrics
    port + i; ConfigError when a port is unusable."""
    if count < 1:
        raise ConfigError(f"--replicas: must be >= 1, got {count}")
    if config.tls is not None:
        raise ConfigError(
            "--replicas: tls is set in the config; terminate TLS in Envoy "
            "(docs/deployment.md) and serve the replicas in plaintext on loopback"
        )
    _, port = split_address(config.address, "address")
    if port == 0:
        raise ConfigError("--replicas: the front address needs a fixed port, not :0")
    base = port + 1 if base_port is None else base_port or free_port_run(count)
    if not 0 < base <= 65535 - count + 1:
        raise ConfigError(f"--replica-base-port: {base} leaves no room for {count} ports")
    replicas = tuple(f"127.0.0.1:{base + i}" for i in range(count))
    metrics: tuple[str | None, ...] = (None,) * count
    if config.metrics_address:
        metrics_host, metrics_port = split_address(config.metrics_address, "metrics_address")
        # Port 0: each replica's metrics on a free port of its own (none to check here).
        metrics = tuple(
            f"{metrics_host}:{metrics_port + i if metrics_port else 0}" for i in range(count)
        )
    fixed_metrics = [m for m in metrics if m and split_address(m, "metrics_address")[1]]
    taken = [config.address, envoy_admin, *replicas, *fixed_metrics]
    if len({split_address(a, "address")[1] for a in taken}) != len(taken):
        raise ConfigError(
            f"--replicas: ports overlap: front {config.address}, Envoy admin "
            f"{envoy_admin}, replicas {list(replicas)}, metrics {list(metrics)}"
        )
    for address in taken:
        check_port_free(address, reuse_port=False)
    return ReplicaPlan(config.address, replicas, metrics, envoy_admin)


def free_port_run(count: int) -> int:
    """A port that, with the `count - 1` after it, is free on loopback right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65536:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise ConfigError(f"--replica-base-port 0: found no {count} consecutive free ports")


def wait_serving(
    address: str,
    alive: Callable[[], bool],
    timeout_s: float = START_TIMEOUT_S,
    what: str = "replica",
) -> None:
    """Block until `address` reports overall SERVING; ConfigError naming `what` and the
    address if the process exits or the time runs out (load_tests' harness uses it too)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise ConfigError(f"{what} {address} exited before serving")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise ConfigError(f"{what} {address} not serving after {timeout_s:.0f} s")


class Replica:
    """One `walkrank serve` child on a fixed loopback port."""

    def __init__(self, index: int, command: list[str]) -> None:
        self.index = index
        self.command = command
        self.address = command[command.index("--address") + 1]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.backoff_s = RESTART_BACKOFF_S[0]

    def start(self) -> None:
        # Its own process group: a terminal's Ctrl-C or a signal to the launcher's group
        # reaches the launcher only, which stops the replicas in order.
        self.process = subprocess.Popen(self.command, process_group=0)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_serving(self) -> None:
        wait_serving(self.address, self.alive)

    def stop(self) -> int | None:
        """SIGTERM (graceful: in-flight calls finish), SIGKILL after STOP_TIMEOUT_S."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error(
                    "replica %d (%s) did not stop in %.0f s: killed",
                    self.index,
                    self.address,
                    STOP_TIMEOUT_S,
                )
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class ReplicaSet:
    """The replicas and Envoy in front of them, supervised until `stop()`."""

    def __init__(
        self,
        plan: ReplicaPlan,
        serve_args: list[str],
        envoy: Path,
        envoy_concurrency: int | None = None,
        lb_policy: str = "LEAST_REQUEST",
        workdir: Path | None = None,
        tenants_dir: Path | None = None,
        tenant_keys: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.plan = plan
        self.replicas = [
            Replica(
                i,
                [
                    sys.executable,
                    "-m",
                    "walkrank.cli",
                    "serve",
                    *serve_args,
                    "--address",
                    address,
                    *(["--metrics-address", metrics] if metrics else []),
                ],
            )
            for i, (address, metrics) in enumerate(zip(plan.replicas, plan.metrics, strict=True))
        ]
        self._workdir = workdir or Path(tempfile.mkdtemp(prefix="walkrank-envoy-"))
        self.envoy_config = self._workdir / "envoy.yaml"
        # Envoy holds each tenant to its quota on every replica; `follow_tenants` keeps that
        # in step with the tenant files while Envoy runs (its routes and clusters are files).
        self._tenants_dir = tenants_dir
        self._tenants_seen = _fingerprint(tenants_dir)
        self.envoy_settings = EnvoySettings(
            listen=plan.front,
            upstreams=plan.replicas,
            admin=plan.envoy_admin,
            lb_policy=lb_policy,
            tenant_quotas=self._quotas(),
            tenant_keys=tenant_keys,
            dynamic_dir=str(self._workdir / "xds"),
        )
        write_config(self.envoy_settings, self.envoy_config)
        self._envoy_command = envoy_command(envoy, self.envoy_config, envoy_concurrency)
        self.envoy: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # supervision and rolling restarts take turns
        self._stopping = threading.Event()

    def start(self) -> None:
        """Replicas first (in parallel: each loads and verifies the graph), then Envoy."""
        try:
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                replica.wait_serving()
            self.envoy = subprocess.Popen(self._envoy_command, process_group=0)
            self.wait_envoy_routing()
        except BaseException:
            self.stop()
            raise

    def wait_envoy_routing(self, timeout_s: float = 30.0) -> None:
        """Until Envoy is up and has found every replica healthy in every cluster (the shared
        one and each tenant's), or the set is stopping."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.envoy is None or self.envoy.poll() is not None:
                raise ConfigError(
                    f"envoy exited (status {self.envoy and self.envoy.returncode})"
                    f"; its configuration is {self.envoy_config}"
                )
            if routing(self.plan.envoy_admin, self.plan.replicas):
                return
            time.sleep(0.2)
        raise ConfigError(
            f"envoy at {self.plan.front} not routing to every replica after {timeout_s:.0f} s"
        )

    def _quotas(self, previous: tuple[tuple[str, int], ...] = ()) -> tuple[tuple[str, int], ...]:
        if self._tenants_dir is None:
            return ()
        return tenant_quotas(self._tenants_dir, len(self.replicas), previous)

    def follow_tenants(self) -> None:
        """When a tenant file changed (added, edited, removed), give Envoy the tenants' new
        quotas while it runs, without failing a call (`update_admission`). The replicas pick
        the files up on their own Reload; a failed update is logged and tried again."""
        seen = _fingerprint(self._tenants_dir)
        if seen == self._tenants_seen:
            return
        try:
            settings = dataclasses.replace(
                self.envoy_settings, tenant_quotas=self._quotas(self.envoy_settings.tenant_quotas)
            )
            if settings != self.envoy_settings:
                update_admission(self.envoy_settings, settings, timeout_s=ADMISSION_TIMEOUT_S)
                log.info("envoy: tenant quotas now %s", dict(settings.tenant_quotas))
        except ConfigError as exc:
            log.error("envoy: tenant quotas not updated (will retry): %s", exc)
            return
        self.envoy_settings = settings
        self._tenants_seen = seen

    def supervise_once(self) -> None:
        """Restart replicas that exited on their own; raise if Envoy did."""
        if self.envoy is not None and self.envoy.poll() is not None:
            raise ConfigError(f"envoy exited with status {self.envoy.returncode}")
        with self._lock:
            for replica in self.replicas:
                if self._stopping.is_set():
                    return
                if replica.alive():
                    if time.monotonic() - replica.started_at > STABLE_S:
                        replica.backoff_s = RESTART_BACKOFF_S[0]
                    continue
                code = replica.process.returncode if replica.process else None
                log.error(
                    "replica %d (%s) exited with status %s: restarting in %.0f s",
                    replica.index,
                    replica.address,
                    code,
                    replica.backoff_s,
                )
                if self._stopping.wait(replica.backoff_s):
                    return
                replica.backoff_s = min(replica.backoff_s * 2, RESTART_BACKOFF_S[1])
                replica.start()

    def rolling_restart(self) -> None:
        """One replica at a time: drain and stop it, start it again, wait until it serves
        and Envoy routes to it, then the next. Stops at the first replica that fails to
        come back (it is left to supervision), so the others keep serving what they served."""
        with self._lock:
            for replica in self.replicas:
                if self._stopping.is_set():
                    return
                log.info("rolling restart: replica %d (%s)", replica.index, replica.address)
                replica.stop()
                replica.start()

                def restarting(r: Replica = replica) -> bool:
                    return r.alive() and not self._stopping.is_set()

                try:
                    wait_serving(replica.address, restarting)
                    self.wait_envoy_routing(timeout_s=START_TIMEOUT_S)
                except ConfigError as exc:
                    if not self._stopping.is_set():
                        log.error("rolling restart stopped: %s", exc)
                    return
        log.info("rolling restart: done")

    def request_stop(self) -> None:
        """Abandon restarts and waits in progress, so `stop()` follows promptly."""
        self._stopping.set()

    def stop(self) -> int:
        """Replicas first, in parallel (their in-flight calls finish through Envoy), then
        Envoy; returns the worst replica exit status."""
        self._stopping.set()
        with self._lock:
            codes: list[int | None] = [None] * len(self.replicas)

            def stop_one(i: int) -> None:
                codes[i] = self.replicas[i].stop()

            threads = [
                threading.Thread(target=stop_one, args=(i,)) for i in range(len(self.replicas))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if self.envoy is not None and self.envoy.poll() is None:
                self.envoy.terminate()
                try:
                    self.envoy.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.envoy.kill()
                    self.envoy.wait()
        return max((code or 0 for code in codes), default=0)


def _fingerprint(directory: Path | None) -> tuple[tuple[str, int, int], ...]:
    """What changes when a tenant file is written, renamed or removed (name, mtime, size)."""
    if directory is None:
        return ()
    seen = []
    with contextlib.suppress(OSError):
        for path in sorted(directory.iterdir()):
            with contextlib.suppress(OSError):
                stat = path.stat()
                seen.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(seen)


def run_replicas(replica_set: ReplicaSet) -> int:
    """Start, print where everything listens, supervise until SIGTERM/SIGINT."""
    stop = threading.Event()
    restart = threading.Event()

    def on_stop(*_: object) -> None:
        replica_set.request_stop()  # a rolling restart in progress gives up at once
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: restart.set())
    replica_set.start()
    plan = replica_set.plan
    announce(
        f"{BANNER} {plan.front} balancing {len(plan.replicas)} replicas "
        f"({', '.join(plan.replicas)}); envoy admin {plan.envoy_admin}"
    )
    try:
        while not stop.wait(0.5):
            if restart.is_set():
                restart.clear()
                threading.Thread(
                    target=replica_set.rolling_restart, name="rolling-restart", daemon=True
                ).start()
            replica_set.supervise_once()
            replica_set.follow_tenants()
    finally:
        code = replica_set.stop()
    announce("walkrank: stopped")
    return code


def memory_kib(pid: int, under: Path | None = None) -> dict[str, int]:
    """Resident and proportional memory of `pid` in KiB, from /proc (Linux).

    Without `under`: the whole process (`smaps_rollup`: Rss, Pss, Private_*). With it: only
    the mappings of files below `under` (the graph), so N replicas of one graph show Rss
    N times but Pss adding up to one copy: the page cache holds the files once.
    """
    if under is None:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines()[1:])
        return {
            key: int(value.split()[0])
            for key, value in fields.items()
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean")
        }
    prefix = str(Path(under).resolve()) + "/"
    totals = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            inside = len(head) >= 6 and head[5].startswith(prefix)
        elif inside and head and head[0][:-1] in totals:
            totals[head[0][:-1]] += int(head[1])
    return totals


def parse_banner(line: str) -> ReplicaPlan:
    """Where a launcher listens, from the line it prints when it serves (for scripts that
    start `walkrank serve --replicas N` as a child); ValueError on any other line."""
    if not line.startswith(BANNER):
        raise ValueError(f"not the launcher's serving line: {line!r}")
    front = line[len(BANNER) :].split()[0]
    replicas = tuple(line.partition("(")[2].partition(")")[0].split(", "))
    admin = line.rpartition("envoy admin ")[2].strip()
    return ReplicaPlan(front, replicas, (None,) * len(replicas), admin)


def replica_pids(launcher_pid: int) -> dict[str, int]:
    """The live replica processes of a launcher, by address (Linux /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    found = {}
    for pid in children.read_text().split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:  # exited meanwhile
            continue
        if "serve" in command and "--address" in command:
            found[command[command.index("--address") + 1]] = int(pid)
    return found
