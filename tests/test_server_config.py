"""`walkrank.yaml` and the secrets it points at: errors name the file and the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from walkrank.errors import ConfigError
from walkrank.serving.config import load_server_config

BASE = {"graph": "g", "tenants_dir": "t", "models_dir": "m", "logs_dir": "l"}


def write(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "walkrank.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_paths_resolve_relative_to_the_file_and_auth_merges_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(
        yaml.safe_dump({"tenant_keys": {"email": ["a", "b"]}, "admin_token": "from-file"})
    )
    monkeypatch.setenv("WALKRANK_API_KEYS", "homefeed=h1,email=c")
    monkeypatch.delenv("WALKRANK_ADMIN_TOKEN", raising=False)
    config = load_server_config(
        write(
            tmp_path,
            {
                **BASE,
                "workers": 3,
                "compute_slots": 1,
                "compute_spare": 2,
                "log_ring_mb": 8,
                "auth": {"enabled": True, "secrets_file": "secrets.yaml"},
            },
        )
    )
    assert config.graph == (tmp_path / "g").resolve() and config.workers == 3
    assert config.compute_slots == 1 and config.compute_spare == 2 and config.log_ring_mb == 8
    assert config.address == "127.0.0.1:50051"
    assert config.auth.tenant_keys == {
        "email": frozenset({"a", "b", "c"}),
        "homefeed": frozenset({"h1"}),
    }
    assert config.auth.admin_token == "from-file"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({**BASE, "adress": "x"}, "unknown setting(s) ['adress']"),
        ({k: v for k, v in BASE.items() if k != "graph"}, "graph: required"),
        ({**BASE, "workers": "many"}, "workers: expected int"),
        ({**BASE, "workers": 0}, "workers: must be >= 1"),
        ({**BASE, "compute_slots": 0}, "compute_slots: must be >= 1"),
        ({**BASE, "compute_spare": -1}, "compute_spare: must be >= 0"),
        ({**BASE, "log_ring_mb": 0}, "log_ring_mb: must be >= 1"),
        ({**BASE, "log_queue_batches": 4096}, "log_queue_batches: no longer a setting; "),
        ({**BASE, "log_writer_nice": 20}, "log_writer_nice: must be in [0, 19]"),
        ({**BASE, "compute_nice": -1}, "compute_nice: must be in [0, 19]"),
        ({**BASE, "tls": {"cert_file": "c"}}, "tls: expected"),
        (
            {**BASE, "auth": {"enabled": True, "secrets_file": "missing.yaml"}},
            "missing.yaml: cannot read secrets file",
        ),
    ],
)
def test_bad_settings_name_file_and_field(tmp_path: Path, settings: dict, message: str) -> None:
    path = write(tmp_path, settings)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert message in str(info.value)
    assert "walkrank.yaml" in str(info.value) or "missing.yaml" in str(info.value)


def test_bad_env_keys_and_unreadable_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALKRANK_API_KEYS", "homefeed")
    with pytest.raises(ConfigError, match="WALKRANK_API_KEYS: expected 'tenant=key'"):
        load_server_config(write(tmp_path, {**BASE, "auth": {"enabled": True}}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("graph: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_server_config(broken)


def test_replace_checks_as_the_loader_does(tmp_path: Path) -> None:
    config = load_server_config(write(tmp_path, BASE))
    assert config.replace(workers=2).workers == 2
    with pytest.raises(ConfigError, match=r"^workers: must be >= 1, got 0$"):
        config.replace(workers=0)
