"""`walkrank serve` as a user runs it: a real process, a real call, SIGTERM, a clean stop."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from walkrank.candidate_log import read_candidates
from walkrank.graph.store import GraphStore
from walkrank_client import WalkRankClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_answers_then_stops_gracefully_on_sigterm(tmp_path: Path,
                                                        small_graph: GraphStore) -> None:
    shutil.copytree(REPO / "tenants", tmp_path / "tenants")
    config = tmp_path / "walkrank.yaml"
    config.write_text(yaml.safe_dump({"graph": str(small_graph.path), "tenants_dir": "tenants",
                                      "models_dir": "models", "logs_dir": "logs",
                                      "address": "127.0.0.1:0"}))
    process = subprocess.Popen([sys.executable, "-m", "walkrank.cli", "serve", "--config",
                                str(config)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "serving" in banner, banner
        address = banner.strip().rsplit(" on ", 1)[1]
        pin = str(small_graph.pin_external([0])[0])
        with WalkRankClient(address, timeout=20.0) as client:
            answer = client.recommend("homefeed", [pin])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    logged = read_candidates(tmp_path / "logs", "homefeed")
    assert logged.num_rows == answer.candidates_generated
