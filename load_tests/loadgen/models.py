"""Load-test rankers: a model of the served size for each tenant, trained on random rows.

What a load test needs from a model is its cost (trees x depth, the features it reads), not
its quality, so rows and labels are random. It goes through the real path all the same:
train_model -> export_model (converter + validation gate) -> ModelRegistry.publish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from walkrank.model_registry import ModelRegistry
from walkrank.ranking.export import export_model
from walkrank.ranking.fit import train_model
from walkrank.tenants import load_tenant


def publish_random_model(
    models_dir: Path,
    tenant_file: Path,
    trees: int = 100,
    depth: int = 6,
    rows: int = 20_000,
    seed: int = 0,
) -> int:
    """Train and publish a `trees`-tree depth-`depth` binary model; returns its version."""
    tenant = load_tenant(tenant_file)
    features = list(tenant.features)
    rng = np.random.default_rng(seed)
    matrix = rng.random((rows, len(features)), dtype=np.float32)
    # Labels that depend on a few features, so the trees split to full depth.
    logit = 3.0 * matrix[:, 0] - 2.0 * matrix[:, 1] + matrix[:, 2 % len(features)] - 1.0
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    trained = train_model(
        matrix,
        labels,
        objective="binary",
        params={"n_estimators": trees, "max_depth": depth},
        seed=seed,
    )
    exported = export_model(
        trained.booster,
        features,
        converter="onnxmltools",
        objective="binary",
        sample=matrix[:2000],
        extra_metadata={"purpose": "load test (random rows)"},
    )
    version = ModelRegistry(models_dir).publish(tenant.name, exported.onnx_bytes, exported.metadata)
    return version.version


def publish_random_models(
    models_dir: Path, tenants_dir: Path, trees: int = 100, depth: int = 6, seed: int = 0
) -> dict[str, int]:
    """One random model per tenant file in `tenants_dir` (tenant name -> version)."""
    versions = {}
    for index, path in enumerate(sorted(tenants_dir.glob("*.yaml"))):
        name = load_tenant(path).name
        versions[name] = publish_random_model(models_dir, path, trees, depth, seed=seed + index)
    return versions
