"""`walkrank graph build | synth | info | list | rollback | prune`: make, publish and inspect
graph directories and graph repositories (`walkrank.graph.repository`, docs/graphs.md)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from walkrank.errors import ConfigError, DataError
from walkrank.graph.build import PruneOptions, build_graph
from walkrank.graph.delta import MANIFEST_KEY, compaction_tables
from walkrank.graph.repository import (
    DEFAULT_KEEP,
    GraphRepository,
    is_repository,
    resolve_graph,
)
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import PRESETS, build_synthetic
from walkrank.storage import publish_graph


def register(subparsers: argparse._SubParsersAction) -> None:
    graph = subparsers.add_parser("graph", help="build and inspect pin-board graphs")
    commands = graph.add_subparsers(dest="graph_command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build a graph directory from CSV/Parquet tables")
    build.add_argument("--edges", required=True, help="edges file: pin_id, board_id")
    build.add_argument("--pins", help="pins file: pin_id + locale, topic, quality, ...")
    build.add_argument("--boards", help="boards file: board_id + topic, locale")
    engine = build.add_argument_group(
        "engine (each of --edges, --pins, --boards may be a file or a directory of them)"
    )
    engine.add_argument(
        "--engine",
        choices=("memory", "duckdb"),
        default="memory",
        help="memory (default): numpy, for tables that fit in memory several "
        "times over; duckdb: out of core, for larger ones (docs/graphs.md)",
    )
    engine.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="duckdb engine: DuckDB's memory limit, e.g. 2GB (default 1GB)",
    )
    engine.add_argument(
        "--temp-dir",
        metavar="DIR",
        help="duckdb engine: where it spills (default: beside the output)",
    )
    _add_target_options(build)
    _add_prune_options(build)
    build.set_defaults(func=_build)

    info = commands.add_parser("info", help="print a graph's manifest summary")
    info.add_argument("path", help="graph directory, or a repository (its current version)")
    info.add_argument(
        "--verify",
        action="store_true",
        help="check every array's checksum and the graph's structure",
    )
    info.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    info.set_defaults(func=_info)

    synth = commands.add_parser("synth", help="generate and build a seeded synthetic graph")
    synth.add_argument("--preset", required=True, choices=sorted(PRESETS))
    _add_target_options(synth)
    _add_prune_options(synth)
    synth.set_defaults(func=_synth)

    listing = commands.add_parser("list", help="list a graph repository's versions")
    listing.add_argument("repository", help="graph repository directory")
    listing.add_argument("--json", action="store_true", help="print the listing as JSON")
    listing.set_defaults(func=_list)

    rollback = commands.add_parser(
        "rollback", help="point a repository's CURRENT at an older (or a given) version"
    )
    rollback.add_argument("repository", help="graph repository directory")
    rollback.add_argument(
        "--to",
        type=int,
        metavar="VERSION",
        help="version to serve (default: the newest older than CURRENT)",
    )
    rollback.set_defaults(func=_rollback)

    prune = commands.add_parser(
        "prune", help="delete old versions (never CURRENT nor one a server holds)"
    )
    prune.add_argument("repository", help="graph repository directory")
    _add_keep_argument(prune, "versions kept besides CURRENT")
    prune.set_defaults(func=_prune)

    compact = commands.add_parser(
        "compact",
        help="fold a server's real-time edge log into a new version of its graph repository",
    )
    compact.add_argument("repository", help="the graph repository the server follows")
    compact.add_argument("--log", required=True, help="the server's realtime.log file")
    _add_keep_argument(compact, "versions kept besides CURRENT")
    compact.set_defaults(func=_compact)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="graph directory to write (must not exist)")
    target.add_argument(
        "--publish",
        metavar="REPO",
        help="publish as a new version of this graph repository (created if "
        "missing) and make it CURRENT; servers pick it up on Reload",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace a graph already at --out: a new directory is swapped in "
        "and the old one deleted; refused while a server serves it",
    )
    _add_keep_argument(
        parser, "with --publish: versions kept besides CURRENT and those servers hold"
    )


def _add_keep_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        metavar="N",
        help=f"{what} (default {DEFAULT_KEEP})",
    )


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pruning (Pixie; all off by default)")
    group.add_argument(
        "--max-board-entropy",
        type=float,
        metavar="H",
        help="drop boards whose normalised topic entropy exceeds H (0..1)",
    )
    group.add_argument(
        "--max-board-degree", type=int, metavar="N", help="drop boards with more than N pins"
    )
    group.add_argument(
        "--pin-degree-threshold",
        type=int,
        metavar="N",
        help="prune edges of pins with more than N boards",
    )
    group.add_argument(
        "--pin-keep-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of a high-degree pin's boards kept, closest topic first (default 0.2)",
    )


def _options(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(
        max_board_entropy=args.max_board_entropy,
        max_board_degree=args.max_board_degree,
        pin_degree_threshold=args.pin_degree_threshold,
        pin_keep_fraction=args.pin_keep_fraction,
    )


def _write(
    args: argparse.Namespace, what: str, build: Callable[[Path, bool], dict[str, Any]]
) -> int:
    """Build into `--out`, or publish into `--publish` as a new version; print a summary."""
    started = time.perf_counter()
    if args.publish is None:
        manifest = build(Path(args.out), args.replace)
        print(f"built {what} into {args.out} in {time.perf_counter() - started:.2f}s")
    else:
        if args.replace:
            raise ConfigError("--replace applies to --out; --publish always writes a new version")
        manifests: list[dict[str, Any]] = []
        version = publish_graph(  # a local repository, or a store URI (s3://bucket/prefix)
            args.publish, lambda out: manifests.append(build(out, False)), keep=args.keep
        )
        manifest = manifests[0]
        print(
            f"published {what} as version {version.version} of {args.publish} (now CURRENT) "
            f"in {time.perf_counter() - started:.2f}s"
        )
    _print_summary(manifest)
    return 0


def _build(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.engine == "memory":
        for flag, value in (("--memory-limit", args.memory_limit), ("--temp-dir", args.temp_dir)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --engine duckdb")
        return _write(
            args,
            args.edges,
            lambda out, replace: build_graph(
                out, args.edges, args.pins, args.boards, options=options, replace=replace
            ),
        )
    from walkrank.graph.outofcore import build_graph_out_of_core

    return _write(
        args,
        args.edges,
        lambda out, replace: build_graph_out_of_core(
            out,
            args.edges,
            args.pins,
            args.boards,
            options=options,
            replace=replace,
            memory_limit=args.memory_limit or "1GB",
            temp_dir=args.temp_dir,
        ),
    )


def _synth(args: argparse.Namespace) -> int:
    options = _options(args)
    return _write(
        args,
        f"synthetic preset {args.preset!r}",
        lambda out, replace: build_synthetic(out, args.preset, options, replace=replace),
    )


def _list(args: argparse.Namespace) -> int:
    repository = GraphRepository(args.repository)
    if not repository.root.is_dir():
        raise DataError(f"{repository.root}: graph repository does not exist")
    versions = repository.versions()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "version": v.version,
                        "path": str(v.path),
                        "current": v.current,
                        "held": v.held,
                        "created_at": v.created_at,
                        "counts": v.counts,
                        "problem": v.problem,
                    }
                    for v in versions
                ],
                indent=2,
            )
        )
        return 0
    if not versions:
        print(f"{repository.root}: no versions")
    for v in versions:
        marks = " ".join(m for m, on in (("CURRENT", v.current), ("held", v.held)) if on)
        size = (
            f"pins {v.counts['pins']:,}  boards {v.counts['boards']:,}  edges {v.counts['edges']:,}"
            if v.problem is None
            else f"problem: {v.problem}"
        )
        print(f"{v.version:>6}  {v.created_at}  {size}  {marks}".rstrip())
    return 0


def _rollback(args: argparse.Namespace) -> int:
    version = GraphRepository(args.repository).rollback(args.to)
    print(
        f"{args.repository}: CURRENT is now version {version.version}; servers serve it "
        f"after their next Reload"
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    deleted = GraphRepository(args.repository).prune(args.keep)
    print(
        f"{args.repository}: deleted version(s) {', '.join(map(str, deleted))}"
        if deleted
        else f"{args.repository}: nothing to delete"
    )
    return 0


def _compact(args: argparse.Namespace) -> int:
    """CURRENT plus the log's edges, built and published as the next version (the servers
    swap it in on Reload, or by watching CURRENT, and their deltas restart empty)."""
    repository = Path(args.repository)
    if not is_repository(repository):
        raise DataError(f"{repository}: not a graph repository (compact publishes a new version)")
    log_path = Path(args.log)
    if not log_path.is_file():
        raise DataError(f"{log_path}: no such real-time edge log (the server's realtime.log)")
    started = time.perf_counter()
    directory, version = resolve_graph(repository)
    tables, source = compaction_tables(GraphStore.load(directory), log_path)
    published = GraphRepository(repository).publish(
        lambda out: build_graph(
            out, tables["edges"], tables["pins"], tables["boards"], source=source
        ),
        keep=args.keep,
    )
    folded = source[MANIFEST_KEY]
    print(
        f"compacted version {version} and {folded['edges']:,} real-time edges (log records "
        f"through {folded['through_seq']}) into version {published.version} of {repository} "
        f"(now CURRENT) in {time.perf_counter() - started:.2f}s; Reload the servers to serve it"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    directory, version = resolve_graph(args.path)
    graph = GraphStore.load(directory, verify=args.verify)
    if args.json:
        print(json.dumps(graph.manifest, indent=2))
    else:
        print(f"{directory} (version {version})")
        _print_summary(graph.manifest)
    if args.verify:
        print(f"verified: all {len(graph.manifest['checksums'])} checksums match, structure sound")
    return 0


def _examples(names: list[str], shown: int = 8) -> str:
    """A vocabulary as its size and its first few names (a real one may hold thousands)."""
    if not names:
        return "(0): -"
    more = f", ... ({len(names) - shown:,} more)" if len(names) > shown else ""
    return f"({len(names):,}): {', '.join(names[:shown])}{more}"


def _print_summary(manifest: dict[str, Any]) -> None:
    counts, stats, vocab = manifest["counts"], manifest["stats"], manifest["vocab"]
    print(
        f"pins {counts['pins']:,}  boards {counts['boards']:,}  edges {counts['edges']:,}  "
        f"({manifest['bytes_per_edge']:.2f} bytes/edge of adjacency, "
        f"{manifest['locale_index_bytes_per_edge']:.2f} of locale index)"
    )
    print(
        f"max degree: pin {manifest['degree']['pin_max']:,}  "
        f"board {manifest['degree']['board_max']:,}"
    )
    print(f"locales {_examples(vocab['locales'])}")
    print(f"topics {_examples(vocab['topics'])}")
    print(
        f"input edges {stats['input_edges']:,}, duplicates collapsed "
        f"{stats['duplicate_edges']:,}, boards left without edges "
        f"{stats['boards_without_edges_removed']:,}"
    )
    for table in ("pins", "boards"):
        dropped = stats.get(f"{table}_table_rows_without_edges", 0)
        if dropped:
            print(f"{table} file rows without an edge, left out of the graph: {dropped:,}")
    if stats.get("pins_without_edges"):
        print(
            f"pins left without edges by pruning (kept, never reached by a walk): "
            f"{stats['pins_without_edges']:,}"
        )
    for rule, rule_stats in stats["pruning"].items():
        details = ", ".join(f"{k} {v}" for k, v in rule_stats.items())
        print(f"pruning {rule}: {details}")
    seconds = manifest["build"].get("seconds")
    if seconds:
        print("build seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
