"""`walkrank serve` as a user runs it: a real process, a real call, SIGTERM, a clean stop."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import yaml

from walkrank.cli import main
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.replicas import free_port_run
from walkrank_client import WalkRankClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_answers_then_stops_gracefully_on_sigterm(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    with serve_process(write_config(tmp_path, small_graph.path)) as (process, address):
        pin = str(small_graph.pin_external([0])[0])
        with WalkRankClient(address, timeout=20.0) as client:
            answer = client.recommend("homefeed", [pin])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in stdout_of(process).read()
    logged = read_candidates(tmp_path / "logs", "homefeed")
    assert logged.num_rows == answer.candidates_generated


def write_config(
    tmp_path: Path, graph: Path, address: str = "127.0.0.1:0", **settings: object
) -> Path:
    """`tmp_path/walkrank.yaml` serving `graph` with the shipped tenants (copied into
    `tmp_path/tenants` unless a tenants folder is there already) and `settings` besides."""
    if not (tmp_path / "tenants").exists():
        shutil.copytree(REPO / "tenants", tmp_path / "tenants")
    config = tmp_path / "walkrank.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "graph": str(graph),
                "tenants_dir": "tenants",
                "models_dir": "models",
                "logs_dir": "logs",
                "address": address,
                **settings,
            }
        )
    )
    return config


def stdout_of(process: subprocess.Popen[str]) -> IO[str]:
    assert process.stdout is not None
    return process.stdout


@contextlib.contextmanager
def serve_process(config: Path, *options: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`walkrank serve --config CONFIG OPTIONS` in a child process, once it has printed its
    first banner: the process and the address it serves on. Killed on the way out unless the
    test stopped it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "walkrank.cli", "serve", "--config", str(config), *options],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = stdout_of(process).readline()
        assert "serving" in banner, banner
        yield process, banner.strip().rsplit(" on ", 1)[1]
    finally:
        if process.poll() is None:
            process.kill()


def serve_fails(config: Path, *options: str) -> str:
    """Run `walkrank serve`, which must exit 2 by itself (a hang fails the test); the one
    line it writes to stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "walkrank.cli", "serve", "--config", str(config), *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    return line


@pytest.mark.slow
def test_corrupt_graph_exits_2_naming_the_file(tmp_path: Path, small_graph: GraphStore) -> None:
    """pin_adj.npy overwritten with other values of the same size: a SIGSEGV in the walk
    kernels before the graph was verified at startup."""
    graph = tmp_path / "graph"
    shutil.copytree(small_graph.path, graph)
    adj = graph / "pin_adj.npy"
    adj.chmod(0o644)
    data = adj.read_bytes()
    values = np.random.default_rng(5).integers(
        2**30, 2**31 - 1, small_graph.n_edges, dtype=np.int32
    )
    adj.write_bytes(data[: len(data) - values.nbytes] + values.tobytes())
    line = serve_fails(write_config(tmp_path, graph))
    assert line.startswith(f"walkrank: error: {adj}: checksum mismatch for array 'pin_adj'")


@pytest.mark.slow
@pytest.mark.parametrize("processes", ["1", "2"])
def test_busy_port_exits_2_with_one_line_naming_the_address(
    tmp_path: Path, small_graph: GraphStore, processes: str
) -> None:
    """It printed gRPC's `RuntimeError: Failed to bind` traceback and never exited."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        line = serve_fails(
            write_config(tmp_path, small_graph.path, address), "--processes", processes
        )
    assert line == (
        f"walkrank: error: address: cannot bind {address}: the port is in use by another process"
    )


@pytest.mark.slow
def test_a_served_graph_is_never_replaced(tmp_path: Path, small_graph: GraphStore) -> None:
    """`graph build --replace` refuses the directory a running server maps (replacing files
    under a memory map is what turns into SIGBUS); the server keeps answering."""
    graph = tmp_path / "graph"
    shutil.copytree(small_graph.path, graph)
    edges = tmp_path / "edges.csv"
    edges.write_text("pin_id,board_id\n1,2\n3,2\n")
    build = ["graph", "build", "--edges", str(edges), "--out", str(graph)]
    with serve_process(write_config(tmp_path, graph)) as (process, address):
        refused = subprocess.run(
            [sys.executable, "-m", "walkrank.cli", *build, "--replace"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert refused.stderr == (
            f"walkrank: error: {graph}: a running server is serving this "
            f"graph; build into a new directory and point the server's "
            f"graph setting at it (docs/serving.md)\n"
        )
        pin = str(small_graph.pin_external([0])[0])
        with WalkRankClient(address, timeout=20.0) as client:
            assert client.recommend("homefeed", [pin]).candidates
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert main(build) == 2  # exists: refused without --replace
    assert main([*build, "--replace"]) == 0  # no server holds it any more
    assert GraphStore.load(graph).n_edges == 2


def test_bad_cli_override_exits_2_naming_the_field(tmp_path: Path) -> None:
    """`--workers 0` bypassed the YAML loader's checks and reached gRPC; overrides now go
    through the same validator as the file (no graph needed: refused before anything loads)."""
    line = serve_fails(write_config(tmp_path, tmp_path / "graph"), "--workers", "0")
    assert line == "walkrank: error: workers: must be >= 1, got 0"


@pytest.mark.slow
def test_processes_serve_metrics_on_consecutive_ports(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    """Every `--processes` child bound the one metrics port (all but one failed to start
    their metrics server); child i now serves /metrics on the metrics port + i."""
    base = free_port_run(3)
    config = write_config(tmp_path, small_graph.path, f"127.0.0.1:{base}")
    metrics = [f"127.0.0.1:{base + 1}", f"127.0.0.1:{base + 2}"]
    options = ("--processes", "2", "--metrics-address", metrics[0])
    with serve_process(config, *options) as (process, _address):
        assert "serving" in stdout_of(process).readline()  # the second child's banner
        for address in metrics:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=20) as page:
                assert b"walkrank_requests_total" in page.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_processes_metrics_port_range_is_checked(tmp_path: Path) -> None:
    line = serve_fails(
        write_config(tmp_path, tmp_path / "graph", "127.0.0.1:50051"),
        *("--processes", "3", "--metrics-address", "127.0.0.1:65534"),
    )
    assert line == "walkrank: error: metrics_address: 127.0.0.1:65534 leaves no room for 3 ports"
