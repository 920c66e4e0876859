"""The live table of tenants: config + model per tenant, swapped whole on reload.

A request takes one `TenantRuntime` reference at its start and keeps it to the end, so a reload
in the middle of a request never mixes two configs or two models. A reload builds a new table
beside the old one; anything that fails to load (a broken YAML file, a corrupt model, a model
whose features do not match) is reported and the tenant keeps what it was serving.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from walkrank.errors import WalkRankError
from walkrank.features import check_feature_list
from walkrank.models import LoadedModel, ModelRegistry
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
            return {"requests": self.requests, "errors": errors,
                    "in_flight": self.limiter.in_flight,
                    "events_accepted": self.events_accepted,
                    "events_rejected": self.events_rejected}


@dataclass(frozen=True)
class TenantRuntime:
    """Everything one request of a tenant needs, immutable for the request's lifetime."""

    config: TenantConfig
    model: LoadedModel | None = None
    scorer: Scorer | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model_version(self) -> str:
        return f"v{self.model.version}" if self.model is not None else VISIT_COUNT


@dataclass(frozen=True)
class ReloadReport:
    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # tenant -> what failed
    error_files: dict[str, str] = field(default_factory=dict)  # tenant -> the file at fault


def load_runtime_model(registry: ModelRegistry, config: TenantConfig) -> tuple[LoadedModel,
                                                                              Scorer] | None:
    """Load the tenant's current model, refusing one whose features differ from the tenant's."""
    current = registry.current(config.name)
    if current is None:
        return None
    model = registry.load(config.name, current.version)
    check_feature_list(list(model.metadata["feature_names"]), list(config.features))
    return model, Scorer.from_onnx(model.onnx_bytes, len(config.features))


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
        for name, config in loaded.configs.items():
            previous = old.get(name)
            if (previous is not None and models_for is not None and name not in models_for
                    and previous.config == config):
                fresh[name] = previous
                continue
            runtime = self._build_runtime(config, previous, errors)
            if name in errors:  # the model failed: point at the tenant's model directory
                error_files[name] = str(self.registry.root / name)
            fresh[name] = runtime
            if previous is None or previous.model_version != runtime.model_version:
                models[name] = runtime.model_version
        for name, message in errors.items():
            log.error("tenant %s not (re)loaded: %s", name, message)
        self._runtimes = fresh
        self.errors = errors
        for name in fresh:
            self.counters(name)
        return ReloadReport(
            added=tuple(sorted(set(fresh) - set(old))),
            updated=tuple(sorted(n for n in set(fresh) & set(old) if fresh[n] is not old[n])),
            removed=tuple(sorted(set(old) - set(fresh))),
            models=models,
            errors=errors,
            error_files=error_files,
        )

    def _build_runtime(self, config: TenantConfig, previous: TenantRuntime | None,
                       errors: dict[str, str]) -> TenantRuntime:
        current = self.registry.current(config.name)
        if (previous is not None and previous.config == config and previous.model is not None
                and current is not None and previous.model.version == current.version):
            return previous
        try:
            loaded = load_runtime_model(self.registry, config)
        except WalkRankError as exc:
            errors[config.name] = f"model not loaded: {exc}"
            if previous is not None and previous.model is not None:
                try:
                    check_feature_list(list(previous.model.metadata["feature_names"]),
                                       list(config.features))
                except WalkRankError:
                    return TenantRuntime(config)
                return TenantRuntime(config, previous.model, previous.scorer)
            return TenantRuntime(config)
        if loaded is None:
            return TenantRuntime(config)
        model, scorer = loaded
        return TenantRuntime(config, model, scorer)
