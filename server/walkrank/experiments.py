"""Exploration traffic and online experiments: which ranker serves a request, and how.

A tenant's `exploration` section sends a small share of its traffic (sticky per user id, or per
request) to a ranker that neither the serving model nor its successor controls: visit count,
or `shuffle_top`, a uniformly random choice of the returned pins among the top `top`
candidates by visit count. Every logged candidate carries its propensity (the probability that
the request's policy returned it), so offline evaluation can weigh labels by it
(`walkrank.training.estimators`). The `experiments` section splits the rest of the traffic
across model versions by a hash of the user id, and may score a `shadow` model on every live
request: its scores are logged, never served.

Assignment is a pure function of the tenant's settings and the user (or request) id, so a
user stays in one arm across requests, servers and replicas, and a reload that changes the
shares moves only the users whose bucket crosses a boundary.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from walkrank.ranking.scorer import Scorer
    from walkrank.serving.pipeline import RecommendInput
    from walkrank.serving.tenant_table import TenantRuntime
    from walkrank.tenants import CandidatesConfig, _Fields

EXPLORE_ARM = "explore"
DEFAULT_ARM = "default"
"""The arm of a request outside exploration and without experiments."""
SHUFFLE_TOP = "shuffle_top"
VISIT_COUNT = "visit_count"
EXPLORATION_POLICIES = (VISIT_COUNT, SHUFFLE_TOP)
STICKY = ("user", "request")
MAX_EXPLORATION_SHARE = 0.5
MAX_ARMS = 16
_ARM_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RESERVED_ARMS = (EXPLORE_ARM, DEFAULT_ARM)
_SHARE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ExplorationConfig:
    """`exploration`: `share` of the traffic served by `policy`, sticky by user id (requests
    without one are not explored), or by request id with `sticky: request`."""

    share: float
    policy: Literal["visit_count", "shuffle_top"]
    top: int  # shuffle_top: the returned pins are drawn from this many best by visit count
    sticky: Literal["user", "request"]
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ArmConfig:
    """One experiment arm: `share` of the non-exploration traffic served by `model` (a
    registry version number, `current` (what `CURRENT` names) or `visit_count`)."""

    name: str
    model: int | Literal["current", "visit_count"]
    share: float


@dataclass(frozen=True)
class ExperimentsConfig:
    arms: tuple[ArmConfig, ...]
    shadow: int | None  # a version scored and logged on every request, never served
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "arms": [asdict(a) for a in self.arms],
            "shadow": self.shadow,
            "seed": self.seed,
        }


# --- tenant file sections ----------------------------------------------------------------------


def parse_exploration(section: _Fields, candidates: CandidatesConfig) -> ExplorationConfig:
    """The `exploration` section (all optional; share 0 turns exploration off)."""
    share = section.number("share", 0.0, low=0.0, high=MAX_EXPLORATION_SHARE)
    policy = section.choice("policy", EXPLORATION_POLICIES, SHUFFLE_TOP)
    top = section.integer("top", candidates.generate, low=1, high=candidates.generate)
    if top < candidates.max_return:
        section.fail(
            "top",
            f"{top} is below candidates.max_return ({candidates.max_return}); shuffle_top "
            "draws every returned pin from the top candidates",
        )
    sticky = section.choice("sticky", STICKY, "user")
    seed = section.integer("seed", 0, low=0, high=2**63 - 1)
    section.done()
    return ExplorationConfig(share, policy, top, sticky, seed)


def parse_experiments(section: _Fields) -> ExperimentsConfig | None:
    """The `experiments` section: arms whose shares add up to 1, an optional shadow model."""
    from walkrank.tenants import _Fields

    if not section.raw:
        section.done()
        return None
    raw_arms = section.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        section.fail("arms", "must be a non-empty list of {name, model, share}")
    if len(raw_arms) > MAX_ARMS:
        section.fail("arms", f"{len(raw_arms)} arms; at most {MAX_ARMS}")
    arms: list[ArmConfig] = []
    for i, raw in enumerate(raw_arms):
        item = _Fields(section.file, section.path(f"arms[{i}]"), raw)
        name = item.text("name")
        if not _ARM_NAME.fullmatch(name) or name in _RESERVED_ARMS:
            item.fail(
                "name",
                f"must be 1-32 characters of a-z, 0-9 and _ (starting with a letter), "
                f"not {' or '.join(_RESERVED_ARMS)}; got {name!r}",
            )
        if any(a.name == name for a in arms):
            item.fail("name", f"arm {name!r} is named twice")
        model = item.get("model")
        if model not in ("current", VISIT_COUNT):
            model = item.integer("model", low=1)
        share = item.number("share", low=0.0, high=1.0)
        item.done()
        arms.append(ArmConfig(name, model, share))
    total = sum(a.share for a in arms)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        section.fail("arms", f"shares must add up to 1, got {total:g}")
    shadow = section.get("shadow", None)
    if shadow is not None:
        shadow = section.integer("shadow", low=1)
    seed = section.integer("seed", 0, low=0, high=2**63 - 1)
    section.done()
    return ExperimentsConfig(tuple(arms), shadow, seed)


# --- assignment --------------------------------------------------------------------------------


def bucket(salt: str, key: str) -> float:
    """A uniform number in [0, 1) from a hash of (salt, key): the same for every server."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_arm(
    tenant: str,
    exploration: ExplorationConfig | None,
    experiments: ExperimentsConfig | None,
    user_id: str,
    request_id: str,
) -> str:
    """The arm of one request: `explore`, an experiment arm, or `default`.

    Exploration takes its share first (its own hash of the user id, or of the request id with
    `sticky: request`), experiments split the rest by a hash of the user id (the request id
    when there is none)."""
    if exploration is not None and exploration.share > 0:
        # Sticky by user: a request without a user id is never explored (its id is often
        # made up per call, which would make its answer a coin toss).
        key = user_id if exploration.sticky == "user" else request_id
        if key and bucket(f"explore/{tenant}/{exploration.seed}", key) < exploration.share:
            return EXPLORE_ARM
    if experiments is None:
        return DEFAULT_ARM
    point = bucket(f"arm/{tenant}/{experiments.seed}", user_id or request_id)
    edge = 0.0
    for arm in experiments.arms:
        edge += arm.share
        if point < edge:
            return arm.name
    return experiments.arms[-1].name  # the shares' rounding left a sliver at the top


def request_arm(runtime: TenantRuntime, request: RecommendInput) -> str:
    """The arm of one request of the tenant (its metrics' label, also for a failed one)."""
    config = runtime.config
    return assign_arm(
        config.name, config.exploration, config.experiments, request.user_id, request.request_id
    )


# --- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmModel:
    """What orders one arm's candidates: a loaded model, or visit count (scorer None)."""

    version: str  # "vN" or "visit_count"
    scorer: Scorer | None


@dataclass(frozen=True)
class ExperimentRuntime:
    arms: Mapping[str, ArmModel]
    shadow: ArmModel | None


def build_experiment(
    experiments: ExperimentsConfig | None,
    current: ArmModel,
    load: Callable[[int], ArmModel],
) -> ExperimentRuntime | None:
    """Each arm's (and the shadow's) model; `load(version)` raises when one cannot serve."""
    if experiments is None:
        return None
    loaded: dict[int, ArmModel] = {}

    def model(ref: int | str) -> ArmModel:
        if ref == "current":
            return current
        if ref == VISIT_COUNT:
            return ArmModel(VISIT_COUNT, None)
        assert isinstance(ref, int)
        if ref not in loaded:
            loaded[ref] = load(ref)
        return loaded[ref]

    arms = {arm.name: model(arm.model) for arm in experiments.arms}
    shadow = None if experiments.shadow is None else model(experiments.shadow)
    return ExperimentRuntime(arms, shadow)


@dataclass(frozen=True)
class Ranked:
    """How one request's candidates were ordered and which of them were returned."""

    arm: str
    model_version: str  # the ranker that ordered the returned pins ("vN", visit_count, ...)
    scores: np.ndarray  # float32 per candidate: the ordering ranker's scores
    order: np.ndarray  # the served order over all candidates; the first num_results return
    propensity: np.ndarray  # float32 per candidate: the probability it was returned
    shadow_version: str | None = None
    shadow_scores: np.ndarray | None = None


def rank(
    runtime: TenantRuntime,
    features: np.ndarray,
    walk_scores: np.ndarray,
    num_results: int,
    *,
    user_id: str,
    request_id: str,
    request_seed: int,
) -> Ranked:
    """Score and order one request's candidates as its arm says (see the module doc)."""
    config = runtime.config
    arm = assign_arm(config.name, config.exploration, config.experiments, user_id, request_id)
    experiment = runtime.experiment
    n = len(walk_scores)
    if arm == EXPLORE_ARM:
        model = ArmModel(VISIT_COUNT, None)
    elif arm == DEFAULT_ARM or experiment is None:
        model = ArmModel(runtime.model_version, runtime.scorer)
    else:
        model = experiment.arms[arm]
    if model.scorer is not None and n:
        scores = model.scorer.score(features)
    else:
        scores = np.asarray(walk_scores, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")
    propensity = np.zeros(n, dtype=np.float32)
    version = model.version
    exploration = config.exploration
    if arm == EXPLORE_ARM and exploration is not None and exploration.policy == SHUFFLE_TOP:
        version = SHUFFLE_TOP
        top = min(exploration.top, n)
        returned = min(num_results, top)
        rng = np.random.default_rng((exploration.seed, request_seed))
        chosen = order[:top][rng.permutation(top)[:returned]]
        others = order[:top][~np.isin(order[:top], chosen)]  # in visit-count order
        order = np.concatenate([chosen, others, order[top:]])
        propensity[order[:top]] = returned / top if top else 0.0
    else:
        propensity[order[:num_results]] = 1.0
    shadow_version, shadow_scores = None, None
    if experiment is not None and experiment.shadow is not None:
        shadow = experiment.shadow
        shadow_version = shadow.version
        shadow_scores = (
            shadow.scorer.score(features)
            if shadow.scorer is not None and n
            else np.asarray(walk_scores, dtype=np.float32)
        )
    return Ranked(arm, version, scores, order, propensity, shadow_version, shadow_scores)
