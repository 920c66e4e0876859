"""Graph repository: versions published atomically, listed, rolled back and retained, through
the `walkrank graph` command line and the files it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from walkrank.cli import main
from walkrank.errors import DataError
from walkrank.graph.repository import GraphRepository, resolve_graph
from walkrank.graph.store import GraphLease, GraphStore


def publish_tiny(repo: Path, *extra: str) -> None:
    assert main(["graph", "synth", "--preset", "tiny", "--publish", str(repo), *extra]) == 0


def listing(repo: Path, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert main(["graph", "list", str(repo), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_publish_makes_numbered_versions_and_current_follows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "graphs"
    publish_tiny(repo)
    publish_tiny(repo)
    out = capsys.readouterr().out
    assert "as version 2 of" in out and "(now CURRENT)" in out
    versions = listing(repo, capsys)
    assert [(v["version"], v["current"], v["held"]) for v in versions] == [
        (1, False, False),
        (2, True, False),
    ]
    assert versions[1]["counts"]["edges"] == 50_000
    assert (repo / "CURRENT").read_text() == "2\n"
    directory, version = resolve_graph(repo)
    assert (directory, version) == (repo / "2", "2")
    # Only the versions, the pointers and the lock file: no staging directory left behind.
    assert sorted(p.name for p in repo.iterdir()) == [
        ".publish.lock",
        "1",
        "2",
        "CURRENT",
        "LAST_VERSION",
    ]
    assert main(["graph", "info", str(repo)]) == 0
    assert f"{repo / '2'} (version 2)" in capsys.readouterr().out


def test_rollback_to_the_previous_or_a_given_version_and_never_to_a_corrupt_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "graphs"
    for _ in range(3):
        publish_tiny(repo)
    assert main(["graph", "rollback", str(repo)]) == 0
    assert resolve_graph(repo)[1] == "2"
    assert main(["graph", "rollback", str(repo), "--to", "3"]) == 0
    assert resolve_graph(repo)[1] == "3"
    corrupt = repo / "1" / "pin_adj.npy"
    corrupt.chmod(0o644)
    with open(corrupt, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\x7f")
    capsys.readouterr()
    assert main(["graph", "rollback", str(repo), "--to", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot roll back to version 1" in err and "pin_adj.npy" in err
    assert resolve_graph(repo)[1] == "3"
    assert main(["graph", "rollback", str(repo), "--to", "9"]) == 2
    assert "no such version (known: 1, 2, 3)" in capsys.readouterr().err


def test_retention_keeps_current_and_what_a_server_holds(tmp_path: Path) -> None:
    repo = tmp_path / "graphs"
    publish_tiny(repo)
    publish_tiny(repo)
    GraphRepository(repo).rollback(1)  # the current version is the oldest now
    lease = GraphLease(repo / "2")  # a server serving (or finishing calls on) version 2
    try:
        publish_tiny(repo, "--keep", "0")
        # Version 1 stopped being CURRENT with this publish and nobody holds it: deleted.
        versions = GraphRepository(repo).versions()
        assert [(v.version, v.current, v.held) for v in versions] == [
            (2, False, True),
            (3, True, False),
        ]
        assert GraphRepository(repo).prune(0) == []
    finally:
        lease.release()
    assert GraphRepository(repo).prune(0) == [2]
    assert [v.version for v in GraphRepository(repo).versions()] == [3]
    # Numbers only grow: a deleted version's number is never handed out again.
    publish_tiny(repo)
    assert resolve_graph(repo)[1] == "4"


def test_failed_build_publishes_nothing_and_an_abandoned_one_is_cleared(tmp_path: Path) -> None:
    repo = tmp_path / "graphs"
    publish_tiny(repo)

    def broken(out: Path) -> None:
        raise DataError("edges.parquet: missing column(s) board_id")

    with pytest.raises(DataError, match="board_id"):
        GraphRepository(repo).publish(broken)
    assert resolve_graph(repo)[1] == "1"
    # A publisher killed mid-build leaves its staging directory; the next publish clears it.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from walkrank.graph.repository import GraphRepository
        def build(out):
            print("building", flush=True)
            time.sleep(600)
        GraphRepository({str(repo)!r}).publish(build)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "building"
        staging = [p for p in repo.iterdir() if p.name.startswith(".publishing-")]
        assert len(staging) == 1
        publish_tiny(repo)  # a live publisher's staging directory is left alone
        assert staging[0].is_dir()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    publish_tiny(repo)
    assert not any(p.name.startswith(".") and p.is_dir() for p in repo.iterdir())
    assert [v.version for v in GraphRepository(repo).versions()] == [1, 4, 5]
    assert resolve_graph(repo)[1] == "5"


def test_publish_refuses_a_graph_directory_or_other_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain"
    assert main(["graph", "synth", "--preset", "tiny", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["graph", "synth", "--preset", "tiny", "--publish", str(plain)]) == 2
    assert "is a graph directory, not a graph repository" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["graph", "synth", "--preset", "tiny", "--publish", str(other)]) == 2
    assert "not empty and is not a graph repository" in capsys.readouterr().err
    assert (
        main(["graph", "synth", "--preset", "tiny", "--publish", str(tmp_path / "r"), "--replace"])
        == 2
    )
    assert "--replace applies to --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda repo: (repo / "LAST_VERSION").write_text("1\n"), "no graph published yet"),
        (lambda repo: (repo / "CURRENT").write_text("7\n"), "points at version 7"),
        (lambda repo: (repo / "CURRENT").write_text("seven\n"), "expected a positive version"),
    ],
)
def test_a_bad_pointer_is_an_error_naming_the_file(tmp_path: Path, setup, message: str) -> None:
    repo = tmp_path / "graphs"
    repo.mkdir()
    setup(repo)
    with pytest.raises(DataError, match=message):
        resolve_graph(repo)
    with pytest.raises(DataError, match="neither a graph directory"):
        resolve_graph(tmp_path)


def test_a_plain_directory_is_served_as_it_is_with_a_content_id(small_graph: GraphStore) -> None:
    directory, version = resolve_graph(small_graph.path)
    assert directory == small_graph.path
    assert len(version) == 12 and version == resolve_graph(small_graph.path)[1]
