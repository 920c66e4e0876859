"""`walkrank graph build | info | synth`: make and inspect graph directories."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from walkrank.graph.build import PruneOptions, build_graph
from walkrank.graph.store import GraphStore
from walkrank.graph.synthetic import PRESETS, build_synthetic


def register(subparsers: argparse._SubParsersAction) -> None:
    graph = subparsers.add_parser("graph", help="build and inspect pin-board graphs")
    commands = graph.add_subparsers(dest="graph_command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build a graph directory from CSV/Parquet tables")
    build.add_argument("--edges", required=True, help="edges file: pin_id, board_id")
    build.add_argument("--pins", help="pins file: pin_id + locale, topic, quality, ...")
    build.add_argument("--boards", help="boards file: board_id + topic, locale")
    build.add_argument("--out", required=True, help="graph directory to write (must not exist)")
    _add_replace_option(build)
    _add_prune_options(build)
    build.set_defaults(func=_build)

    info = commands.add_parser("info", help="print a graph directory's manifest summary")
    info.add_argument("path", help="graph directory")
    info.add_argument("--verify", action="store_true",
                      help="check every array's checksum and the graph's structure")
    info.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    info.set_defaults(func=_info)

    synth = commands.add_parser("synth", help="generate and build a seeded synthetic graph")
    synth.add_argument("--preset", required=True, choices=sorted(PRESETS))
    synth.add_argument("--out", required=True, help="graph directory to write (must not exist)")
    _add_replace_option(synth)
    _add_prune_options(synth)
    synth.set_defaults(func=_synth)


def _add_replace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replace", action="store_true",
                        help="replace a graph already at --out: a new directory is swapped in "
                             "and the old one deleted; refused while a server serves it")


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pruning (Pixie; all off by default)")
    group.add_argument("--max-board-entropy", type=float, metavar="H",
                       help="drop boards whose normalised topic entropy exceeds H (0..1)")
    group.add_argument("--max-board-degree", type=int, metavar="N",
                       help="drop boards with more than N pins")
    group.add_argument("--pin-degree-threshold", type=int, metavar="N",
                       help="prune edges of pins with more than N boards")
    group.add_argument("--pin-keep-fraction", type=float, default=0.2, metavar="F",
                       help="share of a high-degree pin's boards kept, closest topic first "
                            "(default 0.2)")


def _options(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(
        max_board_entropy=args.max_board_entropy,
        max_board_degree=args.max_board_degree,
        pin_degree_threshold=args.pin_degree_threshold,
        pin_keep_fraction=args.pin_keep_fraction,
    )


def _build(args: argparse.Namespace) -> int:
    options = _options(args)
    started = time.perf_counter()
    manifest = build_graph(args.out, args.edges, args.pins, args.boards, options=options,
                           replace=args.replace)
    print(f"built {args.out} in {time.perf_counter() - started:.2f}s")
    _print_summary(manifest)
    return 0


def _synth(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    manifest = build_synthetic(args.out, args.preset, _options(args), replace=args.replace)
    print(f"built synthetic preset {args.preset!r} into {args.out} "
          f"in {time.perf_counter() - started:.2f}s")
    _print_summary(manifest)
    return 0


def _info(args: argparse.Namespace) -> int:
    graph = GraphStore.load(args.path, verify=args.verify)
    if args.json:
        print(json.dumps(graph.manifest, indent=2))
    else:
        _print_summary(graph.manifest)
    if args.verify:
        print(f"verified: all {len(graph.manifest['checksums'])} checksums match, structure "
              f"sound")
    return 0


def _examples(names: list[str], shown: int = 8) -> str:
    """A vocabulary as its size and its first few names (a real one may hold thousands)."""
    if not names:
        return "(0): -"
    more = f", ... ({len(names) - shown:,} more)" if len(names) > shown else ""
    return f"({len(names):,}): {', '.join(names[:shown])}{more}"


def _print_summary(manifest: dict[str, Any]) -> None:
    counts, stats, vocab = manifest["counts"], manifest["stats"], manifest["vocab"]
    print(f"pins {counts['pins']:,}  boards {counts['boards']:,}  edges {counts['edges']:,}  "
          f"({manifest['bytes_per_edge']:.2f} bytes/edge of adjacency, "
          f"{manifest['locale_index_bytes_per_edge']:.2f} of locale index)")
    print(f"max degree: pin {manifest['degree']['pin_max']:,}  "
          f"board {manifest['degree']['board_max']:,}")
    print(f"locales {_examples(vocab['locales'])}")
    print(f"topics {_examples(vocab['topics'])}")
    print(f"input edges {stats['input_edges']:,}, duplicates collapsed "
          f"{stats['duplicate_edges']:,}, boards left without edges "
          f"{stats['boards_without_edges_removed']:,}")
    for table in ("pins", "boards"):
        dropped = stats.get(f"{table}_table_rows_without_edges", 0)
        if dropped:
            print(f"{table} file rows without an edge, left out of the graph: {dropped:,}")
    if stats.get("pins_without_edges"):
        print(f"pins left without edges by pruning (kept, never reached by a walk): "
              f"{stats['pins_without_edges']:,}")
    for rule, rule_stats in stats["pruning"].items():
        details = ", ".join(f"{k} {v}" for k, v in rule_stats.items())
        print(f"pruning {rule}: {details}")
    seconds = manifest["build"].get("seconds")
    if seconds:
        print("build seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
