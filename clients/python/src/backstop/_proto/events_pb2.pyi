from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from backstop._proto import resilience_pb2 as _resilience_pb2
from backstop._proto import admin_pb2 as _admin_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT: _ClassVar[EventKind]
    EVENT_KIND_BREAKER_TRANSITION: _ClassVar[EventKind]
    EVENT_KIND_PROBE_EXPIRED: _ClassVar[EventKind]
    EVENT_KIND_TARGET_FORCED: _ClassVar[EventKind]
    EVENT_KIND_RATE_LIMITED: _ClassVar[EventKind]
    EVENT_KIND_BUDGET_RESTORED: _ClassVar[EventKind]
    EVENT_KIND_FALLBACK_ACTIVATED: _ClassVar[EventKind]
    EVENT_KIND_ROUTE_EXHAUSTED: _ClassVar[EventKind]
    EVENT_KIND_GAP: _ClassVar[EventKind]
    EVENT_KIND_KEY_SLOT_DISABLED: _ClassVar[EventKind]
    EVENT_KIND_TARGET_RESET: _ClassVar[EventKind]
    EVENT_KIND_DEFERRED: _ClassVar[EventKind]
    EVENT_KIND_DRAINED: _ClassVar[EventKind]
    EVENT_KIND_DEAD_LETTERED: _ClassVar[EventKind]
    EVENT_KIND_REDIS_UNAVAILABLE: _ClassVar[EventKind]
    EVENT_KIND_REDIS_RESTORED: _ClassVar[EventKind]
    EVENT_KIND_CONFIG_MISMATCH: _ClassVar[EventKind]
    EVENT_KIND_CONFIG_RELOADED: _ClassVar[EventKind]
    EVENT_KIND_TARGET_REMOVED: _ClassVar[EventKind]
    EVENT_KIND_SPEND_LIMIT_REACHED: _ClassVar[EventKind]
    EVENT_KIND_LIMIT_ADAPTED: _ClassVar[EventKind]
    EVENT_KIND_OPERATOR_ACTION: _ClassVar[EventKind]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_SNAPSHOT: EventKind
EVENT_KIND_BREAKER_TRANSITION: EventKind
EVENT_KIND_PROBE_EXPIRED: EventKind
EVENT_KIND_TARGET_FORCED: EventKind
EVENT_KIND_RATE_LIMITED: EventKind
EVENT_KIND_BUDGET_RESTORED: EventKind
EVENT_KIND_FALLBACK_ACTIVATED: EventKind
EVENT_KIND_ROUTE_EXHAUSTED: EventKind
EVENT_KIND_GAP: EventKind
EVENT_KIND_KEY_SLOT_DISABLED: EventKind
EVENT_KIND_TARGET_RESET: EventKind
EVENT_KIND_DEFERRED: EventKind
EVENT_KIND_DRAINED: EventKind
EVENT_KIND_DEAD_LETTERED: EventKind
EVENT_KIND_REDIS_UNAVAILABLE: EventKind
EVENT_KIND_REDIS_RESTORED: EventKind
EVENT_KIND_CONFIG_MISMATCH: EventKind
EVENT_KIND_CONFIG_RELOADED: EventKind
EVENT_KIND_TARGET_REMOVED: EventKind
EVENT_KIND_SPEND_LIMIT_REACHED: EventKind
EVENT_KIND_LIMIT_ADAPTED: EventKind
EVENT_KIND_OPERATOR_ACTION: EventKind

class WatchRequest(_message.Message):
    __slots__ = ("since_seq", "targets", "kinds")
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    since_seq: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[EventKind]
    def __init__(self, since_seq: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[_Union[EventKind, str]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "at", "target", "snapshot", "breaker_transition", "probe_expired", "target_forced", "rate_limited", "budget_restored", "fallback_activated", "route_exhausted", "gap", "key_slot_disabled", "target_reset", "deferred", "drained", "dead_lettered", "redis_unavailable", "redis_restored", "config_mismatch", "config_reloaded", "target_removed", "spend_limit_reached", "limit_adapted", "operator_action")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BREAKER_TRANSITION_FIELD_NUMBER: _ClassVar[int]
    PROBE_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORCED_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RESTORED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    ROUTE_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    KEY_SLOT_DISABLED_FIELD_NUMBER: _ClassVar[int]
    TARGET_RESET_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    REDIS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REDIS_RESTORED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_RELOADED_FIELD_NUMBER: _ClassVar[int]
    TARGET_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SPEND_LIMIT_REACHED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_ADAPTED_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_ACTION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    target: str
    snapshot: Snapshot
    breaker_transition: BreakerTransition
    probe_expired: ProbeExpired
    target_forced: TargetForced
    rate_limited: RateLimited
    budget_restored: BudgetRestored
    fallback_activated: FallbackActivated
    route_exhausted: RouteExhausted
    gap: Gap
    key_slot_disabled: KeySlotDisabled
    target_reset: TargetReset
    deferred: ItemDeferred
    drained: ItemDrained
    dead_lettered: ItemDeadLettered
    redis_unavailable: RedisUnavailable
    redis_restored: RedisRestored
    config_mismatch: ConfigMismatch
    config_reloaded: ConfigReloaded
    target_removed: TargetRemoved
    spend_limit_reached: SpendLimitReached
    limit_adapted: LimitAdapted
    operator_action: OperatorAction
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., target: _Optional[str] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., breaker_transition: _Optional[_Union[BreakerTransition, _Mapping]] = ..., probe_expired: _Optional[_Union[ProbeExpired, _Mapping]] = ..., target_forced: _Optional[_Union[TargetForced, _Mapping]] = ..., rate_limited: _Optional[_Union[RateLimited, _Mapping]] = ..., budget_restored: _Optional[_Union[BudgetRestored, _Mapping]] = ..., fallback_activated: _Optional[_Union[FallbackActivated, _Mapping]] = ..., route_exhausted: _Optional[_Union[RouteExhausted, _Mapping]] = ..., gap: _Optional[_Union[Gap, _Mapping]] = ..., key_slot_disabled: _Optional[_Union[KeySlotDisabled, _Mapping]] = ..., target_reset: _Optional[_Union[TargetReset, _Mapping]] = ..., deferred: _Optional[_Union[ItemDeferred, _Mapping]] = ..., drained: _Optional[_Union[ItemDrained, _Mapping]] = ..., dead_lettered: _Optional[_Union[ItemDeadLettered, _Mapping]] = ..., redis_unavailable: _Optional[_Union[RedisUnavailable, _Mapping]] = ..., redis_restored: _Optional[_Union[RedisRestored, _Mapping]] = ..., config_mismatch: _Optional[_Union[ConfigMismatch, _Mapping]] = ..., config_reloaded: _Optional[_Union[ConfigReloaded, _Mapping]] = ..., target_removed: _Optional[_Union[TargetRemoved, _Mapping]] = ..., spend_limit_reached: _Optional[_Union[SpendLimitReached, _Mapping]] = ..., limit_adapted: _Optional[_Union[LimitAdapted, _Mapping]] = ..., operator_action: _Optional[_Union[OperatorAction, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("targets", "part", "parts")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[TargetSnapshot]
    part: int
    parts: int
    def __init__(self, targets: _Optional[_Iterable[_Union[TargetSnapshot, _Mapping]]] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ...) -> None: ...

class TargetSnapshot(_message.Message):
    __slots__ = ("target", "state", "open_until", "consecutive_failures", "probes_outstanding", "counters", "budgets", "paused_until", "last_cause")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    PROBES_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    LAST_CAUSE_FIELD_NUMBER: _ClassVar[int]
    target: str
    state: _resilience_pb2.BreakerState
    open_until: _timestamp_pb2.Timestamp
    consecutive_failures: int
    probes_outstanding: int
    counters: _admin_pb2.OutcomeCounters
    budgets: _containers.RepeatedCompositeFieldContainer[_admin_pb2.BudgetStatus]
    paused_until: _timestamp_pb2.Timestamp
    last_cause: str
    def __init__(self, target: _Optional[str] = ..., state: _Optional[_Union[_resilience_pb2.BreakerState, str]] = ..., open_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., consecutive_failures: _Optional[int] = ..., probes_outstanding: _Optional[int] = ..., counters: _Optional[_Union[_admin_pb2.OutcomeCounters, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[_admin_pb2.BudgetStatus, _Mapping]]] = ..., paused_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., last_cause: _Optional[str] = ...) -> None: ...

class BreakerTransition(_message.Message):
    __slots__ = ("to", "cause_class", "failures", "caller", "cause", "open_until")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CAUSE_CLASS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    to: _resilience_pb2.BreakerState
    cause_class: _resilience_pb2.OutcomeClass
    failures: int
    caller: str
    cause: str
    open_until: _timestamp_pb2.Timestamp
    def __init__(self, to: _Optional[_Union[_resilience_pb2.BreakerState, str]] = ..., cause_class: _Optional[_Union[_resilience_pb2.OutcomeClass, str]] = ..., failures: _Optional[int] = ..., caller: _Optional[str] = ..., cause: _Optional[str] = ..., open_until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., **kwargs) -> None: ...

class ProbeExpired(_message.Message):
    __slots__ = ("probe",)
    PROBE_FIELD_NUMBER: _ClassVar[int]
    probe: int
    def __init__(self, probe: _Optional[int] = ...) -> None: ...

class TargetForced(_message.Message):
    __slots__ = ("mode", "reason")
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    mode: _admin_pb2.BreakerMode
    reason: str
    def __init__(self, mode: _Optional[_Union[_admin_pb2.BreakerMode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RateLimited(_message.Message):
    __slots__ = ("key_slot", "kind", "until", "why")
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    key_slot: str
    kind: str
    until: _timestamp_pb2.Timestamp
    why: str
    def __init__(self, key_slot: _Optional[str] = ..., kind: _Optional[str] = ..., until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., why: _Optional[str] = ...) -> None: ...

class BudgetRestored(_message.Message):
    __slots__ = ("key_slot",)
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    key_slot: str
    def __init__(self, key_slot: _Optional[str] = ...) -> None: ...

class KeySlotDisabled(_message.Message):
    __slots__ = ("key_slot", "until", "why")
    KEY_SLOT_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    key_slot: str
    until: _timestamp_pb2.Timestamp
    why: str
    def __init__(self, key_slot: _Optional[str] = ..., until: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., why: _Optional[str] = ...) -> None: ...

class FallbackActivated(_message.Message):
    __slots__ = ("route", "to", "depth", "why")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    route: str
    to: str
    depth: int
    why: _resilience_pb2.Reason
    def __init__(self, route: _Optional[str] = ..., to: _Optional[str] = ..., depth: _Optional[int] = ..., why: _Optional[_Union[_resilience_pb2.Reason, str]] = ..., **kwargs) -> None: ...

class RouteExhausted(_message.Message):
    __slots__ = ("route", "retry_after")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    route: str
    retry_after: _duration_pb2.Duration
    def __init__(self, route: _Optional[str] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Gap(_message.Message):
    __slots__ = ("missed_from", "reason")
    MISSED_FROM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    missed_from: int
    reason: str
    def __init__(self, missed_from: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TargetReset(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ItemDeferred(_message.Message):
    __slots__ = ("queue", "id", "depth")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    queue: str
    id: str
    depth: int
    def __init__(self, queue: _Optional[str] = ..., id: _Optional[str] = ..., depth: _Optional[int] = ...) -> None: ...

class ItemDrained(_message.Message):
    __slots__ = ("queue", "id")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    queue: str
    id: str
    def __init__(self, queue: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class RedisUnavailable(_message.Message):
    __slots__ = ("replica", "error")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    replica: str
    error: str
    def __init__(self, replica: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class RedisRestored(_message.Message):
    __slots__ = ("replica", "merged")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    replica: str
    merged: int
    def __init__(self, replica: _Optional[str] = ..., merged: _Optional[int] = ...) -> None: ...

class ConfigMismatch(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigReloaded(_message.Message):
    __slots__ = ("digest", "previous_digest", "added", "removed", "changed", "needs_restart", "source")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_RESTART_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    previous_digest: str
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    needs_restart: _containers.RepeatedScalarFieldContainer[str]
    source: str
    def __init__(self, digest: _Optional[str] = ..., previous_digest: _Optional[str] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., needs_restart: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ...) -> None: ...

class TargetRemoved(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SpendLimitReached(_message.Message):
    __slots__ = ("scope", "limit", "window", "retry_after")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    scope: str
    limit: float
    window: _duration_pb2.Duration
    retry_after: _duration_pb2.Duration
    def __init__(self, scope: _Optional[str] = ..., limit: _Optional[float] = ..., window: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LimitAdapted(_message.Message):
    __slots__ = ("limit", "previous", "why")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    limit: int
    previous: int
    why: str
    def __init__(self, limit: _Optional[int] = ..., previous: _Optional[int] = ..., why: _Optional[str] = ...) -> None: ...

class OperatorAction(_message.Message):
    __slots__ = ("action", "principal", "tenant", "reason", "via")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    action: str
    principal: str
    tenant: str
    reason: str
    via: str
    def __init__(self, action: _Optional[str] = ..., principal: _Optional[str] = ..., tenant: _Optional[str] = ..., reason: _Optional[str] = ..., via: _Optional[str] = ...) -> None: ...

class ItemDeadLettered(_message.Message):
    __slots__ = ("queue", "id", "reason", "attempts")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    id: str
    reason: str
    attempts: int
    def __init__(self, queue: _Optional[str] = ..., id: _Optional[str] = ..., reason: _Optional[str] = ..., attempts: _Optional[int] = ...) -> None: ...
