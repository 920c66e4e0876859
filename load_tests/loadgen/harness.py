"""A WalkRank server in its own process on a loopback port, for load runs and benchmarks.

The server runs as `walkrank serve` (the command operators run), never inside the generator's
process, so the two do not share a GIL. Its CPU time is read from /proc, summed over the
server's processes (`--processes N` forks), to show what the load cost it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from walkrank.errors import ConfigError
from walkrank.replicas import wait_serving

START_TIMEOUT_S = 300.0
#: What `walkrank serve` prints once per process when it listens.
SERVING_LINE = "walkrank: serving"


def free_port() -> int:
    """A port free right now on loopback (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM (a server finishes its in-flight calls), SIGKILL if still running after
    `timeout_s`; nothing when it has exited."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def graph_directory(value: str, program: str, alternatives: str) -> Path:
    """`--graph VALUE` as a graph directory; exits naming what else `--graph` may be."""
    path = Path(value)
    if not (path / "manifest.json").is_file():
        raise SystemExit(
            f"{program}: --graph {value!r} is neither {alternatives} "
            f"nor a graph directory with manifest.json"
        )
    return path


def write_server_config(
    path: Path,
    graph: Path,
    tenants_dir: Path,
    models_dir: Path,
    logs_dir: Path,
    workers: int,
    metrics_address: str | None = None,
    auth: bool = False,
    grace_seconds: float | None = None,
) -> Path:
    """A `walkrank.yaml`; with `auth`, keys come from the server's environment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "graph": str(graph.resolve()),
        "tenants_dir": str(tenants_dir.resolve()),
        "models_dir": str(models_dir.resolve()),
        "logs_dir": str(logs_dir.resolve()),
        "workers": workers,
    }
    if metrics_address is not None:
        settings["metrics_address"] = metrics_address
    if auth:
        settings["auth"] = {"enabled": True}
    if grace_seconds is not None:
        settings["grace_seconds"] = grace_seconds
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def process_cpu_seconds(root: int) -> float:
    """User + system CPU of `root` and its live descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class ServeProcess:
    """`walkrank serve --config CONFIG --address 127.0.0.1:PORT`; a context manager."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        workers: int | None = None,
        processes: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        # The `walkrank` console script, run by this interpreter (no PATH lookup).
        entry = "import sys; from walkrank.cli import main; sys.exit(main())"
        command = [
            sys.executable,
            "-c",
            entry,
            "serve",
            "--config",
            str(config),
            "--address",
            self.target,
            "--processes",
            str(processes),
        ]
        if workers is not None:
            command += ["--workers", str(workers)]
        self.command = command
        self.processes = processes
        self.log_path = log_path
        self.env = env
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            process = self._process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            wait_serving(
                self.target, lambda: process.poll() is None, START_TIMEOUT_S, what="server at"
            )
            # Forked servers bind one by one; load must not start before all of them listen.
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.log_path.read_text().count(SERVING_LINE) < self.processes:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"{self.processes} server processes not all serving")
                time.sleep(0.2)
        except (RuntimeError, ConfigError) as exc:
            self.stop()
            tail = self.log_path.read_text()[-2000:]
            raise RuntimeError(f"{exc}; server log {self.log_path}:\n{tail}") from None
        return self.target

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None
        return self._process

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process, timeout_s=30)

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
