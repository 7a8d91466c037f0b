from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_FORCED_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_FORCED_CLOSED: _ClassVar[BreakerState]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_ALLOWED: _ClassVar[Reason]
    REASON_CIRCUIT_OPEN: _ClassVar[Reason]
    REASON_PROBE_LIMIT: _ClassVar[Reason]
    REASON_FORCED_OPEN: _ClassVar[Reason]
    REASON_RATE_LIMITED: _ClassVar[Reason]
    REASON_CONCURRENCY_LIMIT: _ClassVar[Reason]
    REASON_RETRY_BUDGET_EXHAUSTED: _ClassVar[Reason]
    REASON_KEY_SLOTS_UNAVAILABLE: _ClassVar[Reason]
    REASON_REQUEST_TOO_LARGE: _ClassVar[Reason]
    REASON_EXCLUDED: _ClassVar[Reason]
    REASON_CONTEXT_TOO_SMALL: _ClassVar[Reason]
    REASON_PRIORITY_RESERVED: _ClassVar[Reason]
    REASON_SPEND_LIMIT: _ClassVar[Reason]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_DEFAULT: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class RouteStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_STRATEGY_UNSPECIFIED: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_ORDERED: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_WEIGHTED: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_LEAST_BUSY: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_LOWEST_LATENCY: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_LOWEST_COST: _ClassVar[RouteStrategy]
    ROUTE_STRATEGY_MOST_HEADROOM: _ClassVar[RouteStrategy]

class OutcomeClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_CLASS_UNSPECIFIED: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_SUCCESS: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_TRANSIENT: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_RATE_LIMITED: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_PERSISTENT: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_BAD_INPUT: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_PARTIAL: _ClassVar[OutcomeClass]
    OUTCOME_CLASS_TIMEOUT: _ClassVar[OutcomeClass]

class RequestResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_RESULT_UNSPECIFIED: _ClassVar[RequestResult]
    REQUEST_RESULT_COMPLETED: _ClassVar[RequestResult]
    REQUEST_RESULT_DEFERRED: _ClassVar[RequestResult]
    REQUEST_RESULT_FAILED: _ClassVar[RequestResult]

class RetryReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRY_REASON_UNSPECIFIED: _ClassVar[RetryReason]
    RETRY_REASON_SUCCEEDED: _ClassVar[RetryReason]
    RETRY_REASON_RETRYABLE: _ClassVar[RetryReason]
    RETRY_REASON_PERSISTENT: _ClassVar[RetryReason]
    RETRY_REASON_BAD_INPUT: _ClassVar[RetryReason]
    RETRY_REASON_MAX_RETRIES: _ClassVar[RetryReason]
    RETRY_REASON_RETRY_BUDGET_EXHAUSTED: _ClassVar[RetryReason]
    RETRY_REASON_CORRECT_AND_RETRY: _ClassVar[RetryReason]
    RETRY_REASON_CIRCUIT_OPEN: _ClassVar[RetryReason]
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState
BREAKER_STATE_FORCED_OPEN: BreakerState
BREAKER_STATE_FORCED_CLOSED: BreakerState
REASON_UNSPECIFIED: Reason
REASON_ALLOWED: Reason
REASON_CIRCUIT_OPEN: Reason
REASON_PROBE_LIMIT: Reason
REASON_FORCED_OPEN: Reason
REASON_RATE_LIMITED: Reason
REASON_CONCURRENCY_LIMIT: Reason
REASON_RETRY_BUDGET_EXHAUSTED: Reason
REASON_KEY_SLOTS_UNAVAILABLE: Reason
REASON_REQUEST_TOO_LARGE: Reason
REASON_EXCLUDED: Reason
REASON_CONTEXT_TOO_SMALL: Reason
REASON_PRIORITY_RESERVED: Reason
REASON_SPEND_LIMIT: Reason
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_DEFAULT: Priority
PRIORITY_BATCH: Priority
ROUTE_STRATEGY_UNSPECIFIED: RouteStrategy
ROUTE_STRATEGY_ORDERED: RouteStrategy
ROUTE_STRATEGY_WEIGHTED: RouteStrategy
ROUTE_STRATEGY_LEAST_BUSY: RouteStrategy
ROUTE_STRATEGY_LOWEST_LATENCY: RouteStrategy
ROUTE_STRATEGY_LOWEST_COST: RouteStrategy
ROUTE_STRATEGY_MOST_HEADROOM: RouteStrategy
OUTCOME_CLASS_UNSPECIFIED: OutcomeClass
OUTCOME_CLASS_SUCCESS: OutcomeClass
OUTCOME_CLASS_TRANSIENT: OutcomeClass
OUTCOME_CLASS_RATE_LIMITED: OutcomeClass
OUTCOME_CLASS_PERSISTENT: OutcomeClass
OUTCOME_CLASS_BAD_INPUT: OutcomeClass
OUTCOME_CLASS_PARTIAL: OutcomeClass
OUTCOME_CLASS_TIMEOUT: OutcomeClass
REQUEST_RESULT_UNSPECIFIED: RequestResult
REQUEST_RESULT_COMPLETED: RequestResult
REQUEST_RESULT_DEFERRED: RequestResult
REQUEST_RESULT_FAILED: RequestResult
RETRY_REASON_UNSPECIFIED: RetryReason
RETRY_REASON_SUCCEEDED: RetryReason
RETRY_REASON_RETRYABLE: RetryReason
RETRY_REASON_PERSISTENT: RetryReason
RETRY_REASON_BAD_INPUT: RetryReason
RETRY_REASON_MAX_RETRIES: RetryReason
RETRY_REASON_RETRY_BUDGET_EXHAUSTED: RetryReason
RETRY_REASON_CORRECT_AND_RETRY: RetryReason
RETRY_REASON_CIRCUIT_OPEN: RetryReason

class CanProceedRequest(_message.Message):
    __slots__ = ("target", "caller", "estimated_tokens", "attempt", "priority", "max_output_tokens", "request_id")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    target: str
    caller: str
    estimated_tokens: int
    attempt: int
    priority: Priority
    max_output_tokens: int
    request_id: str
    def __init__(self, target: _Optional[str] = ..., caller: _Optional[str] = ..., estimated_tokens: _Optional[int] = ..., attempt: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., max_output_tokens: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class CanProceedResponse(_message.Message):
    __slots__ = ("allowed", "reason", "state", "retry_after", "permit", "key_slot", "shadow_reason", "degraded")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    PERMIT_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_REASON_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: Reason
    state: BreakerState
    retry_after: _duration_pb2.Duration
    permit: str
    key_slot: str
    shadow_reason: Reason
    degraded: bool
    def __init__(self, allowed: bool = ..., reason: _Optional[_Union[Reason, str]] = ..., state: _Optional[_Union[BreakerState, str]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., permit: _Optional[str] = ..., key_slot: _Optional[str] = ..., shadow_reason: _Optional[_Union[Reason, str]] = ..., degraded: bool = ...) -> None: ...

class RecordOutcomeRequest(_message.Message):
    __slots__ = ("target", "permit", "outcome", "http_status", "error_type", "latency", "retry_after", "input_tokens", "output_tokens", "attempt", "headers", "key_slot", "caller", "request_id", "finish")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PERMIT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    target: str
    permit: str
    outcome: OutcomeClass
    http_status: int
    error_type: str
    latency: _duration_pb2.Duration
    retry_after: _duration_pb2.Duration
    input_tokens: int
    output_tokens: int
    attempt: int
    headers: _containers.ScalarMap[str, str]
    key_slot: str
    caller: str
    request_id: str
    finish: RequestResult
    def __init__(self, target: _Optional[str] = ..., permit: _Optional[str] = ..., outcome: _Optional[_Union[OutcomeClass, str]] = ..., http_status: _Optional[int] = ..., error_type: _Optional[str] = ..., latency: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., attempt: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., key_slot: _Optional[str] = ..., caller: _Optional[str] = ..., request_id: _Optional[str] = ..., finish: _Optional[_Union[RequestResult, str]] = ...) -> None: ...

class FinishRequestRequest(_message.Message):
    __slots__ = ("request_id", "result", "route", "elapsed", "attempts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: RequestResult
    route: str
    elapsed: _duration_pb2.Duration
    attempts: int
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[RequestResult, str]] = ..., route: _Optional[str] = ..., elapsed: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class FinishRequestResponse(_message.Message):
    __slots__ = ("tracked", "duplicate", "duration", "attempts", "route")
    TRACKED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    tracked: bool
    duplicate: bool
    duration: _duration_pb2.Duration
    attempts: int
    route: str
    def __init__(self, tracked: bool = ..., duplicate: bool = ..., duration: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., attempts: _Optional[int] = ..., route: _Optional[str] = ...) -> None: ...

class RecordOutcomeResponse(_message.Message):
    __slots__ = ("classified_as", "state", "retry", "stale_permit", "duplicate", "degraded", "cost")
    CLASSIFIED_AS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    STALE_PERMIT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    classified_as: OutcomeClass
    state: BreakerState
    retry: RetryAdvice
    stale_permit: bool
    duplicate: bool
    degraded: bool
    cost: float
    def __init__(self, classified_as: _Optional[_Union[OutcomeClass, str]] = ..., state: _Optional[_Union[BreakerState, str]] = ..., retry: _Optional[_Union[RetryAdvice, _Mapping]] = ..., stale_permit: bool = ..., duplicate: bool = ..., degraded: bool = ..., cost: _Optional[float] = ...) -> None: ...

class RetryAdvice(_message.Message):
    __slots__ = ("retry", "delay", "reason")
    RETRY_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry: bool
    delay: _duration_pb2.Duration
    reason: RetryReason
    def __init__(self, retry: bool = ..., delay: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[_Union[RetryReason, str]] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("route", "candidates", "estimated_tokens", "required_context_tokens", "exclude", "caller", "attempt", "strategy", "expected_output_tokens", "priority", "max_output_tokens", "request_id")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    route: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    estimated_tokens: int
    required_context_tokens: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    caller: str
    attempt: int
    strategy: RouteStrategy
    expected_output_tokens: int
    priority: Priority
    max_output_tokens: int
    request_id: str
    def __init__(self, route: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ..., estimated_tokens: _Optional[int] = ..., required_context_tokens: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., caller: _Optional[str] = ..., attempt: _Optional[int] = ..., strategy: _Optional[_Union[RouteStrategy, str]] = ..., expected_output_tokens: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., max_output_tokens: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("target", "permit", "fallback_depth", "skipped", "max_tokens", "cost_per_mtok_input", "cost_per_mtok_output", "retry_after", "key_slot", "state", "degraded", "strategy", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PERMIT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_MTOK_INPUT_FIELD_NUMBER: _ClassVar[int]
    COST_PER_MTOK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    permit: str
    fallback_depth: int
    skipped: _containers.RepeatedCompositeFieldContainer[Skip]
    max_tokens: int
    cost_per_mtok_input: float
    cost_per_mtok_output: float
    retry_after: _duration_pb2.Duration
    key_slot: str
    state: BreakerState
    degraded: bool
    strategy: RouteStrategy
    reason: str
    def __init__(self, target: _Optional[str] = ..., permit: _Optional[str] = ..., fallback_depth: _Optional[int] = ..., skipped: _Optional[_Iterable[_Union[Skip, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., cost_per_mtok_input: _Optional[float] = ..., cost_per_mtok_output: _Optional[float] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., key_slot: _Optional[str] = ..., state: _Optional[_Union[BreakerState, str]] = ..., degraded: bool = ..., strategy: _Optional[_Union[RouteStrategy, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Skip(_message.Message):
    __slots__ = ("target", "reason", "retry_after")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    target: str
    reason: Reason
    retry_after: _duration_pb2.Duration
    def __init__(self, target: _Optional[str] = ..., reason: _Optional[_Union[Reason, str]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CanProceedBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CanProceedRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[CanProceedRequest, _Mapping]]] = ...) -> None: ...

class CanProceedBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CanProceedResult]
    def __init__(self, items: _Optional[_Iterable[_Union[CanProceedResult, _Mapping]]] = ...) -> None: ...

class CanProceedResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: CanProceedResponse
    error: ItemError
    def __init__(self, ok: _Optional[_Union[CanProceedResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class RecordOutcomeBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecordOutcomeRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[RecordOutcomeRequest, _Mapping]]] = ...) -> None: ...

class RecordOutcomeBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecordOutcomeResult]
    def __init__(self, items: _Optional[_Iterable[_Union[RecordOutcomeResult, _Mapping]]] = ...) -> None: ...

class RecordOutcomeResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: RecordOutcomeResponse
    error: ItemError
    def __init__(self, ok: _Optional[_Union[RecordOutcomeResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("id", "can_proceed", "record_outcome", "route", "deadline", "traceparent")
    ID_FIELD_NUMBER: _ClassVar[int]
    CAN_PROCEED_FIELD_NUMBER: _ClassVar[int]
    RECORD_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    id: int
    can_proceed: CanProceedRequest
    record_outcome: RecordOutcomeRequest
    route: RouteRequest
    deadline: _duration_pb2.Duration
    traceparent: str
    def __init__(self, id: _Optional[int] = ..., can_proceed: _Optional[_Union[CanProceedRequest, _Mapping]] = ..., record_outcome: _Optional[_Union[RecordOutcomeRequest, _Mapping]] = ..., route: _Optional[_Union[RouteRequest, _Mapping]] = ..., deadline: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("id", "can_proceed", "record_outcome", "route", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    CAN_PROCEED_FIELD_NUMBER: _ClassVar[int]
    RECORD_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    can_proceed: CanProceedResponse
    record_outcome: RecordOutcomeResponse
    route: RouteResponse
    error: ItemError
    def __init__(self, id: _Optional[int] = ..., can_proceed: _Optional[_Union[CanProceedResponse, _Mapping]] = ..., record_outcome: _Optional[_Union[RecordOutcomeResponse, _Mapping]] = ..., route: _Optional[_Union[RouteResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...
