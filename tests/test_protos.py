"""The API contract: committed stubs match the protos, import inside the package, and every
service, method, message and field carries the comment that documents it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

import codegen  # tools/codegen.py, on the path through pytest's `pythonpath` setting
from walkrank_client import pb

# FileDescriptorProto / DescriptorProto / ServiceDescriptorProto field numbers, as used in
# SourceCodeInfo location paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def test_committed_stubs_match_protos() -> None:
    assert codegen.check() == []


def test_check_reports_drifted_missing_and_stray_stubs(tmp_path: Path) -> None:
    stale = tmp_path / "pb"
    shutil.copytree(codegen.PB_DIR, stale, ignore=shutil.ignore_patterns("__pycache__"))
    edited = stale / "walkrank" / "v1" / "recommender_pb2.py"
    edited.write_text(edited.read_text() + "# hand edit\n")
    (stale / "walkrank" / "v1" / "admin_pb2_grpc.py").unlink()
    (stale / "walkrank" / "v1" / "old_pb2.py").write_text("")

    assert codegen.check(stale) == [
        "walkrank/v1/admin_pb2_grpc.py: missing",
        "walkrank/v1/old_pb2.py: not generated from any proto",
        "walkrank/v1/recommender_pb2.py: differs",
    ]


def test_check_exit_status_of_main_is_zero_on_committed_stubs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert codegen.main(["--check"]) == 0
    assert "match" in capsys.readouterr().out


def test_stubs_import_relatively_inside_the_package() -> None:
    for path in codegen.PB_DIR.rglob("*.py*"):
        assert "from walkrank.v1 import" not in path.read_text(), path
    assert pb.recommender_pb2.RecommendRequest.__module__ == (
        "walkrank_client.pb.walkrank.v1.recommender_pb2"
    )
    # recommender.proto imports events.proto: the dependency resolves to the same module.
    assert pb.recommender_pb2_grpc.walkrank_dot_v1_dot_events__pb2 is pb.events_pb2


def test_services_and_methods_are_registered() -> None:
    recommender = pb.recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
    assert recommender.full_name == "walkrank.v1.Recommender"
    assert sorted(recommender.methods_by_name) == ["Recommend", "RecommendBatch", "ReportEvents"]
    assert recommender.methods_by_name["RecommendBatch"].server_streaming
    admin = pb.admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert sorted(admin.methods_by_name) == [
        "AddEdges",
        "GetTenant",
        "GraphInfo",
        "ListTenants",
        "Reload",
    ]
    assert admin.methods_by_name["AddEdges"].client_streaming


def test_optional_fields_track_presence() -> None:
    event = pb.events_pb2.Event(request_id="r", pin_id="7", event="click")
    assert not event.HasField("score")
    event.score = 0.0
    assert event.HasField("score")
    assert not pb.recommender_pb2.RecommendRequest().HasField("seed")
    assert pb.recommender_pb2.RecommendRequest(seed=0).HasField("seed")


def _with_source_info(tmp_path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path / "protos.binpb"
    codegen.run_protoc(
        [
            f"-I{codegen.PROTO_ROOT}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(f) for f in codegen.proto_files()),
        ]
    )
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def _documented_elements(
    file: descriptor_pb2.FileDescriptorProto,
) -> dict[tuple[int, ...], str]:
    """Path -> full name of every service, method, message, field, enum and enum value."""
    elements: dict[tuple[int, ...], str] = {}

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        elements[path] = f"{scope}.{e.name}"
        for i, value in enumerate(e.value):
            elements[(*path, _ENUM_VALUE, i)] = f"{scope}.{e.name}.{value.name}"

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = f"{scope}.{m.name}"
        elements[path] = name
        for i, field in enumerate(m.field):
            elements[(*path, _MESSAGE_FIELD, i)] = f"{name}.{field.name}"
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:  # a map field's entry type: generated, no source
                message((*path, _MESSAGE_NESTED, i), nested, name)
        for i, e in enumerate(m.enum_type):
            enum((*path, _MESSAGE_ENUM, i), e, name)

    for i, m in enumerate(file.message_type):
        message((_FILE_MESSAGE, i), m, file.package)
    for i, e in enumerate(file.enum_type):
        enum((_FILE_ENUM, i), e, file.package)
    for i, service in enumerate(file.service):
        elements[(_FILE_SERVICE, i)] = f"{file.package}.{service.name}"
        for j, method in enumerate(service.method):
            elements[(_FILE_SERVICE, i, _SERVICE_METHOD, j)] = (
                f"{file.package}.{service.name}.{method.name}"
            )
    return elements


def test_every_element_of_the_api_is_documented(tmp_path: Path) -> None:
    files = _with_source_info(tmp_path)
    assert {f.name for f in files} == {
        "walkrank/v1/admin.proto",
        "walkrank/v1/events.proto",
        "walkrank/v1/recommender.proto",
    }
    undocumented = []
    n_elements = 0
    for file in files:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
        }
        for path, name in _documented_elements(file).items():
            n_elements += 1
            if not comments.get(path):
                undocumented.append(name)
    assert n_elements > 100
    assert undocumented == []
