"""benchmarks/graph_build.py end to end on small sizes: streamed synthetic partitions, both
builders in child processes, the figures issue 14 asks for, `--merge`, and the table."""

from __future__ import annotations

import json
from pathlib import Path

import graph_build
import pytest
import tables


@pytest.mark.slow
def test_sizes_run_alone_merge_into_one_report(tmp_path: Path) -> None:
    out = tmp_path / "graph_build.json"
    common = ["--memory-limit", "64MB", "--partitions", "4", "--work", str(tmp_path)]
    assert (
        graph_build.main(["--sizes", "40K", "--compare", "40K", "--json", str(out), *common]) == 0
    )
    assert (
        graph_build.main(
            ["--sizes", "20K", "--compare", "", "--json", str(out), "--merge", *common]
        )
        == 0
    )
    report = json.loads(out.read_text())

    assert list(report["sizes"]) == ["0.02M", "0.04M"]  # in edge order, both kept
    small, large = report["sizes"].values()
    for figures in (small, large):
        for key in ("edges", "seconds", "cpu_seconds", "peak_rss_bytes", "bytes_per_edge"):
            assert figures[key] > 0, key
        assert figures["peak_rss_bytes"] >= max(figures["steps_peak_rss_bytes"].values())
        assert 0 < sum(figures["steps_cpu_s"].values()) <= figures["cpu_seconds"]
        assert figures["csr_buckets"] >= 1
        assert figures["graph_bytes"] < figures["peak_rss_bytes"]
    assert large["same_checksums_as_in_memory"] is True and "in_memory" not in small
    assert report["time_growth"]["to_edges"] == large["edges"]
    assert set(report["time_growth"]["steps_cpu_per_edge_ratio"]) <= set(large["steps_cpu_s"])
    assert report["extrapolated"]["edges"] == graph_build.TARGET_EDGES  # 200M not measured
    assert report["target_met"] is False
    assert "not measured" in tables.graph_build_table(report)
    assert not [p for p in tmp_path.iterdir() if p != out]  # generated data removed

    with pytest.raises(SystemExit):  # figures under another memory limit are not merged
        graph_build.main(["--sizes", "20K", "--json", str(out), "--merge", "--memory-limit", "1GB"])
