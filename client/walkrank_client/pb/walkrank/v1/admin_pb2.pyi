from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TenantSummary(_message.Message):
    __slots__ = ("name", "model_version", "config_file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: str
    config_file: str
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[str] = ..., config_file: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantSummary]
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantSummary, _Mapping]]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TenantCounters(_message.Message):
    __slots__ = ("requests", "errors", "in_flight", "events_accepted", "events_rejected")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    in_flight: int
    events_accepted: int
    events_rejected: int
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., in_flight: _Optional[int] = ..., events_accepted: _Optional[int] = ..., events_rejected: _Optional[int] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ("name", "config_yaml", "config_file", "model_version", "model_engine", "counters", "last_reload_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ENGINE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_yaml: str
    config_file: str
    model_version: str
    model_engine: str
    counters: TenantCounters
    last_reload_error: str
    def __init__(self, name: _Optional[str] = ..., config_yaml: _Optional[str] = ..., config_file: _Optional[str] = ..., model_version: _Optional[str] = ..., model_engine: _Optional[str] = ..., counters: _Optional[_Union[TenantCounters, _Mapping]] = ..., last_reload_error: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadChange(_message.Message):
    __slots__ = ("tenant", "kind", "detail")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    kind: str
    detail: str
    def __init__(self, tenant: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class FileError(_message.Message):
    __slots__ = ("path", "message")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    path: str
    message: str
    def __init__(self, path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("changes", "errors")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[ReloadChange]
    errors: _containers.RepeatedCompositeFieldContainer[FileError]
    def __init__(self, changes: _Optional[_Iterable[_Union[ReloadChange, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[FileError, _Mapping]]] = ...) -> None: ...

class GraphInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GraphInfoResponse(_message.Message):
    __slots__ = ("path", "n_pins", "n_boards", "n_edges", "locales", "topics", "manifest_json", "version", "repository")
    PATH_FIELD_NUMBER: _ClassVar[int]
    N_PINS_FIELD_NUMBER: _ClassVar[int]
    N_BOARDS_FIELD_NUMBER: _ClassVar[int]
    N_EDGES_FIELD_NUMBER: _ClassVar[int]
    LOCALES_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    path: str
    n_pins: int
    n_boards: int
    n_edges: int
    locales: _containers.RepeatedScalarFieldContainer[str]
    topics: _containers.RepeatedScalarFieldContainer[str]
    manifest_json: str
    version: str
    repository: str
    def __init__(self, path: _Optional[str] = ..., n_pins: _Optional[int] = ..., n_boards: _Optional[int] = ..., n_edges: _Optional[int] = ..., locales: _Optional[_Iterable[str]] = ..., topics: _Optional[_Iterable[str]] = ..., manifest_json: _Optional[str] = ..., version: _Optional[str] = ..., repository: _Optional[str] = ...) -> None: ...

class NewEdge(_message.Message):
    __slots__ = ("pin_id", "board_id", "created_at")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    BOARD_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    board_id: str
    created_at: float
    def __init__(self, pin_id: _Optional[str] = ..., board_id: _Optional[str] = ..., created_at: _Optional[float] = ...) -> None: ...

class AddEdgesRequest(_message.Message):
    __slots__ = ("edges",)
    EDGES_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[NewEdge]
    def __init__(self, edges: _Optional[_Iterable[_Union[NewEdge, _Mapping]]] = ...) -> None: ...

class AddEdgesResponse(_message.Message):
    __slots__ = ("added", "duplicates", "new_pins", "new_boards", "delta_edges", "max_edges")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    NEW_PINS_FIELD_NUMBER: _ClassVar[int]
    NEW_BOARDS_FIELD_NUMBER: _ClassVar[int]
    DELTA_EDGES_FIELD_NUMBER: _ClassVar[int]
    MAX_EDGES_FIELD_NUMBER: _ClassVar[int]
    added: int
    duplicates: int
    new_pins: int
    new_boards: int
    delta_edges: int
    max_edges: int
    def __init__(self, added: _Optional[int] = ..., duplicates: _Optional[int] = ..., new_pins: _Optional[int] = ..., new_boards: _Optional[int] = ..., delta_edges: _Optional[int] = ..., max_edges: _Optional[int] = ...) -> None: ...
