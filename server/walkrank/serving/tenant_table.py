"""The live table of tenants: config + model per tenant, swapped whole on reload.

A request takes one `TenantRuntime` reference at its start and keeps it to the end, so a reload
in the middle of a request never mixes two configs or two models. A reload builds a new table
beside the old one; anything that fails to load (a broken YAML file, a corrupt model or
`CURRENT`, a model whose features do not match) is an error of that tenant alone: it is
reported, the tenant keeps what it was serving (a tenant whose model never loaded serves visit
count), and every other tenant loads as if nothing happened.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from walkrank.errors import WalkRankError
from walkrank.experiments import ArmModel, ExperimentRuntime, build_experiment
from walkrank.features import check_feature_defaults, check_feature_list
from walkrank.model_registry import LoadedModel, ModelRegistry
from walkrank.ranking.scorer import Scorer
from walkrank.tenants import TenantConfig, load_tenants

log = logging.getLogger(__name__)

VISIT_COUNT = "visit_count"


class InFlightLimiter:
    """Counts a tenant's in-flight requests and refuses beyond its quota, without waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0

    def try_acquire(self, limit: int) -> bool:
        with self._lock:
            if self.in_flight >= limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


@dataclass
class TenantCounters:
    """Per-tenant counters that outlive reloads (Admin shows them)."""

    limiter: InFlightLimiter = field(default_factory=InFlightLimiter)
    requests: int = 0
    events_accepted: int = 0
    events_rejected: int = 0
    status_codes: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, status_code: str) -> None:
        with self._lock:
            self.requests += 1
            self.status_codes[status_code] += 1

    def add_events(self, accepted: int, rejected: int) -> None:
        with self._lock:
            self.events_accepted += accepted
            self.events_rejected += rejected

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            errors = sum(n for code, n in self.status_codes.items() if code != "OK")
            return {
                "requests": self.requests,
                "errors": errors,
                "in_flight": self.limiter.in_flight,
                "events_accepted": self.events_accepted,
                "events_rejected": self.events_rejected,
            }


@dataclass(frozen=True)
class TenantRuntime:
    """Everything one request of a tenant needs, immutable for the request's lifetime."""

    config: TenantConfig
    model: LoadedModel | None = None
    scorer: Scorer | None = None
    experiment: ExperimentRuntime | None = None  # the tenant's experiment arms' models

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model_version(self) -> str:
        return f"v{self.model.version}" if self.model is not None else VISIT_COUNT


@dataclass(frozen=True)
class ReloadReport:
    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()  # tenants whose config changed
    removed: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)  # tenant -> model now served, if new
    errors: dict[str, str] = field(default_factory=dict)  # tenant -> what failed
    error_files: dict[str, str] = field(default_factory=dict)  # tenant -> the file at fault
    graph: str = ""  # the graph swap, e.g. "now 8 (was 7)"; empty when the graph stayed
    graph_error: tuple[str, str] | None = None  # (path, message) of a graph refused


def load_runtime_model(
    registry: ModelRegistry, config: TenantConfig, version: int
) -> tuple[LoadedModel, Scorer]:
    """Load a version of the tenant's model, refusing one whose features differ from the
    tenant's."""
    model = registry.load(config.name, version)
    check_feature_list(list(model.metadata["feature_names"]), list(config.features))
    check_feature_defaults(model.metadata.get("feature_defaults"), config.feature_defaults)
    return model, Scorer.from_onnx(model.onnx_bytes, len(config.features))


def _load_arm(registry: ModelRegistry, config: TenantConfig, version: int) -> ArmModel:
    model, scorer = load_runtime_model(registry, config, version)
    return ArmModel(f"v{model.version}", scorer)


def _served_version(runtime: TenantRuntime | None) -> int | None:
    return runtime.model.version if runtime is not None and runtime.model is not None else None


class TenantTable:
    """Owns reloads; readers call `get` (a dict lookup on an immutable snapshot)."""

    def __init__(self, tenants_dir: Path, registry: ModelRegistry) -> None:
        self.tenants_dir = tenants_dir
        self.registry = registry
        self._runtimes: dict[str, TenantRuntime] = {}
        self._counters: dict[str, TenantCounters] = {}
        self._reload_lock = threading.Lock()
        self.errors: dict[str, str] = {}

    def get(self, name: str) -> TenantRuntime | None:
        return self._runtimes.get(name)

    def runtimes(self) -> dict[str, TenantRuntime]:
        return self._runtimes

    def counters(self, name: str) -> TenantCounters:
        counters = self._counters.get(name)
        if counters is None:
            counters = self._counters.setdefault(name, TenantCounters())
        return counters

    def reload(self, models_for: frozenset[str] | None = None) -> ReloadReport:
        """Re-scan the tenant files; re-read the models of `models_for` (None: every tenant)."""
        with self._reload_lock:
            return self._reload(models_for)

    def _reload(self, models_for: frozenset[str] | None) -> ReloadReport:
        old = self._runtimes
        loaded = load_tenants(self.tenants_dir)
        errors: dict[str, str] = {}
        error_files: dict[str, str] = {}
        models: dict[str, str] = {}
        fresh: dict[str, TenantRuntime] = {}
        for path, message in loaded.errors.items():
            name = Path(path).stem
            errors[name] = message
            error_files[name] = str(path)
            if name in old:  # a broken file never takes down a tenant that was serving
                fresh[name] = old[name]
                log.error("tenant %s keeps its previous config: %s", name, message)
            else:
                log.error("tenant %s not served: %s", name, message)
        for name, config in loaded.configs.items():
            previous = old.get(name)
            if (
                previous is not None
                and models_for is not None
                and name not in models_for
                and previous.config == config
            ):
                fresh[name] = previous
                continue
            runtime = self._build_runtime(config, previous, errors)
            if name in errors:  # the model failed: point at the tenant's model directory
                error_files[name] = str(self.registry.root / name)
                log.error("tenant %s serves %s: %s", name, runtime.model_version, errors[name])
            fresh[name] = runtime
            if previous is None or previous.model_version != runtime.model_version:
                models[name] = runtime.model_version
        self._runtimes = fresh
        self.errors = errors
        for name in fresh:
            self.counters(name)
        return ReloadReport(
            added=tuple(sorted(set(fresh) - set(old))),
            updated=tuple(
                sorted(n for n in set(fresh) & set(old) if fresh[n].config != old[n].config)
            ),
            removed=tuple(sorted(set(old) - set(fresh))),
            models=models,
            errors=errors,
            error_files=error_files,
        )

    def _with_experiment(self, runtime: TenantRuntime, errors: dict[str, str]) -> TenantRuntime:
        """The runtime with its experiment arms' models; when one cannot load, the error is
        the tenant's and every arm is served by the tenant's current model meanwhile."""
        config = runtime.config
        current = ArmModel(runtime.model_version, runtime.scorer)
        try:
            experiment = build_experiment(
                config.experiments, current, functools.partial(_load_arm, self.registry, config)
            )
        except Exception as exc:  # contained like the tenant's own model
            detail = str(exc) if isinstance(exc, WalkRankError) else f"{type(exc).__name__}: {exc}"
            errors[config.name] = (
                f"experiment model not loaded (every arm serves {runtime.model_version}): {detail}"
            )
            return runtime
        return dataclasses.replace(runtime, experiment=experiment)

    def _build_runtime(
        self, config: TenantConfig, previous: TenantRuntime | None, errors: dict[str, str]
    ) -> TenantRuntime:
        """The tenant with its `CURRENT` model; the same runtime object when nothing changed.

        Any failure to read the pointer or load the model (bad `CURRENT`, missing version,
        checksum, features, an ONNX the runtime rejects) is recorded in `errors` for this
        tenant only, which keeps its previous model if that still fits its features and
        otherwise serves visit count.
        """
        try:
            current = self.registry.current(config.name)
            version = current.version if current is not None else None
            if (
                previous is not None
                and previous.config == config
                and _served_version(previous) == version
                and (previous.experiment is not None or config.experiments is None)
            ):
                return previous
            model, scorer = (
                (None, None)
                if version is None
                else load_runtime_model(self.registry, config, version)
            )
            return self._with_experiment(TenantRuntime(config, model, scorer), errors)
        except Exception as exc:  # contained: one tenant's model never stops the others
            if not isinstance(exc, WalkRankError):
                log.exception("tenant %s: unexpected error loading its model", config.name)
            detail = str(exc) if isinstance(exc, WalkRankError) else f"{type(exc).__name__}: {exc}"
            errors[config.name] = f"model not loaded: {detail}"
        if previous is not None and previous.model is not None:
            try:
                check_feature_list(
                    list(previous.model.metadata["feature_names"]), list(config.features)
                )
            except WalkRankError:
                return TenantRuntime(config)
            return TenantRuntime(config, previous.model, previous.scorer)
        return TenantRuntime(config)
