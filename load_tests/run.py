"""Load tests for WalkRank: start a server on a loopback port, send ghz configs' load, report.

    python load_tests/run.py run load_tests/homefeed.json [--graph demo|tiny|quick|bench|DIR]
    python load_tests/run.py mixed            # steady home feed + related pins, then + email
    python load_tests/run.py draw --graph demo  # (re)draw load_tests/data/*.json

`ghz` is used when it is on PATH (`--engine auto`), else the built-in generator
(loadgen.generator), which reads the same config files. Both write `<out>/<name>.json` and
`<out>/<name>.md` with count, requests/s, p50/p90/p99 and the status-code distribution.
Run it from the repository root: the shipped configs' relative paths resolve against the
working directory, as ghz resolves them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadgen.generator import RunResult, run_load
from loadgen.ghz_config import GhzConfig, load_ghz_config
from loadgen.harness import ServeProcess, graph_directory, write_server_config
from loadgen.report import Summary, from_ghz_json, write_results
from loadgen.traffic import draw_requests, unknown_query_pins, write_requests
from walkrank.errors import WalkRankError
from walkrank.graph.store import GraphStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TENANT_DATA = {"homefeed": 200, "related_pins": 200, "email": 4}


def resolve_graph(value: str) -> Path:
    """'demo' (the demo world's graph), a synthetic preset, or a graph directory."""
    from walkrank.graph.synthetic import PRESETS, ensure_graph

    if value == "demo":
        from walkrank.demo.world import SIZES, ensure_world_graph

        return ensure_world_graph(ROOT / "var" / "demo", SIZES["full"])
    if value in PRESETS:
        return ensure_graph(value, ROOT / ".cache" / "graphs")
    return graph_directory(value, "run.py", f"'demo', a preset ({', '.join(PRESETS)})")


def check_data(configs: list[GhzConfig], graph: Path) -> None:
    """Refuse request data whose query pins the served graph does not know."""
    store = GraphStore.load(graph)
    for config in configs:
        messages = [json.loads(text) for text in config.messages]
        unknown, total = unknown_query_pins(store, messages)
        if total and unknown / total > 0.01:
            raise SystemExit(
                f"run.py: {config.source}: {unknown} of {total} query pins are not in the graph "
                f"{graph}; draw data from it: python load_tests/run.py draw --graph {graph}"
            )


def run_ghz(configs: list[GhzConfig], target: str, out: Path) -> list[Summary]:
    """Each config through `ghz --config`, all at once; host forced to the started server.

    ghz runs in the directory the config's relative paths were resolved against, and is given
    absolute paths for everything else, so where run.py was started from does not matter.
    """
    ghz = shutil.which("ghz")
    assert ghz is not None
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for config in configs:
        reports = out / f"ghz-{config.label}.json"
        # CLI flags override the config file (ghz.sh/docs/options, --config).
        command = [
            ghz,
            "--config",
            str(config.source),
            "--insecure",
            "--format",
            "json",
            "--output",
            str(reports),
            target,
        ]
        runs.append((config, reports, subprocess.Popen(command, cwd=config.workdir)))
    summaries = []
    for config, reports, process in runs:
        if process.wait() != 0:
            raise SystemExit(f"run.py: ghz failed on {config.source} (exit {process.returncode})")
        summaries.append(from_ghz_json(config.label, json.loads(reports.read_text()), config.tags))
    return summaries


def send_load(
    configs: list[GhzConfig], target: str, engine: str, processes: int, out: Path
) -> tuple[list[Summary], list[RunResult]]:
    if engine == "ghz":
        return run_ghz(configs, target, out), []
    results = run_load(configs, target, processes)
    return [r.summary for r in results], results


def pick_engine(engine: str) -> str:
    if engine == "auto":
        return "ghz" if shutil.which("ghz") else "builtin"
    if engine == "ghz" and shutil.which("ghz") is None:
        raise SystemExit(
            "run.py: --engine ghz but ghz is not on PATH (https://ghz.sh/docs/install)"
        )
    return engine


class Server:
    """The server a run targets: started here from --graph/--tenants/--models, or --target."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.process: ServeProcess | None = None
        self.graph: Path | None = None

    def __enter__(self) -> str:
        args = self.args
        if args.target:
            return args.target
        self.graph = resolve_graph(args.graph)
        models = args.models or self.out / "models"
        if args.random_models and not args.models:
            from loadgen.models import publish_random_models

            versions = publish_random_models(models, args.tenants)
            print(f"run.py: random 100-tree depth-6 models published: {versions}", flush=True)
        config = write_server_config(
            self.out / "walkrank.yaml",
            self.graph,
            args.tenants,
            models,
            self.out / "logs",
            args.server_workers,
        )
        self.process = ServeProcess(
            config, self.out / "server.log", processes=args.server_processes
        )
        target = self.process.start()
        print(f"run.py: server on {target} (graph {self.graph})", flush=True)
        return target

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop()


def describe(results: list[RunResult]) -> list[str]:
    notes = []
    for result in results:
        if result.generator_cpu_s is not None:
            notes.append(
                f"- {result.summary.label}: the built-in generator used "
                f"{result.generator_cpu_s:.1f} CPU s over {result.processes} process(es) "
                f"({result.generator_cpu_s / result.summary.total_s:.2f} cores), on the "
                f"server's machine."
            )
    return notes


def command_run(args: argparse.Namespace) -> int:
    configs = [load_ghz_config(p) for p in args.configs]
    engine = pick_engine(args.engine)
    out = args.out.resolve()
    with Server(args, out) as target:
        if args.target is None:
            check_data(configs, resolve_graph(args.graph))
        summaries, results = send_load(configs, target, engine, args.processes, out)
    name = args.name or "-".join(c.label for c in configs)
    write_results(
        out,
        name,
        f"Load test: {name}",
        summaries,
        extra={"engine": engine, "target": target, "graph": str(args.graph)},
        notes=describe(results),
    )
    print((out / f"{name}.md").read_text())
    return 0 if all(s.error_count == 0 for s in summaries) or args.allow_errors else 1


def command_mixed(args: argparse.Namespace) -> int:
    """Steady traffic alone, then with the burst: per-tenant latency of both phases."""
    configs = [load_ghz_config(p) for p in sorted(args.dir.glob("*.json"))]
    steady = [c for c in configs if c.tags.get("role") == "steady"]
    burst = [c for c in configs if c.tags.get("role") == "burst"]
    if not steady or not burst:
        raise SystemExit(f"run.py: {args.dir} needs configs tagged role=steady and role=burst")
    engine = pick_engine(args.engine)
    with Server(args, args.out) as target:
        if args.target is None:
            check_data(configs, resolve_graph(args.graph))
        alone, _ = send_load(steady, target, engine, args.processes, args.out / "alone")
        mixed, results = send_load(
            steady + burst, target, engine, args.processes, args.out / "mixed"
        )
    rows = []
    notes = ["Phase 1 runs the steady configs alone, phase 2 the same with the burst.", ""]
    verdicts: dict[str, Any] = {}
    for before in alone:
        after = next(s for s in mixed if s.label == before.label)
        target_ms = float(before.tags["p99_target_ms"]) if "p99_target_ms" in before.tags else None
        met = target_ms is None or after.p99_ms <= target_ms
        verdicts[before.label] = {
            "p99_alone_ms": before.p99_ms,
            "p99_with_burst_ms": after.p99_ms,
            "p99_target_ms": target_ms,
            "met": met,
        }
        rows.append(
            f"| {before.label} | {before.p99_ms:.1f} | {after.p99_ms:.1f} | "
            f"{'-' if target_ms is None else f'{target_ms:.0f}'} | "
            f"{'yes' if met else 'NO'} |"
        )
    notes += [
        "| steady tenant | p99 alone ms | p99 with burst ms | p99 target ms | met |",
        "| --- | ---: | ---: | ---: | --- |",
        *rows,
        "",
    ]
    for summary in mixed:
        if summary.tags.get("role") == "burst":
            refused = summary.status_codes.get("RESOURCE_EXHAUSTED", 0)
            notes.append(
                f"- {summary.label} (burst): {summary.count} batch calls, "
                f"{refused} refused by its quota (RESOURCE_EXHAUSTED)."
            )
    alone = [dataclasses.replace(s, label=f"{s.label} (alone)") for s in alone]
    write_results(
        args.out,
        "mixed",
        "Mixed-tenant load test",
        alone + mixed,
        extra={"engine": engine, "verdicts": verdicts},
        notes=notes,
    )
    print((args.out / "mixed.md").read_text())
    return 0 if all(v["met"] for v in verdicts.values()) else 1


def command_draw(args: argparse.Namespace) -> int:
    graph_path = resolve_graph(args.graph)
    graph = GraphStore.load(graph_path)
    for tenant, n in TENANT_DATA.items():
        messages = draw_requests(graph, tenant, n, seed=args.seed, batch_users=args.batch_users)
        write_requests(args.out_dir / f"{tenant}.json", messages)
        print(f"run.py: {args.out_dir / f'{tenant}.json'}: {n} {tenant} messages from {graph_path}")
    return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--graph",
        default="demo",
        help="graph to serve: demo, tiny, quick, bench or a graph directory",
    )
    parser.add_argument("--tenants", type=Path, default=ROOT / "tenants")
    parser.add_argument(
        "--models",
        type=Path,
        help="model registry (default: none, so tenants "
        "rank by visit count, unless --random-models)",
    )
    parser.add_argument(
        "--random-models",
        action="store_true",
        help="publish a 100-tree depth-6 model per tenant, trained on random rows",
    )
    parser.add_argument("--server-workers", type=int, default=8)
    parser.add_argument(
        "--server-processes", type=int, default=1, help="walkrank serve --processes (SO_REUSEPORT)"
    )
    parser.add_argument("--target", help="use a running server at host:port instead")
    parser.add_argument("--engine", choices=("auto", "ghz", "builtin"), default="auto")
    parser.add_argument(
        "--processes", type=int, default=2, help="built-in generator processes per config"
    )
    parser.add_argument("--allow-errors", action="store_true", help="exit 0 even when calls failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="load_tests/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run ghz configs at the same time")
    run.add_argument("configs", nargs="+", type=Path)
    run.add_argument("--out", type=Path, default=ROOT / "var" / "load_tests")
    run.add_argument("--name", help="results file name (default: the configs' labels)")
    add_server_arguments(run)
    run.set_defaults(func=command_run)
    mixed = commands.add_parser("mixed", help="steady tenants alone, then with a burst")
    mixed.add_argument("--dir", type=Path, default=HERE / "mixed")
    mixed.add_argument("--out", type=Path, default=ROOT / "var" / "load_tests" / "mixed")
    add_server_arguments(mixed)
    mixed.set_defaults(func=command_mixed)
    draw = commands.add_parser("draw", help="draw request data files from a graph")
    draw.add_argument("--graph", default="demo")
    draw.add_argument("--out-dir", type=Path, default=HERE / "data")
    draw.add_argument("--seed", type=int, default=7)
    draw.add_argument("--batch-users", type=int, default=200)
    draw.set_defaults(func=command_draw)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except WalkRankError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
