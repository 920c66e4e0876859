"""Object storage against a real S3 API: moto's standalone server on a loopback port."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from test_server import REPO, _wait_until, busy_pins, publish_model, running
from test_training_pipeline import (
    CANDIDATES,
    N_REQUESTS,
    make_tenant,
    quiet,
    train_on_dask,
    write_logs,
)
from test_training_pipeline import _config as tenant_config

from walkrank.cli import main
from walkrank.errors import ConfigError, DataError
from walkrank.graph.repository import GraphRepository
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.model_registry import ModelRegistry
from walkrank.replicas import free_port_run
from walkrank.serving.config import ServerConfig, load_server_config
from walkrank.serving.server import WalkRankServer
from walkrank.storage import is_remote, open_store, pull, push
from walkrank.training.pipeline import train_tenant

BUCKET = "walkrank"


AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


class Moto:
    """moto's standalone S3 server on a loopback port; `stop` and `start` again keep the
    port (the store comes back empty, as a replaced server would)."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        self.executable = Path(sys.executable).parent / "moto_server"
        if not self.executable.exists():
            pytest.skip("moto_server is not installed (pip install 'moto[server]')")
        self.port = free_port_run(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(self.executable), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def aws_settings(moto: Moto) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def make_bucket(name: str = BUCKET) -> None:
    filesystem, bucket = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    filesystem.create_dir(bucket)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server for this module; the AWS settings point at it; yields its URI root."""
    moto = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in AWS_SETTINGS}
    os.environ.update(aws_settings(moto))
    try:
        moto.start()
        make_bucket()
        yield f"s3://{BUCKET}"
    finally:
        moto.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def remote_files(uri: str) -> set[str]:
    filesystem, root = open_store(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File}


def test_a_model_registry_pushed_and_pulled_serves_the_same_current_model(
    s3: str, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants"
    shutil.copytree(REPO / "tenants", tenants)
    published = tmp_path / "published"
    for seed in (1, 2):
        publish_model(published, tenants, "related_pins", seed=seed)
    uri = f"{s3}/models-{tmp_path.name}"
    first = push(published, uri)
    assert first.copied[-1] == "related_pins/CURRENT"  # the pointer goes up last
    assert not any(name.startswith(".") for name in remote_files(uri))
    again = push(published, uri)
    assert again.skipped == len(first.copied) - 2 and sorted(again.copied) == [
        "related_pins/CURRENT",
        "related_pins/LAST_VERSION",
    ]

    mirror = tmp_path / "mirror"
    assert main(["store", "pull", uri, str(mirror)]) == 0
    local = ModelRegistry(mirror)
    assert local.current("related_pins").version == 2
    assert [v.version for v in local.versions("related_pins")] == [2]  # only what is served
    assert (
        local.load("related_pins").onnx_bytes
        == ModelRegistry(published).load("related_pins").onnx_bytes
    )


def test_a_graph_repository_pulled_holds_the_current_version_verified(
    s3: str, tmp_path: Path, small_graph: GraphStore
) -> None:
    repository = GraphRepository(tmp_path / "graphs")
    for _ in range(2):
        repository.publish(functools.partial(shutil.copytree, small_graph.path))
    uri = f"{s3}/graphs-{tmp_path.name}"
    assert main(["store", "push", str(repository.root), uri]) == 0
    mirror = GraphRepository(tmp_path / "mirror")
    pull(uri, mirror.root)
    assert mirror.current_version() == 2
    assert mirror.version_numbers() == [2]
    GraphStore.load(mirror.version_dir(2), verify=True)  # checksums of every array match
    assert pull(uri, mirror.root).skipped > 0  # a second pull copies only the pointers


def test_a_pointer_naming_a_version_not_in_the_store_pulls_nothing(s3: str, tmp_path: Path) -> None:
    local = tmp_path / "models" / "homefeed"
    (local / "1").mkdir(parents=True)
    (local / "1" / "model.onnx").write_bytes(b"x")
    (local / "CURRENT").write_text("1\n")
    uri = f"{s3}/broken-{tmp_path.name}"
    push(tmp_path / "models", uri)
    filesystem, root = open_store(uri)
    with filesystem.open_output_stream(f"{root}/homefeed/CURRENT") as out:
        out.write(b"7\n")
    mirror = tmp_path / "mirror"
    with pytest.raises(DataError, match="names version 7, which has no files"):
        pull(uri, mirror)
    assert not (mirror / "homefeed" / "CURRENT").exists()


def test_push_never_overwrites_a_published_file(s3: str, tmp_path: Path) -> None:
    local = tmp_path / "logs"
    local.mkdir()
    (local / "part-1.parquet").write_bytes(b"12345")
    uri = f"{s3}/logs-{tmp_path.name}"
    push(local, uri)
    (local / "part-1.parquet").write_bytes(b"123456")
    with pytest.raises(DataError, match="a published file never changes"):
        push(local, uri)


def test_locations_are_checked_and_named(tmp_path: Path, capsys) -> None:
    assert is_remote("s3://bucket/x") and not is_remote(tmp_path) and not is_remote("file:///x")
    with pytest.raises(ConfigError, match="name a bucket"):
        open_store("s3://")
    with pytest.raises(ConfigError, match="nosuch://x: not a usable storage location"):
        open_store("nosuch://x")
    assert main(["store", "pull", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "expected a store URI" in capsys.readouterr().err


# -- a server on the store: graph and models mirrored, logs shipped ------------------------


def store_config(
    root: Path, uri: str, *, graph: str, models: str, logs: str, **settings: object
) -> ServerConfig:
    """A walkrank.yaml (locations as given: a store URI or a local path) read back."""
    tenants = root / "tenants"
    if not tenants.exists():
        shutil.copytree(REPO / "tenants", tenants)
    document = {
        "graph": graph,
        "tenants_dir": "tenants",
        "models_dir": models,
        "logs_dir": logs,
        "cache_dir": "cache",
        "address": "127.0.0.1:0",
        "grace_seconds": 5.0,
        **settings,
    }
    path = root / "walkrank.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_server_config(path)


def logged_rows(location: Path | str, tenant: str) -> int:
    return read_candidates(location, tenant).num_rows


def test_a_server_serves_graph_and_models_from_the_store_and_ships_its_logs(
    s3: str, tmp_path: Path, small_graph: GraphStore
) -> None:
    uri = f"{s3}/serve-{tmp_path.name}"
    repository = GraphRepository(tmp_path / "publisher" / "graphs")
    repository.publish(functools.partial(shutil.copytree, small_graph.path))
    push(repository.root, f"{uri}/graphs")
    registry = tmp_path / "publisher" / "models"
    publish_model(registry, REPO / "tenants", "related_pins", seed=1)
    push(registry, f"{uri}/models")
    config = store_config(
        tmp_path,
        uri,
        graph=f"{uri}/graphs/",
        models=f"{uri}/models",
        logs=f"{uri}/logs",
        log_ship_seconds=0.05,
        graph_watch_seconds=0.05,
    )
    cache = tmp_path / "cache" / "s3" / BUCKET / f"serve-{tmp_path.name}"
    assert (config.graph, config.models_dir, config.logs_dir) == (
        cache / "graphs",
        cache / "models",
        cache / "logs",
    )
    assert config.graph_store == f"{uri}/graphs"
    query = busy_pins(small_graph, 1)
    with running(config) as (server, client):
        assert client.graph_info().version == "1"
        assert client.recommend("related_pins", query).model_version == "v1"
        GraphStore.load(config.graph / "1", verify=True)  # mapped from the local cache

        publish_model(registry, REPO / "tenants", "related_pins", seed=2)
        repository.publish(functools.partial(shutil.copytree, small_graph.path))
        push(registry, f"{uri}/models")
        push(repository.root, f"{uri}/graphs")
        answer = client.reload()
        assert not answer.errors
        assert client.recommend("related_pins", query).model_version == "v2"
        assert client.graph_info().version == "2"
        assert client.recommend("homefeed", query).candidates  # homefeed logs every call
        # Without a Reload: the watcher follows the store's CURRENT.
        repository.publish(functools.partial(shutil.copytree, small_graph.path))
        push(repository.root, f"{uri}/graphs")
        _wait_until(lambda: client.graph_info().version == "3", "the watcher swapped in 3")
    # Stopped: the logs were closed and shipped; nothing is left on local disk.
    assert not list((config.logs_dir / "candidates").rglob("*.parquet"))
    generated = server.metrics.registry.get_sample_value(
        "walkrank_candidates_total", {"tenant": "homefeed", "kind": "generated"}
    )
    assert logged_rows(f"{uri}/logs", "homefeed") == generated > 0
    assert server.metrics.registry.get_sample_value("walkrank_log_shipped_files_total") > 0


@pytest.mark.slow
def test_log_shipping_survives_a_store_outage_and_a_restart(
    tmp_path: Path, small_graph: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = Moto(tmp_path / "moto.log")
    for key, value in aws_settings(moto).items():
        monkeypatch.setenv(key, value)
    moto.start()
    try:
        make_bucket()
        uri = f"s3://{BUCKET}/outage"
        config = store_config(
            tmp_path,
            uri,
            graph=str(small_graph.path),
            models="models",
            logs=f"{uri}/logs",
            log_ship_seconds=0.05,
        )
        query = busy_pins(small_graph, 1)
        with running(config) as (server, client):
            client.recommend("homefeed", query)
            moto.stop()  # the store goes away: calls are still served and logged
            for _ in range(3):
                assert client.recommend("homefeed", query).candidates
        metric = server.metrics.registry.get_sample_value
        generated = metric("walkrank_candidates_total", {"tenant": "homefeed", "kind": "generated"})
        # The last pass, at stop, failed: counted, and every row waits on local disk.
        assert metric("walkrank_log_ship_failures_total") >= 1
        assert metric("walkrank_log_ship_pending_files") >= 1
        assert metric("walkrank_log_shipped_files_total") == 0
        assert logged_rows(config.logs_dir, "homefeed") == generated > 0

        moto.start()  # back (empty, as a new store would be), and a new server process
        make_bucket()
        with running(config) as (restarted, _):
            _wait_until(
                lambda: not list((config.logs_dir / "candidates").rglob("*.parquet")),
                "the restarted server shipped what the first one left",
            )
        assert logged_rows(f"{uri}/logs", "homefeed") == generated
        assert restarted.metrics.registry.get_sample_value("walkrank_log_shipped_files_total") >= 1
    finally:
        moto.stop()


@pytest.mark.slow
def test_dask_training_on_two_worker_processes_reads_the_logs_from_the_store(
    s3: str, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    write_logs(logs)
    uri = f"{s3}/train-{tmp_path.name}/logs"
    push(logs, uri)
    tenant = make_tenant()
    local = train_tenant(tenant, logs, tmp_path / "local", publish=False, progress=quiet)
    report = train_on_dask(tenant, uri, tmp_path / "models", workers=2, processes=True)
    assert report.version == 1
    assert report.rows["candidates"] == N_REQUESTS * CANDIDATES
    assert report.comparison.requests == local.comparison.requests
    assert report.label_stats["positives"] == local.label_stats["positives"]
    # In process, from the store too: the same rows as from local disk.
    remote = train_tenant(tenant, uri, tmp_path / "remote", publish=False, progress=quiet)
    assert remote.rows == local.rows


def test_walkrank_train_reads_logs_and_publishes_models_on_the_store(
    s3: str, tmp_path: Path, small_graph: GraphStore, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"{s3}/cli-{tmp_path.name}"
    logs = tmp_path / "written"
    write_logs(logs)
    push(logs, f"{uri}/logs")
    tenant_config(tmp_path, logs)  # tenants/homefeed.yaml for the logged world
    store_config(
        tmp_path,
        uri,
        graph=str(small_graph.path),
        models=f"{uri}/models",
        logs=f"{uri}/logs",
    )
    path = str(tmp_path / "walkrank.yaml")
    assert main(["train", "--config", path, "--tenant", "homefeed"]) == 0
    assert "published homefeed v1" in capsys.readouterr().out
    mirror = tmp_path / "check"
    pull(f"{uri}/models", mirror)
    assert ModelRegistry(mirror).current("homefeed").version == 1
    assert main(["models", "list", "--config", path, "--tenant", "homefeed"]) == 0
    assert "* v1" in capsys.readouterr().out


def test_store_locations_that_cannot_work_are_one_line_errors_naming_them(
    s3: str, tmp_path: Path, small_graph: GraphStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(error: type[Exception], match: str, **locations: str) -> str:
        places = {"graph": str(small_graph.path), "models": "models", "logs": "logs"}
        with pytest.raises(error, match=match) as info:
            WalkRankServer(store_config(tmp_path, s3, **{**places, **locations}))
        assert "\n" not in str(info.value)
        return str(info.value)

    yaml_path = tmp_path / "walkrank.yaml"
    refused(ConfigError, f"{yaml_path}: logs_dir: s3://: name a bucket", logs="s3://")
    refused(ConfigError, "graph: ftp://x/g: not a usable storage location", graph="ftp://x/g")
    refused(
        DataError, "s3://nosuch/models: bucket 'nosuch' does not exist", models="s3://nosuch/models"
    )
    refused(DataError, f"{s3}/empty/CURRENT: nothing published", graph=f"{s3}/empty")
    (tmp_path / "walkrank.yaml").write_text(
        f"graph: {s3}/g\ntenants_dir: t\nmodels_dir: m\nlogs_dir: l\n"
    )
    with pytest.raises(ConfigError, match="cache_dir must name a local directory"):
        load_server_config(tmp_path / "walkrank.yaml")
    # No credentials in the environment, against a store that checks them.
    moto = Moto(tmp_path / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    moto.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials either
        message = refused(DataError, f"{s3}/logs: cannot reach bucket", logs=f"{s3}/logs")
        assert "no AWS credentials are set in the environment" in message
    finally:
        moto.stop()


def test_graph_build_publishes_straight_to_the_store(s3: str, tmp_path: Path) -> None:
    uri = f"{s3}/published-{tmp_path.name}/graphs"
    for _ in range(2):
        assert main(["graph", "synth", "--preset", "tiny", "--publish", uri]) == 0
    assert {"CURRENT", "LAST_VERSION", "1/manifest.json", "2/manifest.json"} <= remote_files(uri)
    mirror = GraphRepository(tmp_path / "mirror")
    pull(uri, mirror.root)
    assert mirror.current_version() == 2
    GraphStore.load(mirror.version_dir(2), verify=True)


def test_retention_in_the_store_keeps_what_the_pointers_name_and_the_newest_others(
    s3: str, tmp_path: Path, capsys
) -> None:
    """Models: four versions, served one rolled back to 2; `store prune --keep 1` deletes only
    version 1 (2 is CURRENT, 4 is LAST_VERSION, 3 the newest other), and a server's pull
    still serves version 2. Graphs: `--publish s3:// --keep 1` prunes the store itself."""
    tenants = tmp_path / "tenants"
    shutil.copytree(REPO / "tenants", tenants)
    published = tmp_path / "published"
    for seed in range(4):
        publish_model(published, tenants, "related_pins", seed=seed)
    ModelRegistry(published).rollback("related_pins", 2)
    models = f"{s3}/retained-{tmp_path.name}/models"
    push(published, models)
    assert main(["store", "prune", models, "--keep", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "prune: 1 versions deleted",
        "  related_pins/1",
    ]
    left = {name.split("/")[1] for name in remote_files(models)}
    assert left == {"2", "3", "4", "CURRENT", "LAST_VERSION"}
    mirror = ModelRegistry(tmp_path / "mirror")
    pull(models, mirror.root)
    assert mirror.current("related_pins").version == 2
    assert main(["store", "prune", models, "--keep", "1"]) == 0  # nothing more to delete
    assert capsys.readouterr().out.strip() == "prune: 0 versions deleted"

    graphs = f"{s3}/retained-{tmp_path.name}/graphs"
    for _ in range(3):
        assert main(["graph", "synth", "--preset", "tiny", "--publish", graphs, "--keep", "1"]) == 0
    assert {n.split("/")[0] for n in remote_files(graphs)} == {"2", "3", "CURRENT", "LAST_VERSION"}
    served = GraphRepository(tmp_path / "graph-mirror")
    pull(graphs, served.root)
    GraphStore.load(served.version_dir(3), verify=True)
    # A store keeps at least the newest version besides CURRENT: keep 0 is refused, before
    # anything is built or deleted.
    capsys.readouterr()
    assert main(["graph", "synth", "--preset", "tiny", "--publish", graphs, "--keep", "0"]) == 2
    assert "--keep: must be >= 1 for a store" in capsys.readouterr().err
    assert main(["store", "prune", graphs, "--keep", "0"]) == 2
    assert {n.split("/")[0] for n in remote_files(graphs)} == {"2", "3", "CURRENT", "LAST_VERSION"}
