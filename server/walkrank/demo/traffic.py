"""The demo's clients: each surface asks WalkRank, its full ranker impresses a few, users act.

This is the part of the funnel that is not WalkRank's (the full ranker and the users), so it
talks to the server only through the public client, exactly as a real surface would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from walkrank.demo.world import DemoWorld
from walkrank_client import UserQuery, WalkRankClient

# How many pins each surface's full ranker shows, out of WalkRank's candidates plus as many
# from other candidate generators (the competition that makes funnel efficiency measurable).
IMPRESSIONS = {"homefeed": 25, "related_pins": 10, "email": 5}
EMAIL_BATCH = 60
FULL_RANKER_NOISE = 0.8


@dataclass(frozen=True)
class Shown:
    """What the client did with one response: which returned pins it showed (indices into
    them), which of those the user acted on, and which they also saved."""

    shown: np.ndarray
    acts: np.ndarray
    saves: np.ndarray
    full_score: np.ndarray  # the full ranker's score of every returned pin


def full_ranker(
    world: DemoWorld, tenant: str, user: int, returned: np.ndarray, rng: np.random.Generator
) -> Shown:
    """The client's side for one response (dense pins `returned`): its full ranker shows the
    best of them and as many pins of other generators; the user acts on what is shown."""
    degree = np.diff(np.asarray(world.graph.pin_offsets)).astype(np.float64)
    walkable = np.flatnonzero(degree > 0)
    others = rng.choice(walkable, len(returned), p=degree[walkable] / degree[walkable].sum())
    pool = np.concatenate([returned, others])
    logit = world.engagement_logit(user, pool)
    full_score = logit + rng.normal(0.0, FULL_RANKER_NOISE, len(pool))
    shown = np.argsort(-full_score)[: IMPRESSIONS[tenant]]
    ours = shown[shown < len(returned)]
    acts = rng.random(len(ours)) < 1.0 / (1.0 + np.exp(-logit[ours]))
    saves = acts & (rng.random(len(ours)) < 0.5)
    return Shown(ours, acts, saves, full_score[: len(returned)])


@dataclass
class SurfaceStats:
    """What one surface saw in one phase."""

    returned: int = 0
    impressed: int = 0
    actions: int = 0
    local: int = 0
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        returned = max(self.returned, 1)
        latency = np.asarray(self.latency_ms or [0.0])
        return {
            "funnel_efficiency": self.impressed / returned,
            "actions_per_1000": 1000.0 * self.actions / returned,
            "local_share": self.local / returned,
            "p50_ms": float(np.percentile(latency, 50)),
            "p99_ms": float(np.percentile(latency, 99)),
            "requests": len(self.latency_ms),
        }


class Surface:
    """One client surface's side of the funnel: query, full ranker, users, event reports."""

    def __init__(
        self,
        world: DemoWorld,
        client: WalkRankClient,
        tenant: str,
        rng: np.random.Generator,
        phase: str,
    ) -> None:
        self.world = world
        self.phase = phase
        self._requests = 0
        self.client = client
        self.tenant = tenant
        self.rng = rng
        self.stats = SurfaceStats()
        # Exploration traffic (RecommendResponse.arm "explore"), apart: the phase's own
        # ranker is measured without it, and what exploring costs is measured on it.
        self.explored = SurfaceStats()

    def request_id(self) -> str:
        """Deterministic request ids make the walks (seeded by request id) reproducible."""
        self._requests += 1
        return f"{self.tenant}-{self.phase}-{self._requests}"

    def user_query(self, user: int, n_pins: int) -> UserQuery:
        graph = self.world.graph
        history = self.world.user_history[user][:n_pins]
        # Recent pins count more: the home feed's recency weighting, one step per position.
        weights = (0.7 ** np.arange(len(history))).tolist()
        return UserQuery(
            pins=graph.pin_external(history).tolist(),
            weights=weights,
            user_id=f"user{user}",
            locale=self.world.user_locale_name(user),
            interests=self.world.user_interest_names(user),
            request_id=self.request_id(),
        )

    def funnel(self, user: int, response: object) -> list[dict[str, object]]:
        """The full ranker picks what is shown; the user acts on it; returns the events."""
        world, rng = self.world, self.rng
        graph = world.graph
        candidates = response.candidates  # type: ignore[attr-defined]
        explored = response.arm == "explore"  # type: ignore[attr-defined]
        stats = self.explored if explored else self.stats
        stats.latency_ms.append(response.timing.total_ms)  # type: ignore[attr-defined]
        if not candidates:
            return []
        pin_ids = [c.pin_id for c in candidates]
        returned = graph.pin_index(pin_ids)
        client = full_ranker(world, self.tenant, user, returned, rng)
        ours, acts, saves, full_score = client.shown, client.acts, client.saves, client.full_score
        hides = ~acts & (rng.random(len(ours)) < 0.05)
        stats.returned += len(returned)
        stats.impressed += len(ours)
        stats.actions += int(acts.sum() + saves.sum())
        stats.local += int((graph.pin_locale[returned] == world.user_locale[user]).sum())
        request_id = response.request_id  # type: ignore[attr-defined]
        events: list[dict[str, object]] = []
        for i, act, save, hide in zip(
            ours.tolist(), acts.tolist(), saves.tolist(), hides.tolist(), strict=True
        ):
            pin = pin_ids[i]
            events.append(
                {
                    "request_id": request_id,
                    "pin_id": pin,
                    "event": "impression",
                    "score": float(1.0 / (1.0 + np.exp(-full_score[i]))),
                }
            )
            if act:
                events.append({"request_id": request_id, "pin_id": pin, "event": "click"})
            if save:
                events.append({"request_id": request_id, "pin_id": pin, "event": "save"})
            if hide:
                events.append({"request_id": request_id, "pin_id": pin, "event": "hide"})
        return events


def run_phase(
    world: DemoWorld, client: WalkRankClient, phase: str, seed: int
) -> dict[str, Surface]:
    """One phase of traffic on all three surfaces; returns each surface (its stats)."""
    rng = np.random.default_rng(seed)
    size = world.size
    homefeed = Surface(world, client, "homefeed", rng, phase)
    for user in rng.integers(0, size.n_users, size.homefeed_requests).tolist():
        query = homefeed.user_query(user, 5)
        response = client.recommend(
            "homefeed",
            query.pins,
            weights=query.weights,
            user_id=query.user_id,
            locale=query.locale,
            interests=query.interests,
            request_id=query.request_id,
        )
        client.report_events("homefeed", homefeed.funnel(user, response))

    related = Surface(world, client, "related_pins", rng, phase)
    for user in rng.integers(0, size.n_users, size.related_requests).tolist():
        viewed = int(world.user_history[user][rng.integers(0, size.history)])
        response = client.recommend(
            "related_pins",
            [world.graph.pin_external([viewed])[0].item()],
            user_id=f"user{user}",
            locale=world.user_locale_name(user),
            interests=world.user_interest_names(user),
            request_id=related.request_id(),
        )
        client.report_events("related_pins", related.funnel(user, response))

    email = Surface(world, client, "email", rng, phase)
    users = rng.integers(0, size.n_users, size.email_users).tolist()
    for start in range(0, len(users), EMAIL_BATCH):
        chunk = users[start : start + EMAIL_BATCH]
        responses = client.recommend_batch("email", [email.user_query(u, 3) for u in chunk])
        events = [
            e
            for user, response in zip(chunk, responses, strict=True)
            for e in email.funnel(user, response)
        ]
        client.report_events("email", events)
    return {"homefeed": homefeed, "related_pins": related, "email": email}
