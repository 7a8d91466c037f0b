from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from backstop._proto import resilience_pb2 as _resilience_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeferRequest(_message.Message):
    __slots__ = ("queue", "payload", "metadata", "idempotency_key", "not_before", "max_attempts", "estimated_tokens", "required_context_tokens")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    payload: bytes
    metadata: _containers.ScalarMap[str, str]
    idempotency_key: str
    not_before: _timestamp_pb2.Timestamp
    max_attempts: int
    estimated_tokens: int
    required_context_tokens: int
    def __init__(self, queue: _Optional[str] = ..., payload: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., not_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., max_attempts: _Optional[int] = ..., estimated_tokens: _Optional[int] = ..., required_context_tokens: _Optional[int] = ...) -> None: ...

class DeferResponse(_message.Message):
    __slots__ = ("id", "duplicate", "depth", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    duplicate: bool
    depth: int
    message: str
    def __init__(self, id: _Optional[str] = ..., duplicate: bool = ..., depth: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("queue", "max_items", "lease", "wait", "worker", "priority")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    queue: str
    max_items: int
    lease: _duration_pb2.Duration
    wait: _duration_pb2.Duration
    worker: str
    priority: _resilience_pb2.Priority
    def __init__(self, queue: _Optional[str] = ..., max_items: _Optional[int] = ..., lease: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., wait: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., worker: _Optional[str] = ..., priority: _Optional[_Union[_resilience_pb2.Priority, str]] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("items", "blocked_reason", "retry_after")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DeferredItem]
    blocked_reason: _resilience_pb2.Reason
    retry_after: _duration_pb2.Duration
    def __init__(self, items: _Optional[_Iterable[_Union[DeferredItem, _Mapping]]] = ..., blocked_reason: _Optional[_Union[_resilience_pb2.Reason, str]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DeferredItem(_message.Message):
    __slots__ = ("id", "queue", "payload", "metadata", "lease_token", "attempt", "max_attempts", "enqueued_at", "lease_expires_at", "last_error", "target", "permit", "key_slot", "dead_lettered_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PERMIT_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    queue: str
    payload: bytes
    metadata: _containers.ScalarMap[str, str]
    lease_token: str
    attempt: int
    max_attempts: int
    enqueued_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    last_error: str
    target: str
    permit: str
    key_slot: str
    dead_lettered_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., queue: _Optional[str] = ..., payload: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., lease_token: _Optional[str] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., enqueued_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., target: _Optional[str] = ..., permit: _Optional[str] = ..., key_slot: _Optional[str] = ..., dead_lettered_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("id", "lease_token")
    ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    lease_token: str
    def __init__(self, id: _Optional[str] = ..., lease_token: _Optional[str] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NackRequest(_message.Message):
    __slots__ = ("id", "lease_token", "delay", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    lease_token: str
    delay: _duration_pb2.Duration
    reason: str
    def __init__(self, id: _Optional[str] = ..., lease_token: _Optional[str] = ..., delay: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class NackResponse(_message.Message):
    __slots__ = ("dead_lettered", "attempt")
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    dead_lettered: bool
    attempt: int
    def __init__(self, dead_lettered: bool = ..., attempt: _Optional[int] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("queue", "page_size", "page_token")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    queue: str
    page_size: int
    page_token: str
    def __init__(self, queue: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DeferredItem]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[DeferredItem, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RequeueRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RequeueResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueStatsRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class QueueStatsResponse(_message.Message):
    __slots__ = ("queues",)
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueStat]
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueStat, _Mapping]]] = ...) -> None: ...

class QueueStat(_message.Message):
    __slots__ = ("queue", "depth", "in_flight", "dead_letters", "oldest_age", "bytes")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    queue: str
    depth: int
    in_flight: int
    dead_letters: int
    oldest_age: _duration_pb2.Duration
    bytes: int
    def __init__(self, queue: _Optional[str] = ..., depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., dead_letters: _Optional[int] = ..., oldest_age: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., bytes: _Optional[int] = ...) -> None: ...
