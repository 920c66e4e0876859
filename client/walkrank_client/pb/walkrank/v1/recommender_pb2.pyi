from . import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class User(_message.Message):
    __slots__ = ("id", "locale", "interests")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    INTERESTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    locale: str
    interests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., locale: _Optional[str] = ..., interests: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryPin(_message.Message):
    __slots__ = ("pin_id", "weight")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    weight: float
    def __init__(self, pin_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class UserAction(_message.Message):
    __slots__ = ("pin_id", "action", "time")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    action: str
    time: float
    def __init__(self, pin_id: _Optional[str] = ..., action: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("tenant", "request_id", "user", "query_pins", "num_results", "exclude_pins", "seed", "request_time", "actions", "features", "extra_candidates")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    QUERY_PINS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PINS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request_id: str
    user: User
    query_pins: _containers.RepeatedCompositeFieldContainer[QueryPin]
    num_results: int
    exclude_pins: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    request_time: float
    actions: _containers.RepeatedCompositeFieldContainer[UserAction]
    features: _containers.ScalarMap[str, float]
    extra_candidates: _containers.RepeatedCompositeFieldContainer[ExtraCandidate]
    def __init__(self, tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., query_pins: _Optional[_Iterable[_Union[QueryPin, _Mapping]]] = ..., num_results: _Optional[int] = ..., exclude_pins: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., request_time: _Optional[float] = ..., actions: _Optional[_Iterable[_Union[UserAction, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., extra_candidates: _Optional[_Iterable[_Union[ExtraCandidate, _Mapping]]] = ...) -> None: ...

class ExtraCandidate(_message.Message):
    __slots__ = ("pin_id", "source")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    source: str
    def __init__(self, pin_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("pin_id", "score", "visit_count", "rank", "walk_score", "source", "propensity")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VISIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WALK_SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROPENSITY_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    score: float
    visit_count: int
    rank: int
    walk_score: float
    source: str
    propensity: float
    def __init__(self, pin_id: _Optional[str] = ..., score: _Optional[float] = ..., visit_count: _Optional[int] = ..., rank: _Optional[int] = ..., walk_score: _Optional[float] = ..., source: _Optional[str] = ..., propensity: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("walk_ms", "features_ms", "scoring_ms", "total_ms", "queue_ms")
    WALK_MS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_MS_FIELD_NUMBER: _ClassVar[int]
    SCORING_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    walk_ms: float
    features_ms: float
    scoring_ms: float
    total_ms: float
    queue_ms: float
    def __init__(self, walk_ms: _Optional[float] = ..., features_ms: _Optional[float] = ..., scoring_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("request_id", "candidates", "model_version", "unknown_query_pins", "timing", "tenant", "empty_reason", "candidates_generated", "arm")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_QUERY_PINS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EMPTY_REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model_version: str
    unknown_query_pins: _containers.RepeatedScalarFieldContainer[str]
    timing: Timing
    tenant: str
    empty_reason: str
    candidates_generated: int
    arm: str
    def __init__(self, request_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model_version: _Optional[str] = ..., unknown_query_pins: _Optional[_Iterable[str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., tenant: _Optional[str] = ..., empty_reason: _Optional[str] = ..., candidates_generated: _Optional[int] = ..., arm: _Optional[str] = ...) -> None: ...

class BatchUser(_message.Message):
    __slots__ = ("request_id", "user", "query_pins", "exclude_pins", "request_time", "actions", "features", "extra_candidates")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    QUERY_PINS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PINS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user: User
    query_pins: _containers.RepeatedCompositeFieldContainer[QueryPin]
    exclude_pins: _containers.RepeatedScalarFieldContainer[str]
    request_time: float
    actions: _containers.RepeatedCompositeFieldContainer[UserAction]
    features: _containers.ScalarMap[str, float]
    extra_candidates: _containers.RepeatedCompositeFieldContainer[ExtraCandidate]
    def __init__(self, request_id: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., query_pins: _Optional[_Iterable[_Union[QueryPin, _Mapping]]] = ..., exclude_pins: _Optional[_Iterable[str]] = ..., request_time: _Optional[float] = ..., actions: _Optional[_Iterable[_Union[UserAction, _Mapping]]] = ..., features: _Optional[_Mapping[str, float]] = ..., extra_candidates: _Optional[_Iterable[_Union[ExtraCandidate, _Mapping]]] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("tenant", "users", "num_results", "seed")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    users: _containers.RepeatedCompositeFieldContainer[BatchUser]
    num_results: int
    seed: int
    def __init__(self, tenant: _Optional[str] = ..., users: _Optional[_Iterable[_Union[BatchUser, _Mapping]]] = ..., num_results: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...
