from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "source", "memory_bytes", "active", "queued", "max_batch", "tokens_per_second")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    source: str
    memory_bytes: int
    active: int
    queued: int
    max_batch: int
    tokens_per_second: float
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., source: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., active: _Optional[int] = ..., queued: _Optional[int] = ..., max_batch: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class ActiveStream(_message.Message):
    __slots__ = ("principal", "model", "door", "seconds")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DOOR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    principal: str
    model: str
    door: str
    seconds: float
    def __init__(self, principal: _Optional[str] = ..., model: _Optional[str] = ..., door: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class RateSample(_message.Message):
    __slots__ = ("at", "tokens_per_second")
    AT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    at: float
    tokens_per_second: float
    def __init__(self, at: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class RefusalRecord(_message.Message):
    __slots__ = ("at", "principal", "reason", "model", "door")
    AT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DOOR_FIELD_NUMBER: _ClassVar[int]
    at: float
    principal: str
    reason: str
    model: str
    door: str
    def __init__(self, at: _Optional[float] = ..., principal: _Optional[str] = ..., reason: _Optional[str] = ..., model: _Optional[str] = ..., door: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "host", "state", "memory_bytes", "seconds_since_heartbeat")
    RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    host: str
    state: str
    memory_bytes: int
    seconds_since_heartbeat: float
    def __init__(self, rank: _Optional[int] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("server", "uptime_seconds", "draining", "models", "active", "tokens_per_second", "recent_refusals", "ranks", "outcomes", "cluster_backend")
    class OutcomesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVER_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RECENT_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    server: str
    uptime_seconds: float
    draining: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    active: _containers.RepeatedCompositeFieldContainer[ActiveStream]
    tokens_per_second: _containers.RepeatedCompositeFieldContainer[RateSample]
    recent_refusals: _containers.RepeatedCompositeFieldContainer[RefusalRecord]
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    outcomes: _containers.ScalarMap[str, int]
    cluster_backend: str
    def __init__(self, server: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., draining: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., active: _Optional[_Iterable[_Union[ActiveStream, _Mapping]]] = ..., tokens_per_second: _Optional[_Iterable[_Union[RateSample, _Mapping]]] = ..., recent_refusals: _Optional[_Iterable[_Union[RefusalRecord, _Mapping]]] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., outcomes: _Optional[_Mapping[str, int]] = ..., cluster_backend: _Optional[str] = ...) -> None: ...
