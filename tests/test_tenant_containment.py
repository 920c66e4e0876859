"""One tenant's broken YAML, model, checksum or CURRENT never stops another tenant, the
server's startup, or a Reload of the others; a Reload reports only what changed.

Through a real server on loopback with real model registries on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_server import busy_pins, make_config, publish_model, running

from walkrank.graph.store import GraphStore
from walkrank.serving.server import WalkRankServer


def changes(result) -> set[tuple[str, str]]:
    return {(c.tenant, c.kind) for c in result.changes}


def clone_tenant(tenants_dir: Path, source: str, name: str) -> None:
    text = (tenants_dir / f"{source}.yaml").read_text()
    (tenants_dir / f"{name}.yaml").write_text(text.replace(f"name: {source}", f"name: {name}"))


def load_error_metric(server: WalkRankServer, tenant: str) -> float | None:
    return server.metrics.registry.get_sample_value(
        "walkrank_tenant_load_error", {"tenant": tenant}
    )


def test_broken_models_and_files_at_startup_stop_only_their_tenant(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    models = config.models_dir
    clone_tenant(config.tenants_dir, "related_pins", "shop")
    publish_model(models, config.tenants_dir, "shop", seed=1)
    v1 = publish_model(models, config.tenants_dir, "related_pins", seed=2)
    corrupt = models / "related_pins" / str(v1) / "model.onnx"
    corrupt.write_bytes(corrupt.read_bytes()[:-10])  # the checksum no longer matches
    for tenant, pointer in (("homefeed", "abc\n"), ("email", "7\n")):
        (models / tenant).mkdir(parents=True)
        (models / tenant / "CURRENT").write_text(pointer)
    (config.tenants_dir / "broken.yaml").write_text("name: [unclosed\n")

    with running(config) as (server, client):
        query = busy_pins(small_graph, 1)
        assert client.recommend("shop", query).model_version == "v1"
        for tenant in ("homefeed", "email", "related_pins"):
            answer = client.recommend(tenant, query)
            assert answer.model_version == "visit_count" and answer.candidates
            assert client.health(tenant) == "SERVING"
            assert load_error_metric(server, tenant) == 1
        errors = {
            t: client.get_tenant(t).last_reload_error
            for t in ("homefeed", "email", "related_pins", "shop")
        }
        assert "CURRENT: expected a positive version number, got 'abc'" in errors["homefeed"]
        assert "points at version 7, whose directory" in errors["email"]
        assert "model.onnx: checksum mismatch" in errors["related_pins"]
        assert errors["shop"] == "" and load_error_metric(server, "shop") == 0
        assert load_error_metric(server, "broken") == 1


def test_bad_current_on_reload_is_an_error_of_its_tenant_only(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    models = config.models_dir
    clone_tenant(config.tenants_dir, "related_pins", "shop")
    for seed, tenant in enumerate(("related_pins", "shop")):
        publish_model(models, config.tenants_dir, tenant, seed=seed)
    with running(config) as (server, client):
        query = busy_pins(small_graph, 1)
        assert client.recommend("related_pins", query).model_version == "v1"
        (models / "related_pins" / "CURRENT").write_text("abc\n")
        clone_tenant(config.tenants_dir, "homefeed", "extra")
        publish_model(models, config.tenants_dir, "shop", seed=3)

        result = client.reload()

        assert changes(result) == {("extra", "added"), ("shop", "model")}
        [error] = result.errors
        assert error.path == str(models / "related_pins")
        assert "CURRENT: expected a positive version number" in error.message
        assert client.recommend("related_pins", query).model_version == "v1"  # kept
        assert client.recommend("shop", query).model_version == "v2"
        assert client.recommend("extra", query).candidates
        assert load_error_metric(server, "related_pins") == 1

        (models / "related_pins" / "CURRENT").write_text("1\n")  # repaired
        result = client.reload()
        assert not result.errors and changes(result) == set()
        assert client.get_tenant("related_pins").last_reload_error == ""
        assert load_error_metric(server, "related_pins") == 0


def test_reload_reports_only_real_changes(tmp_path: Path, small_graph: GraphStore) -> None:
    config = make_config(tmp_path, small_graph)
    with running(config) as (_, client):
        # No tenant has a model: nothing changed, nothing reported (not a "config" each).
        assert changes(client.reload()) == set()
        email = config.tenants_dir / "email.yaml"
        email.write_text(email.read_text())  # touched, same content
        assert changes(client.reload()) == set()
        email.write_text(
            email.read_text().replace("description: A handful", "description: Just a handful")
        )
        assert changes(client.reload()) == {("email", "config")}
        publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=1)
        result = client.reload()
        assert changes(result) == {("related_pins", "model")}
        assert [c.detail for c in result.changes] == ["now v1"]
        assert changes(client.reload()) == set()
        assert changes(client.reload(["related_pins"])) == set()


def test_a_tenant_file_symlinked_out_of_the_directory_is_refused_unread(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with running(config) as (_, client):
        os.symlink(secret, config.tenants_dir / "leak.yaml")
        result = client.reload()
        [error] = result.errors
        assert error.path.endswith("leak.yaml")
        assert "a symlink to a file outside" in error.message
        assert "root:" not in error.message
        assert changes(result) == set()
