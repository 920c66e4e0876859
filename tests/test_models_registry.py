"""Model registry: growing versions, atomic publish under a concurrent reader, rollback,
and refusal of corrupt models and of models that did not pass the validation gate."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading

import onnx
import pytest
from onnx import TensorProto, helper

from walkrank.errors import ModelError
from walkrank.model_registry import (
    CURRENT_FILE,
    LAST_VERSION_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ModelRegistry,
)

TENANT = "homefeed"
FEATURES = ["visits", "query_hits", "pin_degree"]


def identity_model(tag: int = 0) -> bytes:
    """A small valid ONNX model; `tag` makes each version's bytes distinct."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        f"identity_{tag}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, len(FEATURES)])],
    )
    model = helper.make_model(graph, doc_string=f"version tag {tag}")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def metadata(**overrides):
    base = {
        "feature_names": list(FEATURES),
        "converter": "onnxmltools",
        "objective": "binary",
        "metrics": {"recall_actions@50": 0.42},
        "gate": {"passed": True, "max_abs_diff": 0.0, "rows": 100},
    }
    base.update(overrides)
    return base


@pytest.fixture()
def registry(tmp_path):
    return ModelRegistry(tmp_path / "models")


def test_publish_grows_versions_and_moves_current(registry):
    assert registry.current(TENANT) is None
    assert registry.versions(TENANT) == []
    published = [registry.publish(TENANT, identity_model(i), metadata()) for i in range(3)]

    assert [v.version for v in published] == [1, 2, 3]
    assert [v.version for v in registry.versions(TENANT)] == [1, 2, 3]
    assert registry.current(TENANT) == published[-1]
    assert registry.tenants() == [TENANT]

    latest = registry.current(TENANT)
    assert latest.feature_names == tuple(FEATURES)
    assert latest.objective == "binary" and latest.converter == "onnxmltools"
    assert latest.metrics["recall_actions@50"] == pytest.approx(0.42)
    assert latest.sha256 == hashlib.sha256(identity_model(2)).hexdigest()
    assert latest.created_at.endswith("Z")

    loaded = registry.load(TENANT)
    assert loaded.version == 3
    assert loaded.onnx_bytes == identity_model(2)
    assert loaded.feature_names == tuple(FEATURES)
    assert loaded.metadata["tenant"] == TENANT and loaded.metadata["version"] == 3
    assert registry.load(TENANT, 1).onnx_bytes == identity_model(0)

    # The layout is the interface: an operator can read it with ls and cat.
    tenant_dir = registry.root / TENANT
    assert (tenant_dir / CURRENT_FILE).read_text().strip() == "3"
    assert (tenant_dir / "2" / MODEL_FILE).read_bytes() == identity_model(1)
    on_disk = json.loads((tenant_dir / "2" / METADATA_FILE).read_text())
    assert on_disk["sha256"] == hashlib.sha256(identity_model(1)).hexdigest()
    assert on_disk["gate"]["passed"] is True


def test_version_numbers_are_never_reused(registry):
    registry.publish(TENANT, identity_model(1), metadata())
    second = registry.publish(TENANT, identity_model(2), metadata())
    registry.rollback(TENANT)
    shutil.rmtree(second.path)

    third = registry.publish(TENANT, identity_model(3), metadata())

    assert third.version == 3
    assert [v.version for v in registry.versions(TENANT)] == [1, 3]
    assert (registry.root / TENANT / LAST_VERSION_FILE).read_text().strip() == "3"


def test_numpy_values_in_metadata_are_stored_as_json(registry):
    np = pytest.importorskip("numpy")
    version = registry.publish(
        TENANT,
        identity_model(),
        metadata(metrics={"ndcg@50": np.float32(0.5)}, importance=np.arange(3, dtype=np.float32)),
    )
    stored = json.loads((version.path / METADATA_FILE).read_text())
    assert stored["metrics"] == {"ndcg@50": 0.5}
    assert stored["importance"] == [0.0, 1.0, 2.0]


def test_reader_never_sees_a_missing_or_partial_model_while_publishing(registry):
    registry.publish(TENANT, identity_model(0), metadata())
    n_publishes = 60
    reader_started = threading.Event()
    writer_done = threading.Event()
    failures: list[BaseException] = []
    seen_versions: list[int] = []

    def reader() -> None:
        try:
            while True:
                finished = writer_done.is_set()
                current = registry.current(TENANT)
                loaded = registry.load(TENANT, current.version)
                assert loaded.metadata["version"] == current.version
                assert loaded.onnx_bytes == identity_model(current.version - 1)
                seen_versions.append(registry.load(TENANT).version)
                reader_started.set()
                if finished:
                    return
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            reader_started.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert reader_started.wait(timeout=30)
    try:
        for i in range(1, n_publishes + 1):
            registry.publish(TENANT, identity_model(i), metadata())
    finally:
        writer_done.set()
        thread.join(timeout=60)

    assert not thread.is_alive()
    assert failures == []
    assert seen_versions == sorted(seen_versions)  # CURRENT only moves forward here
    assert seen_versions[-1] == n_publishes + 1
    assert [v.version for v in registry.versions(TENANT)] == list(range(1, n_publishes + 2))
    assert not [p for p in (registry.root / TENANT).iterdir() if p.name.startswith(".publishing")]


def test_concurrent_publishers_get_distinct_versions(registry):
    n_threads, per_thread = 4, 10
    results: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def publisher(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            version = registry.publish(TENANT, identity_model(100 * k + i), metadata())
            with lock:
                results.append(version.version)

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(results) == list(range(1, n_threads * per_thread + 1))
    for version in registry.versions(TENANT):
        registry.load(TENANT, version.version)  # every version verifies


def test_rollback_to_previous_and_named_versions(registry):
    for i in range(3):
        registry.publish(TENANT, identity_model(i), metadata())

    assert registry.rollback(TENANT).version == 2
    assert registry.current(TENANT).version == 2
    assert registry.load(TENANT).onnx_bytes == identity_model(1)
    assert registry.rollback(TENANT).version == 1
    with pytest.raises(ModelError, match="oldest"):
        registry.rollback(TENANT)
    assert registry.rollback(TENANT, 3).version == 3
    with pytest.raises(ModelError, match=r"version 9: no such version \(known: 1, 2, 3\)"):
        registry.rollback(TENANT, 9)
    assert registry.current(TENANT).version == 3

    # A publish after a rollback still takes a fresh number.
    assert registry.publish(TENANT, identity_model(9), metadata()).version == 4


def test_rollback_without_any_model_is_refused(registry):
    with pytest.raises(ModelError, match="no model is published"):
        registry.rollback(TENANT)
    with pytest.raises(ModelError, match="no model published"):
        registry.load(TENANT)


def _two_versions(registry):
    registry.publish(TENANT, identity_model(1), metadata())
    return registry.publish(TENANT, identity_model(2), metadata())


def test_truncated_model_is_refused_and_previous_still_loads(registry):
    bad = _two_versions(registry)
    model_path = bad.path / MODEL_FILE
    model_path.write_bytes(model_path.read_bytes()[:20])

    with pytest.raises(ModelError, match="checksum mismatch") as excinfo:
        registry.load(TENANT)
    assert str(model_path) in str(excinfo.value)
    with pytest.raises(ModelError, match="cannot roll back"):
        registry.rollback(TENANT, bad.version)  # a rollback target must verify too
    assert registry.load(TENANT, 1).onnx_bytes == identity_model(1)
    assert registry.rollback(TENANT).version == 1
    assert registry.load(TENANT).version == 1


def test_mismatched_checksum_is_refused(registry):
    bad = _two_versions(registry)
    meta_path = bad.path / METADATA_FILE
    record = json.loads(meta_path.read_text())
    record["sha256"] = hashlib.sha256(b"some other model").hexdigest()
    meta_path.write_text(json.dumps(record))

    with pytest.raises(ModelError, match="checksum mismatch") as excinfo:
        registry.load(TENANT, bad.version)
    assert str(bad.path / MODEL_FILE) in str(excinfo.value)
    assert registry.load(TENANT, 1).version == 1


def test_corrupt_bytes_with_matching_checksum_fail_the_onnx_parse(registry):
    bad = _two_versions(registry)
    garbage = b"\xff\xfe not a protobuf \x00\x01" * 8
    (bad.path / MODEL_FILE).write_bytes(garbage)
    meta_path = bad.path / METADATA_FILE
    record = json.loads(meta_path.read_text())
    record["sha256"] = hashlib.sha256(garbage).hexdigest()
    meta_path.write_text(json.dumps(record))

    with pytest.raises(ModelError, match="not a valid ONNX model") as excinfo:
        registry.load(TENANT)
    assert str(bad.path / MODEL_FILE) in str(excinfo.value)
    assert registry.load(TENANT, 1).version == 1


def test_missing_files_are_named(registry):
    bad = _two_versions(registry)
    (bad.path / MODEL_FILE).unlink()
    with pytest.raises(ModelError, match="cannot read model") as excinfo:
        registry.load(TENANT)
    assert str(bad.path / MODEL_FILE) in str(excinfo.value)

    (bad.path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="invalid JSON") as excinfo:
        registry.load(TENANT)
    assert str(bad.path / METADATA_FILE) in str(excinfo.value)
    # Listing still works and says what is wrong with the broken version.
    listed = registry.versions(TENANT)
    assert listed[0].problem is None and "invalid JSON" in listed[1].problem


def test_current_pointing_at_a_deleted_version_is_an_error(registry):
    bad = _two_versions(registry)
    shutil.rmtree(bad.path)
    with pytest.raises(ModelError, match="does not exist"):
        registry.current(TENANT)
    (registry.root / TENANT / CURRENT_FILE).write_text("latest\n")
    with pytest.raises(ModelError, match="expected a positive version number"):
        registry.current(TENANT)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"gate": None}, "no passed validation gate"),
        ({"gate": {"passed": False, "max_abs_diff": 0.3}}, "no passed validation gate"),
        ({"gate": {"passed": "yes"}}, "no passed validation gate"),
        ({"feature_names": []}, "feature_names"),
        ({"feature_names": ["visits", 3]}, "feature_names"),
        ({"feature_names": ["visits", "visits"]}, "duplicates"),
        ({"sha256": "0" * 64}, "does not match the model bytes"),
        ({"trainer": object()}, "not JSON serialisable"),
    ],
)
def test_publish_refuses_bad_metadata(registry, meta, message):
    record = metadata(**meta)
    if meta == {"gate": None}:
        del record["gate"]
    with pytest.raises(ModelError, match=message):
        registry.publish(TENANT, identity_model(), record)
    assert registry.versions(TENANT) == []
    assert registry.current(TENANT) is None
    # A refused publish reserves no number.
    assert registry.publish(TENANT, identity_model(), metadata()).version == 1


@pytest.mark.parametrize("payload", [b"", b"\x08\x07garbage\xff\xff"])
def test_publish_refuses_bytes_that_are_not_onnx(registry, payload):
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        registry.publish(TENANT, payload, metadata())
    assert registry.versions(TENANT) == []


@pytest.mark.parametrize("tenant", ["../escape", "Home", "", "a/b", ".hidden", "x" * 65])
def test_tenant_names_must_be_safe_path_components(registry, tenant):
    with pytest.raises(ModelError, match="invalid tenant name"):
        registry.publish(tenant, identity_model(), metadata())
    with pytest.raises(ModelError, match="invalid tenant name"):
        registry.versions(tenant)
    assert not registry.root.exists() or registry.tenants() == []
