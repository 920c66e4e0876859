"""Request data drawn from a graph, shaped like each shipped tenant's real traffic.

- homefeed: 5 recent pins, weighted like the tenant's query builder would weight them (action
  weight x recency decay with its 72 h half-life), most recent first.
- related_pins: the one pin being viewed.
- email: RecommendBatch calls of many users, each with a few pins of the past week.

A user's recent pins are not independent: after the first (drawn by degree, as engagement
favours popular pins) each next pin is, with probability `NEIGHBOUR_SHARE`, a pin of a board
of the previous one, the way a session wanders. The user's locale and interests are those of
their pins. Everything is seeded; messages are proto JSON with the proto's field names, as
ghz and `json_format` both read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from walkrank.graph.store import GraphStore

if TYPE_CHECKING:  # the pipeline (numba, onnxruntime) loads only for read_pipeline_inputs
    from walkrank.serving.pipeline import RecommendInput

NEIGHBOUR_SHARE = 0.6
#: (action, weight, share of actions): homefeed.yaml's action weights; a save is rarer than a view.
ACTIONS = (("save", 1.0, 0.15), ("closeup", 0.6, 0.25), ("click", 0.5, 0.25), ("view", 0.2, 0.35))
HOMEFEED_HALF_LIFE_H = 72.0
EMAIL_HALF_LIFE_H = 168.0


class TrafficDrawer:
    """Draws users and their recent pins from one graph (dense ids inside, external outside)."""

    def __init__(self, graph: GraphStore, seed: int = 0) -> None:
        self.graph = graph
        self.rng = np.random.default_rng(seed)
        degree = np.asarray(graph.pin_degree(), dtype=np.float64)
        self._cum_degree = np.cumsum(degree)
        self._users = 0

    def _popular_pin(self) -> int:
        return int(
            np.searchsorted(
                self._cum_degree, self.rng.random() * self._cum_degree[-1], side="right"
            )
        )

    def _neighbour(self, pin: int) -> int:
        boards = self.graph.boards_of(pin)
        if len(boards) == 0:
            return self._popular_pin()
        pins = self.graph.pins_of(int(boards[self.rng.integers(len(boards))]))
        return int(pins[self.rng.integers(len(pins))])

    def session_pins(self, n: int) -> list[int]:
        pins = [self._popular_pin()]
        while len(pins) < n:
            previous = pins[-1]
            pins.append(
                self._neighbour(previous)
                if self.rng.random() < NEIGHBOUR_SHARE
                else self._popular_pin()
            )
        return pins

    def _weights(self, n: int, half_life_h: float, mean_age_h: float) -> list[float]:
        ages = np.sort(self.rng.exponential(mean_age_h, n))  # most recent first
        shares = np.array([share for _, _, share in ACTIONS])
        actions = self.rng.choice(len(ACTIONS), n, p=shares / shares.sum())
        weights = np.array([ACTIONS[a][1] for a in actions]) * 0.5 ** (ages / half_life_h)
        return [round(float(w), 4) for w in weights]

    def user(self, pins: list[int]) -> dict[str, Any]:
        graph = self.graph
        self._users += 1
        user: dict[str, Any] = {"id": f"user-{self._users}"}
        locale = int(graph.pin_locale[pins[0]])
        if locale < len(graph.locales):
            user["locale"] = graph.locales[locale]
        topics = [int(graph.pin_topic[p]) for p in pins]
        interests = list(dict.fromkeys(graph.topics[t] for t in topics if t < len(graph.topics)))
        if interests:
            user["interests"] = interests[:3]
        return user

    def query_pins(self, pins: list[int], weights: list[float] | None) -> list[dict[str, Any]]:
        external = [str(p) for p in self.graph.pin_external(np.asarray(pins)).tolist()]
        if weights is None:
            return [{"pin_id": pin} for pin in external]
        return [{"pin_id": pin, "weight": w} for pin, w in zip(external, weights, strict=True)]

    def homefeed(self, n_pins: int = 5) -> dict[str, Any]:
        pins = self.session_pins(n_pins)
        return {
            "tenant": "homefeed",
            "user": self.user(pins),
            "query_pins": self.query_pins(pins, self._weights(n_pins, HOMEFEED_HALF_LIFE_H, 24.0)),
        }

    def related_pins(self) -> dict[str, Any]:
        pins = self.session_pins(1)
        return {
            "tenant": "related_pins",
            "user": self.user(pins),
            "query_pins": self.query_pins(pins, None),
        }

    def email_batch(self, users: int, pins_per_user: int = 8) -> dict[str, Any]:
        batch = []
        for _ in range(users):
            pins = self.session_pins(pins_per_user)
            batch.append(
                {
                    "user": self.user(pins),
                    "query_pins": self.query_pins(
                        pins, self._weights(pins_per_user, EMAIL_HALF_LIFE_H, 72.0)
                    ),
                }
            )
        return {"tenant": "email", "users": batch}


def draw_requests(
    graph: GraphStore, tenant: str, n: int, seed: int = 0, batch_users: int = 200
) -> list[dict[str, Any]]:
    """`n` call messages for `tenant` (for email: `n` batches of `batch_users` users)."""
    drawer = TrafficDrawer(graph, seed)
    if tenant == "homefeed":
        return [drawer.homefeed() for _ in range(n)]
    if tenant == "related_pins":
        return [drawer.related_pins() for _ in range(n)]
    if tenant == "email":
        return [drawer.email_batch(batch_users) for _ in range(n)]
    raise ValueError(
        f"no traffic model for tenant {tenant!r}; choose homefeed, related_pins or email"
    )


def write_requests(path: Path, messages: list[dict[str, Any]]) -> None:
    """A JSON array with one message per line: compact, and still diffs line by line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(m, separators=(",", ":")) for m in messages)
    path.write_text(f"[\n{lines}\n]\n")


def read_pipeline_inputs(
    path: Path, tenant: str, prefix: str, calls: int | None = None
) -> list[RecommendInput]:
    """The first `calls` Recommend messages of a `write_requests` file as the pipeline's own
    inputs, to time the pipeline without gRPC on the requests a load test sends."""
    from walkrank.serving.pipeline import RecommendInput

    messages = json.loads(path.read_text())[:calls]
    return [
        RecommendInput(
            tenant=tenant,
            request_id=f"{prefix}-{i}",
            query_pins=tuple(q["pin_id"] for q in m["query_pins"]),
            query_weights=tuple(q["weight"] for q in m["query_pins"]),
            locale=m["user"].get("locale", ""),
            interests=tuple(m["user"].get("interests", [])),
        )
        for i, m in enumerate(messages)
    ]


def unknown_query_pins(graph: GraphStore, messages: list[dict[str, Any]]) -> tuple[int, int]:
    """(unknown, total) query pins of request messages against `graph` (stale data check)."""
    ids = [
        q["pin_id"]
        for m in messages
        for u in (m.get("users") or [m])
        for q in u.get("query_pins", [])
    ]
    if not ids:
        return 0, 0
    return int((graph.pin_index(ids) < 0).sum()), len(ids)
