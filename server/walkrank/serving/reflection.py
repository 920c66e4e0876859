"""gRPC server reflection that also resolves fully qualified method names.

grpcurl and ghz ask reflection for the file containing `walkrank.v1.Recommender.Recommend`; the
stock grpcio-reflection servicer asks the descriptor pool, whose `FindFileContainingSymbol`
knows services, messages, fields and enums but not methods, and answers NOT_FOUND. Here a method
name is resolved to its service first. grpcio-reflection ships only `grpc.reflection.v1alpha`
(the version grpcurl 1.8 and ghz speak), so that is the one served.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection as stock
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

REFLECTION_SERVICE = stock.SERVICE_NAME


def owner_symbol(pool: descriptor_pool.DescriptorPool, name: str) -> str:
    """The symbol whose file holds `name`: the service for a method name, else `name` itself."""
    try:
        pool.FindFileContainingSymbol(name)
    except KeyError:
        service_name, _, method_name = name.rpartition(".")
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            return name
        if method_name in service.methods_by_name:
            return service.full_name
    return name


class ReflectionServicer(stock.ReflectionServicer):
    """Reflection for a `grpc.Server` whose `file_containing_symbol` also accepts method names."""

    _pool: descriptor_pool.DescriptorPool

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        return super()._file_containing_symbol(
            request, owner_symbol(self._pool, fully_qualified_name)
        )


def enable_reflection(
    server: grpc.Server,
    service_names: Iterable[str],
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Add reflection for `service_names` (fully qualified) and for reflection itself.

    The descriptors come from `pool` (default: the process-wide pool, which every imported
    generated `*_pb2` module registers its file in).
    """
    names = sorted({*service_names, REFLECTION_SERVICE})
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(names, pool=pool), server
    )
