"""Seeded synthetic pin–board graphs for tests, benchmarks and the demo.

Shape chosen to make Pixie's mechanisms matter: power-law pin and board degrees (Pareto
weights), each board centred on one (topic, locale) group and drawing most of its pins from
that group (so boards are mostly one topic and their pins mostly share a locale: locale-biased
walks change results), plus a minority of mixed boards that entropy pruning should drop.
Graphs are built once into `.cache/graphs/<preset>` (outside git) and reused while the
manifest records the same generator parameters.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from walkrank.errors import DataError
from walkrank.graph.build import PruneOptions, build_graph, sorted_unique
from walkrank.graph.store import read_manifest

#: Bump when the generator's output changes, so cached graphs are rebuilt.
GENERATOR_VERSION = 2

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
    """Edges (unique, exactly `n_edges`), pins (locale, topic, quality, created_at), boards.

    A board draws a pin from its own (topic, locale) group with probability `home_share`
    (0.3 for the `mixed_board_share` of mixed boards), else from the whole graph; within
    either pool pins are drawn by their power-law weight.
    """
    if min(n_pins, n_boards, n_edges, n_topics, n_locales) < 1:
        raise ValueError("every size must be >= 1")
    if n_edges > 0.5 * n_pins * n_boards:
        raise ValueError(f"{n_edges} edges is too dense for {n_pins} pins x {n_boards} boards")
    rng = np.random.default_rng(seed)

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
    group_mass = np.r_[0.0, cum][group_hi] - cum_before

    # A board's home group is that of a weight-drawn pin, so no board has an empty group.
    board_group = pin_group[by_group[_draw(cum, rng.random(n_boards) * cum[-1])]]
    board_home = np.where(rng.random(n_boards) < mixed_board_share, 0.3, home_share)
    board_cum = np.cumsum(board_weight)

    codes = np.zeros(0, dtype=np.int64)
    for _ in range(20):
        need = n_edges - codes.shape[0]
        if need <= 0:
            break
        draws = int(need * 1.15) + 1000
        board = _draw(board_cum, rng.random(draws) * board_cum[-1])
        group = board_group[board]
        at_home = rng.random(draws) < board_home[board]
        u = rng.random(draws)
        target = np.where(at_home, cum_before[group] + u * group_mass[group], u * cum[-1])
        slot = _draw(cum, target)
        slot = np.where(at_home, np.clip(slot, group_lo[group], group_hi[group] - 1), slot)
        pin = by_group[slot]
        codes, _ = sorted_unique(np.r_[codes, pin.astype(np.int64) * n_boards + board])
    if codes.shape[0] < n_edges:
        raise ValueError(f"could not draw {n_edges} distinct edges; lower n_edges")
    keep = np.sort(rng.choice(codes.shape[0], n_edges, replace=False))
    codes = codes[keep]
    edge_pin, edge_board = codes // n_boards, codes % n_boards

    locales, topics = np.array(locale_names(n_locales)), np.array(topic_names(n_topics))
    pin_ids = PIN_ID_BASE + np.arange(n_pins, dtype=np.int64)
    board_ids = BOARD_ID_BASE + np.arange(n_boards, dtype=np.int64)
    edges = pa.table({"pin_id": pin_ids[edge_pin], "board_id": board_ids[edge_board]})
    pins = pa.table(
        {
            "pin_id": pin_ids,
            "locale": pa.array(locales[pin_locale]).dictionary_encode(),
            "topic": pa.array(topics[pin_topic]).dictionary_encode(),
            "quality": rng.beta(2.0, 3.0, n_pins).astype(np.float32),
            "created_at": REFERENCE_EPOCH - rng.uniform(0, 2 * 365 * 86400, n_pins).round(),
        }
    )
    boards = pa.table(
        {
            "board_id": board_ids,
            "topic": pa.array(topics[board_group // n_locales]).dictionary_encode(),
            "locale": pa.array(locales[board_group % n_locales]).dictionary_encode(),
        }
    )
    return SyntheticTables(edges=edges, pins=pins, boards=boards)


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
    return np.minimum(np.searchsorted(cum, targets, side="right"), cum.shape[0] - 1)
