"""Tenant configuration: a tenant is data, its YAML file parsed once into a frozen object.

Every field is checked when the file is read, so a request never meets a bad setting. Errors
are ConfigError naming the file and the dotted field path, for example
`tenants/email.yaml: walk.restart_probability: must be in (0, 1], got 1.5`. Unknown keys are
errors (a typo must not silently fall back to a default), and so are duplicate keys, which
plain YAML loaders accept by keeping the last one. docs/tenants.md documents every field.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import yaml

from walkrank.errors import ConfigError
from walkrank.ranking.fit import OBJECTIVES

if TYPE_CHECKING:
    from walkrank.experiments import ExperimentsConfig, ExplorationConfig
    from walkrank.walks.engine import WalkParams

# A tenant's name is also a directory name in the model registry: keep it a safe path component.
TENANT_NAME_CHARS = 64
TENANT_NAME_RE = re.compile(rf"[a-z0-9_]{{1,{TENANT_NAME_CHARS}}}")
# A client's query actions are open-ended (it names them), but must look like names.
_EVENT_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_METRIC_RE = re.compile(r"(?P<name>[a-z_]+)@(?P<k>[0-9]+)")

QUERY_SOURCES = ("recent_pins", "viewed_pin")
#: Compute-slot priorities, first served first: a batch tenant (email) runs when no
#: interactive request (home feed, related pins) is waiting (walkrank.serving.scheduler).
PRIORITIES = ("interactive", "batch")
BIAS_BY = ("locale", "locale_topic")
CONVERTERS = ("onnxmltools", "hummingbird")
LABEL_STRATEGIES = ("engagement", "funnel", "blended_funnel", "distillation")
PRIMARY_METRICS = ("recall_actions", "recall_impressions", "ndcg")
IMPRESSION = "impression"

DEFAULT_ACTION_WEIGHTS = {"save": 1.0, "click": 0.5, "view": 0.2}
DEFAULT_LABEL_WEIGHTS = {IMPRESSION: 1.0, "closeup": 2.0, "click": 3.0, "save": 5.0, "hide": 1.0}

# Typo guards, not tuning: values past these are far outside any sensible request budget.
MAX_STEPS = 10_000_000  # also the walk engine's bound (walkrank.walks.engine.WalkParams)
MAX_CANDIDATES = 100_000
MAX_QUERY_PINS = 10_000
MAX_IN_FLIGHT = 100_000
MAX_DEADLINE_MS = 600_000
MAX_TREES = 10_000
MAX_DEPTH = 16
# A tenant file is a page of YAML; anything this large is a mistake, not read whole.
MAX_TENANT_FILE_BYTES = 1 << 20
MAX_SEARCH_TRIALS = 64

# The ranker's numeric settings (YAML names), their defaults and bounds. The defaults are
# for small logs: shallow trees that need a few examples per leaf, row and column sampling,
# and early stopping on the held-out window, so `trees` is a ceiling, not a target.
_RANKER_DEFAULTS: dict[str, int | float] = {
    "trees": 300,
    "max_depth": 4,
    "learning_rate": 0.1,
    "min_child_weight": 5.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
    "reg_alpha": 0.0,
    "gamma": 0.0,
    "early_stopping_rounds": 20,
}
RANKER_PARAMS = tuple(_RANKER_DEFAULTS)
# name -> (low, high, low bound excluded); integers first.
_RANKER_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "trees": (1, MAX_TREES, False),
    "max_depth": (1, MAX_DEPTH, False),
    "early_stopping_rounds": (0, MAX_TREES, False),
    "learning_rate": (0.0, 1.0, True),
    "subsample": (0.0, 1.0, True),
    "colsample_bytree": (0.0, 1.0, True),
    "min_child_weight": (0.0, None, False),
    "reg_lambda": (0.0, None, False),
    "reg_alpha": (0.0, None, False),
    "gamma": (0.0, None, False),
}
_INTEGER_RANKER_PARAMS = ("trees", "max_depth", "early_stopping_rounds")
# What `walkrank train --search` tries when a tenant names no grid: 8 models.
DEFAULT_SEARCH: dict[str, tuple[float, ...]] = {
    "max_depth": (3, 6),
    "min_child_weight": (1.0, 20.0),
    "learning_rate": (0.05, 0.2),
}
# Tenant names that `walkrank.ranking.fit` spells otherwise.
_TRAINING_NAMES = {"trees": "n_estimators"}


@dataclass(frozen=True)
class QueryConfig:
    """Where a request's query pins come from and how a client weights them."""

    source: Literal["recent_pins", "viewed_pin"]
    max_pins: int
    # Only for recent_pins: weight = action_weights[action] * 0.5 ** (age_hours / half_life).
    recency_half_life_hours: float | None
    action_weights: Mapping[str, float]


@dataclass(frozen=True)
class EarlyStopping:
    """Pixie's per-query-pin early stop: more than its share of `pins` pins (`pins` split
    like the steps) with at least `visits` visits."""

    pins: int
    visits: int


@dataclass(frozen=True)
class WalkBias:
    strength: float
    by: Literal["locale", "locale_topic"]


@dataclass(frozen=True)
class WalkConfig:
    steps: int
    restart_probability: float
    early_stopping: EarlyStopping | None
    bias: WalkBias


@dataclass(frozen=True)
class CandidatesConfig:
    """`generate` candidates are walked, featurised, scored and logged; `return_` go back."""

    generate: int
    return_: int  # YAML key `return`
    max_return: int


@dataclass(frozen=True)
class RankerConfig:
    """The tenant's GBDT: objective, converter, size and regularisation (XGBoost's names),
    early stopping on the held-out window, and the grid `walkrank train --search` tries."""

    objective: Literal["binary", "pairwise", "regression"]
    converter: Literal["onnxmltools", "hummingbird"]
    trees: int  # an upper bound when early stopping is on
    max_depth: int
    learning_rate: float
    min_child_weight: float
    subsample: float
    colsample_bytree: float
    reg_lambda: float
    reg_alpha: float
    gamma: float
    early_stopping_rounds: int  # 0: off
    # Setting -> values tried by `train --search` (every combination, in this order).
    search: Mapping[str, tuple[float, ...]]

    def training_params(self) -> dict[str, Any]:
        """`walkrank.ranking.fit.train_model` params (its names) of these settings."""
        return {_TRAINING_NAMES.get(name, name): getattr(self, name) for name in RANKER_PARAMS}

    def search_grid(self) -> list[dict[str, Any]]:
        """Every combination of the `search` values, first field varying slowest."""
        grid: list[dict[str, Any]] = [{}]
        for name, values in self.search.items():
            grid = [{**point, name: value} for point in grid for value in values]
        return grid


@dataclass(frozen=True)
class LabelsConfig:
    strategy: Literal["engagement", "funnel", "blended_funnel", "distillation"]
    weights: Mapping[str, float]
    local_label_weight: float
    negative_sample_rate: float
    primary_metric: str

    @property
    def primary_metric_k(self) -> int:
        return int(self.primary_metric.split("@", 1)[1])


@dataclass(frozen=True)
class LoggingConfig:
    sample_rate: float


@dataclass(frozen=True)
class LimitsConfig:
    max_in_flight: int
    max_query_pins: int
    deadline_ms: int
    priority: str  # one of PRIORITIES


@dataclass(frozen=True)
class TenantConfig:
    """One tenant (client surface): walk budget, candidates, features, ranker and labels."""

    name: str
    description: str
    query: QueryConfig
    walk: WalkConfig
    candidates: CandidatesConfig
    features: tuple[str, ...]
    ranker: RankerConfig
    labels: LabelsConfig
    logging: LoggingConfig
    limits: LimitsConfig
    source: Path | None = field(default=None, compare=False)  # the YAML file it came from
    # walkrank.experiments: exploration traffic and model experiments (None: off).
    exploration: ExplorationConfig | None = None
    experiments: ExperimentsConfig | None = None
    # `pin.`/`request.` feature -> the value served when its input is missing (else 0).
    feature_defaults: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # graph.realtime_saves: the "save" events it reports with a board_id become pin-board
    # edges of the server's real-time delta (walkrank.graph.delta).
    realtime_saves: bool = False

    @functools.cached_property
    def walk_params(self) -> WalkParams:
        """The walk engine's settings for this tenant (the walk returns `generate` pins);
        built once, not per request."""
        from walkrank.walks.engine import WalkParams

        stop = self.walk.early_stopping
        return WalkParams(
            steps=self.walk.steps,
            restart_probability=self.walk.restart_probability,
            early_stop_pins=0 if stop is None else stop.pins,
            **({} if stop is None else {"early_stop_visits": stop.visits}),
            bias_strength=self.walk.bias.strength,
            bias_by=self.walk.bias.by,
            max_candidates=self.candidates.generate,
        )

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration (defaults filled in) in the file's own schema."""
        query: dict[str, Any] = {"source": self.query.source, "max_pins": self.query.max_pins}
        if self.query.source == "recent_pins":
            query["recency_half_life_hours"] = self.query.recency_half_life_hours
            query["action_weights"] = dict(self.query.action_weights)
        stop = self.walk.early_stopping
        return {
            "name": self.name,
            "description": self.description,
            "query": query,
            "walk": {
                "steps": self.walk.steps,
                "restart_probability": self.walk.restart_probability,
                "early_stopping": None
                if stop is None
                else {"pins": stop.pins, "visits": stop.visits},
                "bias": {"strength": self.walk.bias.strength, "by": self.walk.bias.by},
            },
            "candidates": {
                "generate": self.candidates.generate,
                "return": self.candidates.return_,
                "max_return": self.candidates.max_return,
            },
            "features": list(self.features),
            "feature_defaults": dict(self.feature_defaults),
            "ranker": {
                "objective": self.ranker.objective,
                "converter": self.ranker.converter,
                **{name: getattr(self.ranker, name) for name in RANKER_PARAMS},
                "search": {name: list(values) for name, values in self.ranker.search.items()},
            },
            "labels": {
                "strategy": self.labels.strategy,
                "weights": dict(self.labels.weights),
                "local_label_weight": self.labels.local_label_weight,
                "negative_sample_rate": self.labels.negative_sample_rate,
                "primary_metric": self.labels.primary_metric,
            },
            "logging": {"sample_rate": self.logging.sample_rate},
            "limits": {
                "max_in_flight": self.limits.max_in_flight,
                "max_query_pins": self.limits.max_query_pins,
                "deadline_ms": self.limits.deadline_ms,
                "priority": self.limits.priority,
            },
            "exploration": None if self.exploration is None else self.exploration.to_dict(),
            "experiments": None if self.experiments is None else self.experiments.to_dict(),
            "graph": {"realtime_saves": self.realtime_saves},
        }


@dataclass(frozen=True)
class TenantSet:
    """Every tenant file of a directory: the good ones loaded, the broken ones explained."""

    configs: dict[str, TenantConfig]
    errors: dict[str, str]  # file path -> ConfigError message


def load_tenant(path: str | Path) -> TenantConfig:
    """Read and validate one tenant file; ConfigError names the file and the field."""
    path = Path(path)
    file = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TENANT_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_TENANT_FILE_BYTES:
        raise ConfigError(f"{file}: larger than {MAX_TENANT_FILE_BYTES} bytes; not a tenant file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        raw = yaml.load(text, Loader=_TenantLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{file}: {where}invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
    if raw is None:
        raise ConfigError(f"{file}: the file is empty; a tenant needs at least name and query")
    return _build(_Fields(file, "", raw), source=path)


def load_tenants(directory: str | os.PathLike[str]) -> TenantSet:
    """Load every `*.yaml` of a directory; one broken file never hides the others.

    A symlink is followed only to a file inside the directory (as Kubernetes ConfigMap
    volumes lay files out); one leading elsewhere is refused unread, so a reload error can
    never show another file's contents.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: tenant directory does not exist")
    inside = directory.resolve()
    configs: dict[str, TenantConfig] = {}
    errors: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue  # editor lock and swap files
        if path.suffix in (".yaml", ".yml") and path.is_symlink() and _leads_out(path, inside):
            errors[str(path)] = (
                f"{path}: a symlink to a file outside {directory}; refused "
                f"(tenant files must live in the tenant directory)"
            )
            continue
        if not path.is_file():
            continue
        if path.suffix == ".yml":
            errors[str(path)] = f"{path}: tenant files must end in .yaml (rename it to load it)"
            continue
        if path.suffix != ".yaml":
            continue
        try:
            config = load_tenant(path)
        except ConfigError as exc:
            errors[str(path)] = str(exc)
            continue
        configs[config.name] = config
    return TenantSet(configs, errors)


def _leads_out(link: Path, inside: Path) -> bool:
    try:
        return not link.resolve().is_relative_to(inside)
    except (OSError, RuntimeError):  # a symlink loop
        return True


# -- parsing ----------------------------------------------------------------------------------


class _TenantLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-3` as a number (YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may legitimately be overridden by later keys
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-3` and `1e5` as strings; numbers written that way are common.
_TenantLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_SHOWN_CHARS = 40


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A short prefix names the value; an error never carries a file's worth of text.
        if len(value) > _SHOWN_CHARS:
            return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


_MISSING: Any = object()


class _Fields:
    """One YAML mapping being read: typed getters, and leftover keys rejected at `done()`."""

    def __init__(self, file: str, prefix: str, raw: Any) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(raw, dict):
            if not prefix:  # the whole file: say what it is, never echo it
                kind = "a list" if isinstance(raw, list) else "a scalar (text or a number)"
                raise ConfigError(f"{file}: top level: expected a mapping of fields, got {kind}")
            raise ConfigError(f"{file}: {prefix}: expected a mapping of fields, got {_show(raw)}")
        self.raw = raw
        self.used: set[Any] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.file}: {self.path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _MISSING:
            self.fail(key, "required field is missing")
        return default

    def integer(
        self, key: str, default: Any = _MISSING, *, low: int = 0, high: int | None = None
    ) -> int:
        value = self.get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_show(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            self.fail(key, f"must be {bounds}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        low: float,
        high: float | None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"must be a number, got {_show(value)}")
        value = float(value)
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            if high is None:
                bounds = f"{'>' if low_open else '>='} {low:g}"
            else:
                bounds = (
                    f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                )
            self.fail(key, f"must be {bounds}, got {value:g}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value not in options or not isinstance(value, str):
            self.fail(key, f"must be one of {', '.join(options)}; got {_show(value)}")
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            self.fail(key, f"must be text, got {_show(value)}")
        return value

    def weights(self, key: str, default: Mapping[str, float]) -> Mapping[str, float]:
        """A mapping event/action name -> weight >= 0 (given, or the default as a whole)."""
        section = _Fields(self.file, self.path(key), self.get(key, dict(default)))
        out = {}
        for name in section.raw:
            if not isinstance(name, str) or not _EVENT_NAME_RE.fullmatch(name):
                section.fail(str(name), "event names are lower-case words (a-z, 0-9, _)")
            out[name] = section.number(name, low=0.0, high=None)
        if not out:
            self.fail(key, "must name at least one event type")
        return MappingProxyType(out)

    def section(self, key: str) -> _Fields:
        value = self.get(key, {})
        return _Fields(self.file, self.path(key), {} if value is None else value)

    def done(self) -> None:
        unknown = [k for k in self.raw if k not in self.used]
        if unknown:
            key = unknown[0]
            known = sorted(str(k) for k in self.used)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(str(key), f"unknown field{hint}; known fields here: {', '.join(known)}")


def _build(top: _Fields, *, source: Path) -> TenantConfig:
    # Read every known key first (so `done` can name unknown ones), then cross-check.
    name = top.text("name")
    if not TENANT_NAME_RE.fullmatch(name):
        top.fail("name", f"must be 1-64 characters of a-z, 0-9 and _, got {name!r}")
    if name != source.stem:
        top.fail("name", f"must match the file name {source.stem!r}, got {name!r}")
    description = top.text("description", "")
    limits = _limits(top.section("limits"))
    query = _query(top.section("query"), limits)
    candidates = _candidates(top.section("candidates"))
    walk = _walk(top.section("walk"))
    features = _features(top)
    feature_defaults = _feature_defaults(top, features)
    ranker = _ranker(top.section("ranker"))
    labels = _labels(top.section("labels"), ranker, candidates)
    logging_section = top.section("logging")
    logging = LoggingConfig(
        sample_rate=logging_section.number("sample_rate", 1.0, low=0.0, high=1.0)
    )
    logging_section.done()
    exploration, experiments = _experiments(top, candidates)
    graph_section = top.section("graph")
    realtime_saves = graph_section.get("realtime_saves", False)
    if not isinstance(realtime_saves, bool):
        graph_section.fail("realtime_saves", f"must be true or false, got {_show(realtime_saves)}")
    graph_section.done()
    top.done()
    return TenantConfig(
        name,
        description,
        query,
        walk,
        candidates,
        features,
        ranker,
        labels,
        logging,
        limits,
        source,
        exploration,
        experiments,
        feature_defaults=feature_defaults,
        realtime_saves=realtime_saves,
    )


def _experiments(
    top: _Fields, candidates: CandidatesConfig
) -> tuple[ExplorationConfig | None, ExperimentsConfig | None]:
    from walkrank.experiments import parse_experiments, parse_exploration

    exploration = None
    if top.get("exploration", None) is not None:
        exploration = parse_exploration(top.section("exploration"), candidates)
    return exploration, parse_experiments(top.section("experiments"))


def _limits(section: _Fields) -> LimitsConfig:
    limits = LimitsConfig(
        max_in_flight=section.integer("max_in_flight", 16, low=1, high=MAX_IN_FLIGHT),
        max_query_pins=section.integer("max_query_pins", 100, low=1, high=MAX_QUERY_PINS),
        deadline_ms=section.integer("deadline_ms", 200, low=1, high=MAX_DEADLINE_MS),
        priority=section.choice("priority", PRIORITIES, "interactive"),
    )
    section.done()
    return limits


def _query(section: _Fields, limits: LimitsConfig) -> QueryConfig:
    source = section.choice("source", QUERY_SOURCES)
    action_weights: Mapping[str, float]
    if source == "viewed_pin":
        max_pins = section.integer("max_pins", 1, low=1)
        if max_pins != 1:
            section.fail("max_pins", f"must be 1 with source viewed_pin, got {max_pins}")
        for key in ("recency_half_life_hours", "action_weights"):
            if section.has(key):
                section.fail(key, "only used with source recent_pins; remove it")
        half_life, action_weights = None, MappingProxyType({})
    else:
        max_pins = section.integer("max_pins", 20, low=1, high=MAX_QUERY_PINS)
        if section.get("recency_half_life_hours", 72.0) is None:
            half_life = None  # recency ignored: weight by action alone
        else:
            half_life = section.number(
                "recency_half_life_hours", 72.0, low=0.0, high=None, low_open=True
            )
        action_weights = section.weights("action_weights", DEFAULT_ACTION_WEIGHTS)
        if not any(w > 0 for w in action_weights.values()):
            section.fail("action_weights", "at least one weight must be > 0")
    if max_pins > limits.max_query_pins:
        section.fail(
            "max_pins", f"{max_pins} exceeds limits.max_query_pins ({limits.max_query_pins})"
        )
    section.done()
    return QueryConfig(source, max_pins, half_life, action_weights)


def _walk(section: _Fields) -> WalkConfig:
    steps = section.integer("steps", 100_000, low=1, high=MAX_STEPS)
    restart = section.number("restart_probability", 0.5, low=0.0, high=1.0, low_open=True)
    raw_stop = section.get("early_stopping", {})
    if raw_stop is None:
        early_stopping = None
    else:
        stop = _Fields(section.file, section.path("early_stopping"), raw_stop)
        # n_p scales with the budget (500 at 100k steps, the engine's default): a fixed n_p
        # stops a short walk late or never (docs/tenants.md).
        early_stopping = EarlyStopping(
            pins=stop.integer("pins", max(1, steps // 200), low=1, high=MAX_CANDIDATES),
            visits=stop.integer("visits", 8, low=1, high=MAX_STEPS),
        )
        stop.done()
    bias_section = section.section("bias")
    bias = WalkBias(
        strength=bias_section.number("strength", 0.0, low=0.0, high=1.0),
        by=bias_section.choice("by", BIAS_BY, "locale"),
    )
    bias_section.done()
    section.done()
    return WalkConfig(steps, restart, early_stopping, bias)


def _candidates(section: _Fields) -> CandidatesConfig:
    generate = section.integer("generate", 2000, low=1, high=MAX_CANDIDATES)
    default_return = section.integer("return", min(100, generate), low=1)
    max_return = section.integer("max_return", generate, low=1)
    if default_return > max_return:
        section.fail("return", f"{default_return} exceeds candidates.max_return ({max_return})")
    if max_return > generate:
        section.fail(
            "max_return",
            f"{max_return} exceeds candidates.generate ({generate}); "
            f"a request cannot get more than the walk generates",
        )
    section.done()
    return CandidatesConfig(generate, default_return, max_return)


def _features(top: _Fields) -> tuple[str, ...]:
    from walkrank.features import check_feature_names, feature_names

    raw = top.get("features", None)
    if raw is None:
        return tuple(feature_names())
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        top.fail("features", f"must be a list of feature names, got {_show(raw)}")
    try:
        return check_feature_names(raw)
    except ConfigError as exc:
        top.fail("features", str(exc))


def _feature_defaults(top: _Fields, features: tuple[str, ...]) -> Mapping[str, float]:
    """`feature_defaults`: a listed `pin.<column>` or `request.<name>` feature -> the finite
    value served when the pin lacks the column or the request omits the feature."""
    from walkrank.features import DECLARED_RE, DEFAULTABLE

    section = top.section("feature_defaults")
    out = {}
    for name in list(section.raw):
        match = DECLARED_RE.fullmatch(str(name))
        if match is None or match["kind"] not in DEFAULTABLE:
            section.fail(str(name), "only pin.<column> and request.<name> features take a default")
        if name not in features:
            section.fail(name, "not in the tenant's features list; list it there first")
        out[name] = section.number(name, low=-math.inf, high=None)
    section.done()
    return MappingProxyType(out)


def _ranker(section: _Fields) -> RankerConfig:
    values = {
        name: _ranker_value(section, name, default) for name, default in _RANKER_DEFAULTS.items()
    }
    ranker = RankerConfig(
        objective=section.choice("objective", tuple(OBJECTIVES), "binary"),
        converter=section.choice("converter", CONVERTERS, "onnxmltools"),
        search=_search(section),
        **values,
    )
    if ranker.converter == "hummingbird" and ranker.objective != "binary":
        # hummingbird-ml 0.4.12 crashes on xgboost 3 rankers and regressors (base_score).
        section.fail(
            "converter",
            f"hummingbird converts only objective binary; use "
            f"onnxmltools for objective {ranker.objective}",
        )
    section.done()
    return ranker


def _ranker_value(section: _Fields, name: str, default: Any, key: str | None = None) -> Any:
    """The ranker setting `name`, read from `key` (default: its own name) within its bounds."""
    key = key or name
    low, high, low_open = _RANKER_BOUNDS[name]
    if name == "early_stopping_rounds" and section.get(key, default) is None:
        return 0  # null: off
    if name in _INTEGER_RANKER_PARAMS:
        return section.integer(key, default, low=int(low), high=None if high is None else int(high))
    return section.number(key, default, low=low, high=high, low_open=low_open)


def _search(section: _Fields) -> Mapping[str, tuple[float, ...]]:
    """`ranker.search`: setting -> the list of values `train --search` tries."""
    raw = section.get("search", None)
    if raw is None:
        return MappingProxyType(dict(DEFAULT_SEARCH))
    grid = _Fields(section.file, section.path("search"), raw)
    out: dict[str, tuple[float, ...]] = {}
    trials = 1
    for name in list(grid.raw):
        if name not in _RANKER_DEFAULTS:
            close = difflib.get_close_matches(str(name), list(_RANKER_DEFAULTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            grid.fail(
                str(name), f"not a ranker setting{hint}; searchable: {', '.join(_RANKER_DEFAULTS)}"
            )
        values = grid.get(name)
        if not isinstance(values, list) or not values:
            grid.fail(name, f"must be a non-empty list of values, got {_show(values)}")
        items = _Fields(
            section.file, grid.prefix, {f"{name}[{i}]": value for i, value in enumerate(values)}
        )
        checked = [_ranker_value(items, name, _MISSING, key) for key in items.raw]
        if len(set(checked)) != len(checked):
            grid.fail(name, f"repeats a value: {checked}")
        out[name] = tuple(checked)
        trials *= len(checked)
    if trials > MAX_SEARCH_TRIALS:
        section.fail(
            "search",
            f"{trials} combinations; at most {MAX_SEARCH_TRIALS} (each one trains a model)",
        )
    grid.done()
    return MappingProxyType(out)


def _labels(section: _Fields, ranker: RankerConfig, candidates: CandidatesConfig) -> LabelsConfig:
    from walkrank.logs.events import ACTION_EVENTS, EVENT_TYPES

    strategy = section.choice("strategy", LABEL_STRATEGIES, "blended_funnel")
    weights = section.weights("weights", DEFAULT_LABEL_WEIGHTS)
    for event in weights:
        if event not in EVENT_TYPES:
            close = difflib.get_close_matches(event, EVENT_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section.fail(
                f"weights.{event}",
                f"unknown event type{hint}; known event types: {', '.join(EVENT_TYPES)}",
            )
    local = section.number("local_label_weight", 1.0, low=1.0, high=None)
    negative_rate = section.number("negative_sample_rate", 1.0, low=0.0, high=1.0, low_open=True)
    metric = section.text("primary_metric", "recall_actions@50")
    match = _METRIC_RE.fullmatch(metric)
    if not match or match["name"] not in PRIMARY_METRICS:
        section.fail(
            "primary_metric",
            f"must be <metric>@<k> with metric one of {', '.join(PRIMARY_METRICS)}, got {metric!r}",
        )
    k = int(match["k"])
    if not 1 <= k <= candidates.generate:
        section.fail(
            "primary_metric",
            f"k must be in [1, candidates.generate = {candidates.generate}], got {k}",
        )

    if (strategy == "distillation") != (ranker.objective == "regression"):
        # Distillation regresses on the full ranker's score; every other strategy has 0/1
        # labels, which a regression objective would fit as probabilities without ranking.
        needed = "regression" if strategy == "distillation" else "binary or pairwise"
        section.fail(
            "strategy",
            f"strategy {strategy} needs ranker.objective {needed}, got {ranker.objective}",
        )
    actions = [e for e, w in weights.items() if e in ACTION_EVENTS and w > 0]
    if strategy in ("funnel", "blended_funnel") and weights.get(IMPRESSION, 0.0) <= 0:
        section.fail("weights", f"strategy {strategy} needs an {IMPRESSION} weight > 0")
    if strategy in ("engagement", "blended_funnel") and not actions:
        section.fail(
            "weights",
            f"strategy {strategy} needs at least one action weight > 0 "
            f"(one of {', '.join(ACTION_EVENTS)})",
        )
    section.done()
    return LabelsConfig(strategy, weights, local, negative_rate, metric)
