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
from test_server import REPO, publish_model

from walkrank.cli import main
from walkrank.errors import ConfigError, DataError
from walkrank.graph.repository import GraphRepository
from walkrank.graph.store import GraphStore
from walkrank.models import ModelRegistry
from walkrank.replicas import free_port_run
from walkrank.storage import is_remote, open_store, pull, push

BUCKET = "walkrank"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server for this module; the AWS settings point at it; yields its URI root."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port_run(1)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        filesystem, bucket = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        filesystem.create_dir(bucket)
        yield f"s3://{BUCKET}"
    finally:
        process.terminate()
        process.wait(timeout=10)
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
