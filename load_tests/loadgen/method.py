"""Resolve a ghz `call` to request/response message classes, the two ways ghz does.

With `proto` (and `import-paths`) the .proto files are compiled here with grpc_tools' protoc
into a private descriptor pool; without it the server's reflection service is asked, as ghz
does. Nothing is taken from the committed stubs, so a config that works here works for ghz.
"""

from __future__ import annotations

import importlib.resources
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from loadgen.ghz_config import GhzConfig
from walkrank.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What a call needs on the wire: its path, message classes and streaming shape."""

    path: str  # "/package.Service/Method"
    request_class: type[Message]
    response_class: type[Message]
    server_streaming: bool
    client_streaming: bool
    input_name: str
    output_name: str


def _from_pool(pool: descriptor_pool.DescriptorPool, config: GhzConfig, origin: str) -> MethodSpec:
    try:
        service = pool.FindServiceByName(config.service)
    except KeyError:
        raise ConfigError(
            f"{config.source}: call: service {config.service!r} not found in {origin}"
        ) from None
    method = service.methods_by_name.get(config.method)
    if method is None:
        known = ", ".join(sorted(service.methods_by_name))
        raise ConfigError(
            f"{config.source}: call: {config.service} has no method "
            f"{config.method!r} (it has {known})"
        )
    if method.client_streaming:
        raise ConfigError(
            f"{config.source}: call: client-streaming methods are not supported "
            f"by the built-in generator"
        )
    return MethodSpec(
        path=f"/{service.full_name}/{method.name}",
        request_class=message_factory.GetMessageClass(method.input_type),
        response_class=message_factory.GetMessageClass(method.output_type),
        server_streaming=method.server_streaming,
        client_streaming=method.client_streaming,
        input_name=method.input_type.name,
        output_name=method.output_type.name,
    )


def from_proto(config: GhzConfig) -> MethodSpec:
    """Compile `config.proto` (ghz adds the proto's own directory to the import paths)."""
    from grpc_tools import protoc

    assert config.proto is not None
    include = [*config.import_paths, config.proto.parent]
    relative = next(
        (config.proto.relative_to(p) for p in include if config.proto.is_relative_to(p)),
        config.proto.name,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        # grpc_tools ships the well-known types (google/protobuf/*.proto) as `_proto`.
        well_known = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "protoc",
            *(f"-I{p}" for p in include),
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            str(relative),
        ]
        if protoc.main(args) != 0 or not out.exists():
            raise ConfigError(
                f"{config.source}: proto: protoc could not compile {config.proto} "
                f"with import paths {[str(p) for p in include]}"
            )
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return _from_pool(pool, config, str(config.proto))


def from_reflection(config: GhzConfig, target: str) -> MethodSpec:
    """Ask the server's reflection service for the file holding the method symbol."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        try:
            # ghz asks for the method's fully qualified name; a server must resolve it.
            database.FindFileContainingSymbol(config.call)
        except KeyError:
            raise ConfigError(
                f"{config.source}: call: server reflection at {target} does not "
                f"know {config.call!r}"
            ) from None
        except grpc.RpcError as exc:
            raise ConfigError(
                f"{config.source}: server reflection at {target} failed: "
                f"{exc.code().name} {exc.details()}"
            ) from None
        pool = descriptor_pool.DescriptorPool(database)
        return _from_pool(pool, config, f"server reflection at {target}")


def resolve_method(config: GhzConfig, target: str) -> MethodSpec:
    return from_reflection(config, target) if config.uses_reflection else from_proto(config)
