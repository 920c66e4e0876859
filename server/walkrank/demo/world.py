"""The demo world: a seeded pin-board graph, its users, and the client's hidden full ranker.

Everything is generated from one seed, so two runs of `walkrank demo` agree. The truth that
the lightweight ranker must discover is `engagement_logit`: users engage with good pins on
their topics and in their language. Visit count sees only graph proximity, which is why a
model trained on logged features can beat it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import walkrank
from walkrank.errors import DataError
from walkrank.graph.build import build_graph
from walkrank.graph.store import GraphStore, read_manifest
from walkrank.graph.synthetic import generate_graph_tables
from walkrank.serving.config import ServerConfig

DEMO_HOME = Path("var/demo")


@dataclass(frozen=True)
class DemoSize:
    """How big the world is and how much traffic each phase sends."""

    n_pins: int
    n_boards: int
    n_edges: int
    n_topics: int
    n_locales: int
    n_users: int
    history: int
    homefeed_requests: int
    related_requests: int
    email_users: int


SIZES = {
    # Sized so `walkrank demo` finishes in about two minutes on a 2-core machine.
    "full": DemoSize(
        n_pins=60_000,
        n_boards=8_000,
        n_edges=600_000,
        n_topics=12,
        n_locales=4,
        n_users=3_000,
        history=12,
        homefeed_requests=700,
        related_requests=900,
        email_users=1_200,
    ),
    # The CI size: the same world, smaller, for the end-to-end test.
    "ci": DemoSize(
        n_pins=8_000,
        n_boards=1_500,
        n_edges=80_000,
        n_topics=8,
        n_locales=3,
        n_users=600,
        history=8,
        homefeed_requests=220,
        related_requests=260,
        email_users=360,
    ),
}


@dataclass(frozen=True)
class DemoWorld:
    graph: GraphStore
    size: DemoSize
    user_locale: np.ndarray  # int32 locale code per user
    user_interests: np.ndarray  # int32 (n_users, 3) topic codes
    user_history: np.ndarray  # int32 (n_users, history) dense pins, most recent first
    seed: int

    def user_locale_name(self, user: int) -> str:
        return self.graph.locales[int(self.user_locale[user])]

    def user_interest_names(self, user: int) -> list[str]:
        return [self.graph.topics[int(t)] for t in self.user_interests[user]]

    def engagement_logit(self, user: int, pins: np.ndarray) -> np.ndarray:
        """The hidden truth: log-odds that `user` acts on each of `pins` once shown."""
        graph = self.graph
        quality = np.nan_to_num(np.asarray(graph.pin_quality[pins], dtype=np.float64), nan=0.3)
        on_topic = np.isin(graph.pin_topic[pins], self.user_interests[user])
        local = graph.pin_locale[pins] == self.user_locale[user]
        return -2.6 + 4.0 * (quality - 0.4) + 1.6 * on_topic + 1.3 * local


def ensure_world_graph(root: Path, size: DemoSize, seed: int = 7) -> Path:
    """Build the world's graph under `root/graph` once; later runs reuse it unless it was
    built by a WalkRank with another graph format."""
    graph_dir = root / "graph"
    try:
        read_manifest(graph_dir)
    except DataError:
        tables = generate_graph_tables(
            size.n_pins, size.n_boards, size.n_edges, size.n_topics, size.n_locales, seed=seed
        )
        build_graph(graph_dir, tables.edges, tables.pins, tables.boards, replace=True)
    return graph_dir


def generate_world(root: Path, size: DemoSize, seed: int = 7) -> DemoWorld:
    """The world's graph (built once) and its users, drawn from `seed`."""
    graph = GraphStore.load(ensure_world_graph(root, size, seed))
    rng = np.random.default_rng(seed + 1)
    n_topics, n_locales = len(graph.topics), len(graph.locales)
    locale_share = np.bincount(
        graph.pin_locale[graph.pin_locale < n_locales], minlength=n_locales
    ).astype(np.float64)
    user_locale = rng.choice(n_locales, size.n_users, p=locale_share / locale_share.sum())
    topic_weight = 1.0 / np.arange(1, n_topics + 1) ** 0.7
    user_interests = np.stack(
        [
            rng.choice(n_topics, 3, replace=False, p=topic_weight / topic_weight.sum())
            for _ in range(size.n_users)
        ]
    ).astype(np.int32)
    # A user's history: pins they saved, mostly on their topics and in their language,
    # only those with at least one board (so walks can start from them).
    degree = np.diff(np.asarray(graph.pin_offsets))
    walkable = np.flatnonzero(degree > 0)
    history = np.empty((size.n_users, size.history), dtype=np.int32)
    for user in range(size.n_users):
        affinity = (
            1.0
            + 4.0 * np.isin(graph.pin_topic[walkable], user_interests[user])
            + 2.0 * (graph.pin_locale[walkable] == user_locale[user])
        )
        history[user] = rng.choice(
            walkable, size.history, replace=False, p=affinity / affinity.sum()
        )
    return DemoWorld(
        graph=graph,
        size=size,
        user_locale=user_locale.astype(np.int32),
        user_interests=user_interests,
        user_history=history,
        seed=seed,
    )


def shipped_tenants_dir() -> Path:
    """The repository's tenants/ (the shipped home feed, related pins and email tenants)."""
    return Path(walkrank.__file__).resolve().parents[2] / "tenants"


def demo_server_config(root: Path = DEMO_HOME, size: str = "full") -> ServerConfig:
    """The server config `walkrank serve` uses without a config file: the demo world."""
    root = root.resolve()
    return ServerConfig(
        graph=ensure_world_graph(root, SIZES[size]),
        tenants_dir=shipped_tenants_dir(),
        models_dir=root / "models",
        logs_dir=root / "logs",
    )
