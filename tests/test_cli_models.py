"""`walkrank models list|publish|rollback` through the real CLI, registry and converters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli_serve import write_config

from walkrank.cli import main
from walkrank.graph.store import GraphStore
from walkrank.model_registry import ModelRegistry
from walkrank.ranking.fit import train_model
from walkrank.tenants import load_tenant


@pytest.fixture()
def config(tmp_path: Path, small_graph: GraphStore) -> Path:
    return write_config(tmp_path, small_graph.path)


def save_booster(path: Path, n_features: int, objective: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.random((400, n_features), dtype=np.float32)
    y = (x[:, 1] > 0.5).astype(np.float32)
    trained = train_model(
        x,
        y,
        objective=objective,
        groups=np.repeat(np.arange(40), 10),
        params={"n_estimators": 5, "max_depth": 3},
        seed=seed,
    )
    trained.booster.save_model(str(path))
    return path


def publish(tenant: str, model: Path, config: Path) -> int:
    """`walkrank models publish` through the CLI's entry point; its exit code."""
    return main(
        ["models", "publish", "--tenant", tenant, "--xgboost", str(model), "--config", str(config)]
    )


def test_publish_list_rollback(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = load_tenant(tmp_path / "tenants" / "related_pins.yaml")
    n, objective = len(tenant.features), tenant.ranker.objective
    for seed in (1, 2):
        model = save_booster(tmp_path / f"m{seed}.json", n, objective, seed)
        assert publish("related_pins", model, config) == 0
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current("related_pins").version == 2
    assert main(["models", "list", "--tenant", "related_pins", "--config", str(config)]) == 0
    assert "* v2" in capsys.readouterr().out
    assert main(["models", "rollback", "--tenant", "related_pins", "--config", str(config)]) == 0
    assert registry.current("related_pins").version == 1


def test_publish_refuses_bad_models_with_the_file_named(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong_width = save_booster(tmp_path / "narrow.json", 3, "pairwise", 0)
    assert publish("related_pins", wrong_width, config) == 2
    assert "narrow.json" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a model")
    assert publish("related_pins", garbage, config) == 2
    assert "garbage.json" in capsys.readouterr().err
    assert publish("nobody", garbage, config) == 2
    assert "nobody.yaml: no such tenant file for 'nobody'" in capsys.readouterr().err
    # train and evaluate find the tenant by the same rule
    assert main(["train", "--tenant", "nobody", "--config", str(config)]) == 2
    assert "nobody.yaml: no such tenant file for 'nobody'" in capsys.readouterr().err
    assert ModelRegistry(tmp_path / "models").versions("related_pins") == []
