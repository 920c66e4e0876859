"""`walkrank demo`: the demo world end to end (the README's first command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from walkrank.demo.world import DEMO_HOME, SIZES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole product on a generated world",
        description="Generates a world (graph, users, a hidden full ranker), serves it with "
        "three tenants by visit count, trains each tenant's model from the serving "
        "log, reloads, serves again and compares.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEMO_HOME,
        help=f"working and report folder (default {DEMO_HOME})",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=7)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from walkrank.demo.run import render_markdown, run_demo

    report = run_demo(args.out, size=args.size, seed=args.seed)
    print()
    print(render_markdown(report))
    print(f"Report, JSON and chart: {report.out_dir}/demo.md, demo.json, demo.png")
    return 0
