"""Out-of-core graph builds: time and peak memory of `--engine duckdb` per graph size.

For each size the synthetic generator writes a graph (pins = edges / 20, boards = edges / 100,
32 topics, 8 locales, seed 7, as the `bench` preset) as Parquet partitions, streamed in
bounded memory (`write_graph_partitions`: edges in `--partitions` files by pin range, pins and
boards in one each), then builds it in a child process whose peak RSS (its `VmHWM`) is the
figure: the interpreter and libraries (~140 MB), DuckDB's buffers (up to `--memory-limit`;
beyond it DuckDB spills to disk) and the node-sized arrays. The child also samples its RSS
every 50 ms, and `steps_peak_rss_bytes` gives the highest sample in each build step, to show
where the peak is; `steps_cpu_s` the CPU time spent in each step (from the same samples), to
show which step's time grows faster than the edges. The in-memory builder runs on the same
files for the sizes in `--compare` (default the 20M case), and their checksums must match.

Targets (issue 14): peak RSS at most 1.5x the finished graph's size at 200M edges, time
growing no worse than linearly with edges (`time_growth`: CPU seconds per edge at the
largest size over those at the smallest; wall time is given too, and each step's CPU ratio
in `steps_cpu_per_edge_ratio`), the same checksums as
the in-memory builder. Where the largest size measured is below 200M, `extrapolated`
projects the peak and the graph's size there linearly from the two largest sizes (labelled
as such, not a measurement). `--merge` adds the sizes run to those already in `--json` (same
memory limit and partitions), so the largest size can be run alone.

    python benchmarks/graph_build.py [--sizes 20M,200M] [--compare 20M] [--json PATH] [--merge]
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
    from walkrank.graph.synthetic import write_graph_partitions

    write_graph_partitions(
        directory,
        n_pins=max(edges // 20, 100),
        n_boards=max(edges // 100, 20),
        n_edges=edges,
        n_topics=32,
        n_locales=8,
        seed=7,
        partitions=partitions,
    )
    return directory


def child(engine: str, data: str, out: str, limit: str) -> None:
    """The build itself (run as `graph_build.py child ...`): writes the manifest, the peak
    RSS (`VmHWM`: this process image's own, where the parent's `wait4` would also count the
    pages of the process it was forked from), the highest RSS sampled in each step and the
    CPU time (less disturbed than wall time by other work on the machine)."""
    import resource
    import threading

    from walkrank.graph.build import build_graph
    from walkrank.graph.outofcore import build_graph_out_of_core

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key))
        return int(line.split()[1]) * 1024

    samples: list[tuple[float, int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append((time.perf_counter(), status("VmRSS:"), time.process_time()))

    inputs = [f"{data}/edges", f"{data}/pins", f"{data}/boards"]
    sampler = threading.Thread(target=sample, daemon=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    sampler.start()
    if engine == "memory":
        manifest = build_graph(out, *inputs)
    else:
        manifest = build_graph_out_of_core(out, *inputs, memory_limit=limit)
    done.set()
    sampler.join()
    steps: dict[str, int] = {}
    steps_cpu: dict[str, float] = {}
    end, cpu_end = started, cpu_started
    for step, seconds in manifest["build"]["seconds"].items():
        begin, end = end, end + seconds
        in_step = [(rss, cpu) for t, rss, cpu in samples if begin <= t < end]
        if in_step:  # a step shorter than the sampling interval may have none
            steps[step] = max(rss for rss, _ in in_step)
            cpu_begin, cpu_end = cpu_end, in_step[-1][1]
            steps_cpu[step] = round(cpu_end - cpu_begin, 2)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, peak = usage.ru_utime + usage.ru_stime, status("VmHWM:")
    Path(f"{out}.manifest.json").write_text(json.dumps(manifest))
    Path(f"{out}.peak.json").write_text(
        json.dumps({"peak": peak, "steps": steps, "steps_cpu": steps_cpu, "cpu_seconds": cpu})
    )
    print(f"{engine} build: {cpu:.1f} s CPU, peak RSS {peak} bytes, {steps}", flush=True)


def measured_build(engine: str, data: Path, out: Path, memory_limit: str) -> dict[str, Any]:
    """Build in a child process; its wall time, peak RSS and the manifest's checksums."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "child", engine, str(data), str(out), memory_limit],
        check=True,
    )
    seconds = time.perf_counter() - started
    peaks = json.loads(Path(f"{out}.peak.json").read_text())
    peak = peaks["peak"]
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    graph_bytes = sum(p.stat().st_size for p in out.glob("*.npy"))
    edges = manifest["counts"]["edges"]
    cpu = peaks["cpu_seconds"]
    return {
        "edges": edges,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_bytes": peak,
        "bytes_per_edge": round(peak / edges, 2),
        "graph_bytes": graph_bytes,
        "peak_rss_over_graph": round(peak / graph_bytes, 3),
        "seconds_per_million_edges": round(seconds / edges * 1e6, 3),
        "cpu_seconds_per_million_edges": round(cpu / edges * 1e6, 3),
        "steps_s": manifest["build"]["seconds"],
        "steps_peak_rss_bytes": peaks["steps"],
        "steps_cpu_s": peaks["steps_cpu"],
        "csr_buckets": manifest["build"].get("csr_buckets"),
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


def summarise(report: dict[str, Any]) -> None:
    """The sizes in edge order and the figures the targets are read from."""
    report["sizes"] = dict(sorted(report["sizes"].items(), key=lambda item: item[1]["edges"]))
    for key in ("extrapolated", "time_growth"):
        report.pop(key, None)
    ordered = list(report["sizes"].values())
    smallest, largest = ordered[0], ordered[-1]
    report["largest_peak_rss_over_graph"] = largest["peak_rss_over_graph"]
    if largest["edges"] < TARGET_EDGES and len(ordered) > 1:
        report["extrapolated"] = extrapolate(ordered[-2], largest, TARGET_EDGES)
    linear = True
    if len(ordered) > 1:
        # Judged on CPU time: wall time on a shared machine follows the other work.
        ratio = largest["cpu_seconds_per_million_edges"] / smallest["cpu_seconds_per_million_edges"]
        report["time_growth"] = {
            "from_edges": smallest["edges"],
            "to_edges": largest["edges"],
            "seconds_per_edge_ratio": round(
                largest["seconds_per_million_edges"] / smallest["seconds_per_million_edges"], 3
            ),
            "cpu_seconds_per_edge_ratio": round(ratio, 3),
            # Each step's CPU seconds per edge, largest size over smallest: which step grows.
            "steps_cpu_per_edge_ratio": {
                step: round(
                    cpu / largest["edges"] / (smallest["steps_cpu_s"][step] / smallest["edges"]), 3
                )
                for step, cpu in largest.get("steps_cpu_s", {}).items()
                if smallest.get("steps_cpu_s", {}).get(step)
            },
        }
        linear = ratio <= 1.0
    report["target_met"] = (
        largest["edges"] >= TARGET_EDGES
        and largest["peak_rss_over_graph"] <= RSS_TARGET
        and linear
        and all(f.get("same_checksums_as_in_memory", True) for f in ordered)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:  # the build itself, in the child process `measured_build` runs
        child(*argv[1:])
        return 0
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
        help="scratch directory (default: a temporary one; needs ~35 bytes per edge)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here (after each size)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sizes already in --json, replacing those run again",
    )
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    compare = {parse_size(s) for s in args.compare.split(",") if s}
    report: dict[str, Any] = {
        "memory_limit": args.memory_limit,
        "cores": os.cpu_count(),
        "partitions": args.partitions,
        "sizes": {},
    }
    if args.merge:
        if args.json is None or not args.json.is_file():
            parser.error("--merge needs an existing --json file")
        earlier = json.loads(args.json.read_text())
        for key in ("memory_limit", "partitions"):
            if earlier.get(key) != report[key]:
                parser.error(
                    f"--merge: {args.json} was run with {key} {earlier.get(key)!r}, "
                    f"not {report[key]!r}"
                )
        report["sizes"] = earlier["sizes"]
    work = Path(tempfile.mkdtemp(prefix="walkrank-bench-build-", dir=args.work))
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
            summarise(report)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
