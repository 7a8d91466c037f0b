from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from backstop._proto import resilience_pb2 as _resilience_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_MODE_UNSPECIFIED: _ClassVar[BreakerMode]
    BREAKER_MODE_AUTOMATIC: _ClassVar[BreakerMode]
    BREAKER_MODE_FORCE_OPEN: _ClassVar[BreakerMode]
    BREAKER_MODE_FORCE_CLOSED: _ClassVar[BreakerMode]
BREAKER_MODE_UNSPECIFIED: BreakerMode
BREAKER_MODE_AUTOMATIC: BreakerMode
BREAKER_MODE_FORCE_OPEN: BreakerMode
BREAKER_MODE_FORCE_CLOSED: BreakerMode

class GetClusterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadConfigRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ReloadConfigResponse(_message.Message):
    __slots__ = ("digest", "previous_digest", "added", "removed", "changed", "routes_changed", "needs_restart")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ROUTES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_RESTART_FIELD_NUMBER: _ClassVar[int]
    digest: str
    previous_digest: str
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    routes_changed: _containers.RepeatedScalarFieldContainer[str]
    needs_restart: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digest: _Optional[str] = ..., previous_digest: _Optional[str] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., routes_changed: _Optional[_Iterable[str]] = ..., needs_restart: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("replica_id", "mode", "redis_reachable", "redis_role", "redis_rtt", "degraded", "replicas", "config_digest")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REDIS_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    REDIS_ROLE_FIELD_NUMBER: _ClassVar[int]
    REDIS_RTT_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    mode: str
    redis_reachable: bool
    redis_role: str
    redis_rtt: _duration_pb2.Duration
    degraded: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    config_digest: str
    def __init__(self, replica_id: _Optional[str] = ..., mode: _Optional[str] = ..., redis_reachable: bool = ..., redis_role: _Optional[str] = ..., redis_rtt: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., degraded: bool = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., config_digest: _Optional[str] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("id", "address", "last_heartbeat", "config_digest")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    last_heartbeat: _timestamp_pb2.Timestamp
    config_digest: str
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., last_heartbeat: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., config_digest: _Optional[str] = ...) -> None: ...

class ListTargetsRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTargetsResponse(_message.Message):
    __slots__ = ("targets", "next_page_token", "total")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[TargetSummary]
    next_page_token: str
    total: int
    def __init__(self, targets: _Optional[_Iterable[_Union[TargetSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class TargetSummary(_message.Message):
    __slots__ = ("target", "state", "configured", "open_until", "consecutive_failures")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    target: str
    state: _resilience_pb2.BreakerState
    configured: bool
    open_until: _timestamp_pb2.Timestamp
    consecutive_failures: int
    def __init__(self, target: _Optional[str] = ..., state: _Optional[_Union[_resilience_pb2.BreakerState, str]] = ..., configured: bool = ..., open_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., consecutive_failures: _Optional[int] = ...) -> None: ...

class GetTargetRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class SetBreakerStateRequest(_message.Message):
    __slots__ = ("target", "mode", "reason")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    target: str
    mode: BreakerMode
    reason: str
    def __init__(self, target: _Optional[str] = ..., mode: _Optional[_Union[BreakerMode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ResetTargetRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class TargetStatus(_message.Message):
    __slots__ = ("target", "state", "configured", "open_until", "consecutive_failures", "half_open_successes", "probes_outstanding", "reopen_count", "generation", "counters", "window_calls", "window_failures", "settings", "key_slots", "forced_reason", "opened_at", "last_cause", "in_flight", "group_budgets", "latency", "spend", "adaptive_concurrency", "distinct_failing_callers")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    HALF_OPEN_SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    PROBES_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    REOPEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CALLS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FAILURES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    FORCED_REASON_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_CAUSE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_FAILING_CALLERS_FIELD_NUMBER: _ClassVar[int]
    target: str
    state: _resilience_pb2.BreakerState
    configured: bool
    open_until: _timestamp_pb2.Timestamp
    consecutive_failures: int
    half_open_successes: int
    probes_outstanding: int
    reopen_count: int
    generation: int
    counters: OutcomeCounters
    window_calls: int
    window_failures: int
    settings: TargetSettings
    key_slots: _containers.RepeatedCompositeFieldContainer[KeySlotStatus]
    forced_reason: str
    opened_at: _timestamp_pb2.Timestamp
    last_cause: str
    in_flight: int
    group_budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    latency: _duration_pb2.Duration
    spend: SpendStatus
    adaptive_concurrency: AdaptiveLimit
    distinct_failing_callers: int
    def __init__(self, target: _Optional[str] = ..., state: _Optional[_Union[_resilience_pb2.BreakerState, str]] = ..., configured: bool = ..., open_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., consecutive_failures: _Optional[int] = ..., half_open_successes: _Optional[int] = ..., probes_outstanding: _Optional[int] = ..., reopen_count: _Optional[int] = ..., generation: _Optional[int] = ..., counters: _Optional[_Union[OutcomeCounters, _Mapping]] = ..., window_calls: _Optional[int] = ..., window_failures: _Optional[int] = ..., settings: _Optional[_Union[TargetSettings, _Mapping]] = ..., key_slots: _Optional[_Iterable[_Union[KeySlotStatus, _Mapping]]] = ..., forced_reason: _Optional[str] = ..., opened_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_cause: _Optional[str] = ..., in_flight: _Optional[int] = ..., group_budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., latency: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., spend: _Optional[_Union[SpendStatus, _Mapping]] = ..., adaptive_concurrency: _Optional[_Union[AdaptiveLimit, _Mapping]] = ..., distinct_failing_callers: _Optional[int] = ...) -> None: ...

class SpendStatus(_message.Message):
    __slots__ = ("total", "limits")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    total: float
    limits: _containers.RepeatedCompositeFieldContainer[SpendLimitStatus]
    def __init__(self, total: _Optional[float] = ..., limits: _Optional[_Iterable[_Union[SpendLimitStatus, _Mapping]]] = ...) -> None: ...

class SpendLimitStatus(_message.Message):
    __slots__ = ("scope", "limit", "window", "available")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    limit: float
    window: _duration_pb2.Duration
    available: float
    def __init__(self, scope: _Optional[str] = ..., limit: _Optional[float] = ..., window: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., available: _Optional[float] = ...) -> None: ...

class AdaptiveLimit(_message.Message):
    __slots__ = ("limit", "min", "max", "last_change")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    min: int
    max: int
    last_change: str
    def __init__(self, limit: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ..., last_change: _Optional[str] = ...) -> None: ...

class OutcomeCounters(_message.Message):
    __slots__ = ("admitted", "refused", "success", "transient", "rate_limited", "persistent", "bad_input", "partial", "timeout", "stale")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TRANSIENT_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITED_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_FIELD_NUMBER: _ClassVar[int]
    BAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    admitted: int
    refused: int
    success: int
    transient: int
    rate_limited: int
    persistent: int
    bad_input: int
    partial: int
    timeout: int
    stale: int
    def __init__(self, admitted: _Optional[int] = ..., refused: _Optional[int] = ..., success: _Optional[int] = ..., transient: _Optional[int] = ..., rate_limited: _Optional[int] = ..., persistent: _Optional[int] = ..., bad_input: _Optional[int] = ..., partial: _Optional[int] = ..., timeout: _Optional[int] = ..., stale: _Optional[int] = ...) -> None: ...

class KeySlotStatus(_message.Message):
    __slots__ = ("name", "disabled", "disabled_until", "disabled_reason", "paused_until", "budgets", "learned", "in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    DISABLED_REASON_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    LEARNED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    disabled: bool
    disabled_until: _timestamp_pb2.Timestamp
    disabled_reason: str
    paused_until: _timestamp_pb2.Timestamp
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    learned: _containers.RepeatedCompositeFieldContainer[ProviderLimit]
    in_flight: int
    def __init__(self, name: _Optional[str] = ..., disabled: bool = ..., disabled_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., disabled_reason: _Optional[str] = ..., paused_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ..., learned: _Optional[_Iterable[_Union[ProviderLimit, _Mapping]]] = ..., in_flight: _Optional[int] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("kind", "limit", "window", "available", "group")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    kind: str
    limit: int
    window: _duration_pb2.Duration
    available: float
    group: str
    def __init__(self, kind: _Optional[str] = ..., limit: _Optional[int] = ..., window: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., available: _Optional[float] = ..., group: _Optional[str] = ...) -> None: ...

class ProviderLimit(_message.Message):
    __slots__ = ("kind", "limit", "remaining", "reset_at", "observed_at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_AT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    limit: int
    remaining: int
    reset_at: _timestamp_pb2.Timestamp
    observed_at: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[str] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., observed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TargetSettings(_message.Message):
    __slots__ = ("breaker", "max_tokens", "context_window", "cost_per_mtok_input", "cost_per_mtok_output", "keys", "budget_groups", "mode")
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    COST_PER_MTOK_INPUT_FIELD_NUMBER: _ClassVar[int]
    COST_PER_MTOK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    breaker: BreakerSettings
    max_tokens: int
    context_window: int
    cost_per_mtok_input: float
    cost_per_mtok_output: float
    keys: _containers.RepeatedScalarFieldContainer[str]
    budget_groups: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    def __init__(self, breaker: _Optional[_Union[BreakerSettings, _Mapping]] = ..., max_tokens: _Optional[int] = ..., context_window: _Optional[int] = ..., cost_per_mtok_input: _Optional[float] = ..., cost_per_mtok_output: _Optional[float] = ..., keys: _Optional[_Iterable[str]] = ..., budget_groups: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ...) -> None: ...

class BreakerSettings(_message.Message):
    __slots__ = ("failure_threshold", "success_threshold", "open_duration", "half_open_max_probes", "probe_lease", "backoff_multiplier", "max_open_duration", "failure_rate_threshold", "window", "minimum_calls", "slow_call_duration", "persistent_open_duration", "min_distinct_callers")
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OPEN_DURATION_FIELD_NUMBER: _ClassVar[int]
    HALF_OPEN_MAX_PROBES_FIELD_NUMBER: _ClassVar[int]
    PROBE_LEASE_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_OPEN_DURATION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_RATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_CALLS_FIELD_NUMBER: _ClassVar[int]
    SLOW_CALL_DURATION_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_OPEN_DURATION_FIELD_NUMBER: _ClassVar[int]
    MIN_DISTINCT_CALLERS_FIELD_NUMBER: _ClassVar[int]
    failure_threshold: int
    success_threshold: int
    open_duration: _duration_pb2.Duration
    half_open_max_probes: int
    probe_lease: _duration_pb2.Duration
    backoff_multiplier: float
    max_open_duration: _duration_pb2.Duration
    failure_rate_threshold: float
    window: _duration_pb2.Duration
    minimum_calls: int
    slow_call_duration: _duration_pb2.Duration
    persistent_open_duration: _duration_pb2.Duration
    min_distinct_callers: int
    def __init__(self, failure_threshold: _Optional[int] = ..., success_threshold: _Optional[int] = ..., open_duration: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., half_open_max_probes: _Optional[int] = ..., probe_lease: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., backoff_multiplier: _Optional[float] = ..., max_open_duration: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., failure_rate_threshold: _Optional[float] = ..., window: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., minimum_calls: _Optional[int] = ..., slow_call_duration: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., persistent_open_duration: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., min_distinct_callers: _Optional[int] = ...) -> None: ...
