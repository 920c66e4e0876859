"""Seeded synthetic pin–board graphs for tests, benchmarks and the demo.

Shape chosen to make Pixie's mechanisms matter: power-law pin and board degrees (Pareto
weights), each board centred on one (topic, locale) group and drawing most of its pins from
that group (so boards are mostly one topic and their pins mostly share a locale: locale-biased
walks change results), plus a minority of mixed boards that entropy pruning should drop.
Graphs are built once into `.cache/graphs/<preset>` (outside git) and reused while the
manifest records the same generator parameters. `write_graph_partitions` streams graphs far
larger than memory to Parquet partitions instead (benchmarks/graph_build.py, 200M edges).
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from walkrank.errors import DataError
from walkrank.graph.build import PruneOptions, build_graph, sorted_unique
from walkrank.graph.store import read_manifest

#: Bump when the generator's output changes, so cached graphs are rebuilt.
GENERATOR_VERSION = 2
#: Rounds of draws before giving up on `n_edges` distinct edges.
_ROUNDS = 20

LOCALE_NAMES = ("en", "ja", "de", "fr", "es", "pt", "it", "ko", "nl", "sv")
#: Fixed reference instant so pin creation times are reproducible (2025-06-15 UTC).
REFERENCE_EPOCH = 1_750_000_000
PIN_ID_BASE = 1_000_000_000
BOARD_ID_BASE = 2_000_000_000

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "n_pins": 5_000,
        "n_boards": 1_000,
        "n_edges": 50_000,
        "n_topics": 8,
        "n_locales": 3,
        "seed": 7,
    },
    "quick": {
        "n_pins": 100_000,
        "n_boards": 20_000,
        "n_edges": 2_000_000,
        "n_topics": 20,
        "n_locales": 5,
        "seed": 7,
    },
    "bench": {
        "n_pins": 1_000_000,
        "n_boards": 200_000,
        "n_edges": 20_000_000,
        "n_topics": 32,
        "n_locales": 8,
        "seed": 7,
    },
}


@dataclass(frozen=True)
class SyntheticTables:
    """The three input tables of the data contract, ready for `build_graph`."""

    edges: pa.Table
    pins: pa.Table
    boards: pa.Table


def locale_names(n_locales: int) -> list[str]:
    return [LOCALE_NAMES[i] if i < len(LOCALE_NAMES) else f"l{i:02d}" for i in range(n_locales)]


def topic_names(n_topics: int) -> list[str]:
    return [f"topic{i:02d}" for i in range(n_topics)]


@dataclass(frozen=True)
class _Nodes:
    """Pins' and boards' attributes and the cumulative weights edges are drawn from: what
    both the in-memory and the streamed generator share."""

    n_topics: int
    n_locales: int
    pin_topic: np.ndarray
    pin_locale: np.ndarray
    by_group: np.ndarray  # pins in (group, pin) order
    cum: np.ndarray  # cumulative pin weight in `by_group` order
    group_lo: np.ndarray  # each group's first and past-last slot in `by_group`
    group_hi: np.ndarray
    cum_before: np.ndarray  # `cum` before each group's first slot, and each group's mass
    group_mass: np.ndarray
    board_group: np.ndarray
    board_home: np.ndarray  # a board's probability of drawing from its own group
    board_cum: np.ndarray  # cumulative board weight


def _check_sizes(n_pins: int, n_boards: int, n_edges: int, n_topics: int, n_locales: int) -> None:
    if min(n_pins, n_boards, n_edges, n_topics, n_locales) < 1:
        raise ValueError("every size must be >= 1")
    if n_edges > 0.5 * n_pins * n_boards:
        raise ValueError(f"{n_edges} edges is too dense for {n_pins} pins x {n_boards} boards")


def _nodes(
    rng: np.random.Generator,
    n_pins: int,
    n_boards: int,
    n_edges: int,
    n_topics: int,
    n_locales: int,
    home_share: float,
    mixed_board_share: float,
) -> _Nodes:
    pin_topic = rng.choice(n_topics, n_pins, p=_zipf(n_topics, 0.8))
    pin_locale = rng.choice(n_locales, n_pins, p=_zipf(n_locales, 1.2))
    # Pareto weights give power-law degrees; the cap keeps a pin's expected boards well below
    # the board count so deduplication does not flatten the tail.
    pin_weight = _capped(rng.pareto(1.6, n_pins) + 1.0, n_edges, 0.1 * n_boards)
    board_weight = _capped(rng.pareto(1.3, n_boards) + 1.0, n_edges, 0.05 * n_pins)

    pin_group = pin_topic * n_locales + pin_locale
    by_group = np.argsort(pin_group, kind="stable")
    cum = np.cumsum(pin_weight[by_group])
    groups_sorted = pin_group[by_group]
    n_groups = n_topics * n_locales
    group_lo = np.searchsorted(groups_sorted, np.arange(n_groups), side="left")
    group_hi = np.searchsorted(groups_sorted, np.arange(n_groups), side="right")
    cum_before = np.r_[0.0, cum][group_lo]

    # A board's home group is that of a weight-drawn pin, so no board has an empty group.
    board_group = pin_group[by_group[_draw(cum, rng.random(n_boards) * cum[-1])]]
    return _Nodes(
        n_topics=n_topics,
        n_locales=n_locales,
        pin_topic=pin_topic,
        pin_locale=pin_locale,
        by_group=by_group,
        cum=cum,
        group_lo=group_lo,
        group_hi=group_hi,
        cum_before=cum_before,
        group_mass=np.r_[0.0, cum][group_hi] - cum_before,
        board_group=board_group,
        board_home=np.where(rng.random(n_boards) < mixed_board_share, 0.3, home_share),
        board_cum=np.cumsum(board_weight),
    )


def _draw_codes(nodes: _Nodes, rng: np.random.Generator, draws: int) -> np.ndarray:
    """`draws` edges (with repeats) as codes `pin * n_boards + board`: a board by its weight,
    then a pin by weight from the board's group (with the board's home share) or from all."""
    board = _draw(nodes.board_cum, rng.random(draws) * nodes.board_cum[-1])
    group = nodes.board_group[board]
    at_home = rng.random(draws) < nodes.board_home[board]
    u = rng.random(draws)
    target = np.where(
        at_home, nodes.cum_before[group] + u * nodes.group_mass[group], u * nodes.cum[-1]
    )
    slot = _draw(nodes.cum, target)
    slot = np.where(at_home, np.clip(slot, nodes.group_lo[group], nodes.group_hi[group] - 1), slot)
    return nodes.by_group[slot].astype(np.int64) * nodes.board_cum.shape[0] + board


def _draws(need: int) -> int:
    """Edges drawn for `need` more distinct ones: repeats are collapsed afterwards."""
    return int(need * 1.15) + 1000


def _node_tables(nodes: _Nodes, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """The pins table (locale, topic, quality, created_at) and the boards table."""
    n_pins, n_boards = len(nodes.pin_topic), len(nodes.board_group)
    locales = np.array(locale_names(nodes.n_locales))
    topics = np.array(topic_names(nodes.n_topics))
    pins = pa.table(
        {
            "pin_id": PIN_ID_BASE + np.arange(n_pins, dtype=np.int64),
            "locale": pa.array(locales[nodes.pin_locale]).dictionary_encode(),
            "topic": pa.array(topics[nodes.pin_topic]).dictionary_encode(),
            "quality": rng.beta(2.0, 3.0, n_pins).astype(np.float32),
            "created_at": REFERENCE_EPOCH - rng.uniform(0, 2 * 365 * 86400, n_pins).round(),
        }
    )
    boards = pa.table(
        {
            "board_id": BOARD_ID_BASE + np.arange(n_boards, dtype=np.int64),
            "topic": pa.array(topics[nodes.board_group // nodes.n_locales]).dictionary_encode(),
            "locale": pa.array(locales[nodes.board_group % nodes.n_locales]).dictionary_encode(),
        }
    )
    return pins, boards


def _edge_table(codes: np.ndarray, n_boards: int) -> pa.Table:
    return pa.table(
        {"pin_id": PIN_ID_BASE + codes // n_boards, "board_id": BOARD_ID_BASE + codes % n_boards}
    )


def generate_graph_tables(
    n_pins: int,
    n_boards: int,
    n_edges: int,
    n_topics: int,
    n_locales: int,
    seed: int = 0,
    *,
    home_share: float = 0.85,
    mixed_board_share: float = 0.1,
) -> SyntheticTables:
    """Edges (unique, exactly `n_edges`, in (pin, board) order), pins (locale, topic,
    quality, created_at), boards, all in memory (`write_graph_partitions` streams them).

    A board draws a pin from its own (topic, locale) group with probability `home_share`
    (0.3 for the `mixed_board_share` of mixed boards), else from the whole graph; within
    either pool pins are drawn by their power-law weight.
    """
    _check_sizes(n_pins, n_boards, n_edges, n_topics, n_locales)
    rng = np.random.default_rng(seed)
    nodes = _nodes(
        rng, n_pins, n_boards, n_edges, n_topics, n_locales, home_share, mixed_board_share
    )
    codes = np.zeros(0, dtype=np.int64)
    for _ in range(_ROUNDS):
        need = n_edges - codes.shape[0]
        if need <= 0:
            break
        codes, _ = sorted_unique(np.r_[codes, _draw_codes(nodes, rng, _draws(need))])
    if codes.shape[0] < n_edges:
        raise ValueError(f"could not draw {n_edges} distinct edges; lower n_edges")
    codes = codes[np.sort(rng.choice(codes.shape[0], n_edges, replace=False))]
    pins, boards = _node_tables(nodes, rng)
    return SyntheticTables(edges=_edge_table(codes, n_boards), pins=pins, boards=boards)


def write_graph_partitions(
    directory: str | Path,
    n_pins: int,
    n_boards: int,
    n_edges: int,
    n_topics: int,
    n_locales: int,
    seed: int = 0,
    *,
    partitions: int = 16,
    chunk_draws: int = 1 << 22,
    home_share: float = 0.85,
    mixed_board_share: float = 0.1,
) -> dict[str, int]:
    """The synthetic graph written as Parquet under `directory` (`edges/part-NNNN.parquet`
    by pin range, `pins/`, `boards/`) in memory bounded by the nodes, `chunk_draws` and one
    partition's edges, so graphs far larger than memory can be made; returns edges per file.

    The same nodes (pins' and boards' attributes, weights) as `generate_graph_tables` with
    the same arguments and edges drawn from the same distribution by the same code, but not
    the same edges: here they are drawn `chunk_draws` at a time, spread over per-partition
    scratch files by pin range, collapsed per partition, and exactly `n_edges` of the
    distinct ones kept, uniformly (a hypergeometric share per partition). Deterministic in
    the seed and `partitions` and `chunk_draws`.
    """
    _check_sizes(n_pins, n_boards, n_edges, n_topics, n_locales)
    if partitions < 1 or partitions > n_pins or chunk_draws < 1:
        raise ValueError(f"partitions must be in 1..{n_pins} and chunk_draws >= 1")
    root = Path(directory)
    for role in ("edges", "pins", "boards"):
        (root / role).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    nodes = _nodes(
        rng, n_pins, n_boards, n_edges, n_topics, n_locales, home_share, mixed_board_share
    )
    edge_rng, table_rng = rng.spawn(2)
    pins, boards = _node_tables(nodes, table_rng)
    pq.write_table(pins, root / "pins" / "part-0000.parquet")
    pq.write_table(boards, root / "boards" / "part-0000.parquet")
    del pins, boards
    # Partition k holds pins [lo_k, lo_k+1): codes [lo_k * n_boards, lo_k+1 * n_boards).
    bounds = -(-np.arange(partitions + 1, dtype=np.int64) * n_pins // partitions) * n_boards
    scratch = [root / f".draws-{k:04d}" for k in range(partitions)]
    distinct = np.zeros(partitions, dtype=np.int64)
    try:
        for _ in range(_ROUNDS):
            need = n_edges - int(distinct.sum())
            if need <= 0:
                break
            left = _draws(need)
            while left:
                codes = np.sort(_draw_codes(nodes, edge_rng, min(left, chunk_draws)))
                left -= codes.shape[0]
                cuts = np.searchsorted(codes, bounds)
                for k, path in enumerate(scratch):
                    with open(path, "ab") as f:
                        f.write(codes[cuts[k] : cuts[k + 1]].tobytes())
            for k, path in enumerate(scratch):
                codes, _ = sorted_unique(np.fromfile(path, dtype=np.int64))
                codes.tofile(path)
                distinct[k] = codes.shape[0]
        total = int(distinct.sum())
        if total < n_edges:
            raise ValueError(f"could not draw {n_edges} distinct edges; lower n_edges")
        written: dict[str, int] = {}
        need = n_edges
        for k, path in enumerate(scratch):
            total -= int(distinct[k])
            take = int(edge_rng.hypergeometric(distinct[k], total, need)) if need else 0
            need -= take
            codes = np.fromfile(path, dtype=np.int64)
            codes = codes[np.sort(edge_rng.choice(codes.shape[0], take, replace=False))]
            name = f"part-{k:04d}.parquet"
            pq.write_table(_edge_table(codes, n_boards), root / "edges" / name)
            written[name] = take
            path.unlink()
        return written
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)


def build_synthetic(
    out: str | Path, preset: str, options: PruneOptions | None = None, *, replace: bool = False
) -> dict[str, Any]:
    """Generate a preset's tables and build them into `out`; returns the manifest."""
    params = _preset(preset)
    tables = generate_graph_tables(**params)
    return build_graph(
        out,
        tables.edges,
        tables.pins,
        tables.boards,
        options=options,
        source=_source(preset),
        replace=replace,
    )


def ensure_graph(preset: str, cache_dir: str | Path = ".cache/graphs") -> Path:
    """Path of a built preset graph, building it once; rebuilt if its manifest is stale."""
    _preset(preset)
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = root / preset
    # Several test or benchmark processes may ask at once: one builds, the others wait.
    with open(root / f"{preset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(out, preset):
            build_synthetic(out, preset, replace=True)
    return out


def _is_current(out: Path, preset: str) -> bool:
    try:
        manifest = read_manifest(out)
    except DataError:
        return False
    if manifest["build"].get("source") != _source(preset):
        return False
    return all((out / f"{name}.npy").is_file() for name in manifest["checksums"])


def _preset(preset: str) -> dict[str, int]:
    if preset not in PRESETS:
        raise DataError(f"unknown graph preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _source(preset: str) -> dict[str, Any]:
    return {
        "generator": "walkrank.graph.synthetic",
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        **PRESETS[preset],
    }


def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def _capped(weight: np.ndarray, n_edges: int, max_expected_degree: float) -> np.ndarray:
    cap = max_expected_degree * weight.sum() / n_edges
    return np.minimum(weight, max(cap, 1.0))


def _draw(cum: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each target's slot in the cumulative weights `cum`, searched in sorted order: a search
    of random targets over millions of weights misses the cache at every step (13x slower
    measured here, 10M weights and 2M targets)."""
    order = np.argsort(targets)
    slots = np.empty(targets.shape[0], dtype=np.intp)
    slots[order] = np.searchsorted(cum, targets[order], side="right")
    return np.minimum(slots, cum.shape[0] - 1)
