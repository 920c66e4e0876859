"""Out-of-core graph builds: time and peak memory of `--engine duckdb` per graph size.

For each size the synthetic generator draws a graph (pins = edges / 20, boards = edges / 100,
32 topics, 8 locales, seed 7, as the `bench` preset), writes it as Parquet partitions (edges in
`--partitions` files, pins and boards in one each), then builds it in a child process whose
peak RSS (its `VmHWM`) is the figure: the interpreter and libraries (~140 MB), DuckDB's
buffers (up to `--memory-limit`; beyond it DuckDB spills to disk) and the node-sized arrays.
The in-memory builder runs on the same files for the sizes in `--compare` (default the 20M
case), and their checksums must match.

Targets (issue 14): peak RSS at most 1.5x the finished graph's size at 200M edges, time
growing no worse than linearly with edges, the same checksums as the in-memory builder.
Where the largest size measured is below 200M, `extrapolated` projects the peak and the
graph's size there linearly from the two largest sizes (labelled as such, not a measurement).

    python benchmarks/graph_build.py [--sizes 20M,200M] [--compare 20M] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET = 1.5
TARGET_EDGES = 200_000_000


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_partitions(edges: int, directory: Path, partitions: int) -> Path:
    """The synthetic graph with `edges` edges as Parquet files under `directory`."""
    import pyarrow.parquet as pq

    from walkrank.graph.synthetic import generate_graph_tables

    tables = generate_graph_tables(
        n_pins=max(edges // 20, 100),
        n_boards=max(edges // 100, 20),
        n_edges=edges,
        n_topics=32,
        n_locales=8,
        seed=7,
    )
    for role in ("edges", "pins", "boards"):
        (directory / role).mkdir(parents=True)
    step = -(-edges // partitions)
    for i in range(partitions):
        pq.write_table(
            tables.edges.slice(i * step, step), directory / "edges" / f"part-{i:04d}.parquet"
        )
    pq.write_table(tables.pins, directory / "pins" / "part-0000.parquet")
    pq.write_table(tables.boards, directory / "boards" / "part-0000.parquet")
    return directory


def measured_build(engine: str, data: Path, out: Path, memory_limit: str) -> dict[str, Any]:
    """Build in a child process; its wall time, peak RSS and the manifest's checksums."""
    code = (
        "import json, sys\n"
        "from walkrank.graph.build import build_graph\n"
        "from walkrank.graph.outofcore import build_graph_out_of_core\n"
        "engine, data, out, limit = sys.argv[1:]\n"
        "inputs = [f'{data}/edges', f'{data}/pins', f'{data}/boards']\n"
        "manifest = (build_graph(out, *inputs) if engine == 'memory' else\n"
        "            build_graph_out_of_core(out, *inputs, memory_limit=limit))\n"
        "json.dump(manifest, open(f'{out}.manifest.json', 'w'))\n"
        # The peak of this process image: wait4's ru_maxrss would also count the pages
        # of the (large) parent it was forked from before its exec.
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "open(f'{out}.peak', 'w').write(str(int(peak.split()[1]) * 1024))\n"
    )
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, engine, str(data), str(out), memory_limit], check=True
    )
    seconds = time.perf_counter() - started
    peak = int(Path(f"{out}.peak").read_text())
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    graph_bytes = sum(p.stat().st_size for p in out.glob("*.npy"))
    edges = manifest["counts"]["edges"]
    return {
        "edges": edges,
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak,
        "bytes_per_edge": round(peak / edges, 2),
        "graph_bytes": graph_bytes,
        "peak_rss_over_graph": round(peak / graph_bytes, 3),
        "seconds_per_million_edges": round(seconds / edges * 1e6, 3),
        "steps_s": manifest["build"]["seconds"],
        "checksums": manifest["checksums"],
    }


def extrapolate(a: dict[str, Any], b: dict[str, Any], edges: int) -> dict[str, Any]:
    """Peak RSS and graph size at `edges`, on the line through two measured sizes: what
    grows per edge beyond the fixed costs (interpreter, DuckDB's limit once it is full)."""

    def at(key: str) -> float:
        slope = (b[key] - a[key]) / (b["edges"] - a["edges"])
        return b[key] + slope * (edges - b["edges"])

    peak, graph = at("peak_rss_bytes"), at("graph_bytes")
    return {
        "edges": edges,
        "from_edges": [a["edges"], b["edges"]],
        "marginal_peak_rss_bytes_per_edge": round(
            (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["edges"] - a["edges"]), 2
        ),
        "peak_rss_bytes": round(peak),
        "graph_bytes": round(graph),
        "peak_rss_over_graph": round(peak / graph, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20M,200M", help="edge counts (default 20M,200M)")
    parser.add_argument(
        "--compare",
        default="20M",
        help="sizes also built in memory, checksums compared ('' for none)",
    )
    parser.add_argument("--partitions", type=int, default=16, help="edge files per size")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB's memory limit")
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch directory (default: a temporary one; needs ~30 bytes per edge)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    compare = {parse_size(s) for s in args.compare.split(",") if s}
    work = Path(tempfile.mkdtemp(prefix="walkrank-bench-build-", dir=args.work))
    report: dict[str, Any] = {
        "memory_limit": args.memory_limit,
        "cores": os.cpu_count(),
        "partitions": args.partitions,
        "sizes": {},
    }
    try:
        for edges in sizes:
            label = f"{edges / 1e6:g}M"
            started = time.perf_counter()
            data = write_partitions(edges, work / label / "data", args.partitions)
            print(
                f"{label}: generated and written as Parquet in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
            figures = measured_build("duckdb", data, work / label / "duckdb", args.memory_limit)
            if edges in compare:
                memory = measured_build("memory", data, work / label / "memory", "")
                figures["in_memory"] = {
                    k: memory[k]
                    for k in ("seconds", "peak_rss_bytes", "bytes_per_edge", "peak_rss_over_graph")
                }
                figures["same_checksums_as_in_memory"] = memory["checksums"] == figures["checksums"]
            del figures["checksums"]
            report["sizes"][label] = figures
            print(f"{label}: {json.dumps(figures)}", flush=True)
            shutil.rmtree(work / label, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ordered = sorted(report["sizes"].values(), key=lambda f: f["edges"])
    largest = ordered[-1]
    report["largest_peak_rss_over_graph"] = largest["peak_rss_over_graph"]
    if largest["edges"] < TARGET_EDGES and len(ordered) > 1:
        report["extrapolated"] = extrapolate(ordered[-2], largest, TARGET_EDGES)
    report["target_met"] = largest["peak_rss_over_graph"] <= RSS_TARGET and all(
        f.get("same_checksums_as_in_memory", True) for f in report["sizes"].values()
    )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
