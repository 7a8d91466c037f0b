"""Conversions between the generated protobuf messages and :mod:`backstop.types`."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from google.protobuf import duration_pb2

from ._proto import admin_pb2, deferred_pb2, resilience_pb2
from .types import (
    Admission,
    BreakerMode,
    BreakerState,
    ClaimResult,
    DeferredItem,
    FinishResult,
    KeySlotStatus,
    NackResult,
    OutcomeClass,
    OutcomeCounters,
    OutcomeReport,
    OutcomeResult,
    Priority,
    PriorityArg,
    QueueStat,
    Reason,
    RequestResult,
    RetryAdvice,
    RetryReason,
    RouteDecision,
    RouteStrategy,
    Skip,
    StrategyArg,
    TargetStatus,
    TargetSummary,
)


def duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    """Float seconds -> Duration (None stays unset; negatives clamp to 0)."""
    if seconds is None:
        return None
    s = max(0.0, float(seconds))
    if math.isinf(s) or math.isnan(s):
        raise ValueError(f"duration must be finite, got {seconds!r}")
    whole = int(s)
    nanos = int(round((s - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return duration_pb2.Duration(seconds=whole, nanos=nanos)


def seconds(msg: Any, field: str) -> Optional[float]:
    """An optional Duration field as float seconds (None when unset)."""
    if not msg.HasField(field):
        return None
    d = getattr(msg, field)
    return float(d.seconds + d.nanos / 1e9)


def timestamp(msg: Any, field: str) -> Optional[_dt.datetime]:
    if not msg.HasField(field):
        return None
    t = getattr(msg, field)
    return _dt.datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=_dt.timezone.utc)


def _enum(cls: Any, proto_enum: Any, value: int, prefix: str) -> Any:
    try:
        name = proto_enum.Name(value)
    except ValueError:
        return cls.UNSPECIFIED
    return cls._from_proto_name(name, prefix)


def state(v: int) -> BreakerState:
    result: BreakerState = _enum(BreakerState, resilience_pb2.BreakerState, v, "BREAKER_STATE_")
    return result


def reason(v: int) -> Reason:
    result: Reason = _enum(Reason, resilience_pb2.Reason, v, "REASON_")
    return result


def outcome_class(v: int) -> OutcomeClass:
    result: OutcomeClass = _enum(OutcomeClass, resilience_pb2.OutcomeClass, v, "OUTCOME_CLASS_")
    return result


def retry_reason(v: int) -> RetryReason:
    result: RetryReason = _enum(RetryReason, resilience_pb2.RetryReason, v, "RETRY_REASON_")
    return result


def route_strategy(v: int) -> RouteStrategy:
    result: RouteStrategy = _enum(RouteStrategy, resilience_pb2.RouteStrategy, v, "ROUTE_STRATEGY_")
    return result


def _coerce(cls: Any, value: Any, what: str) -> Any:
    """An enum member from a member or its string value ("batch", "BATCH")."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"{what} must be one of {choices} (or a {cls.__name__}), got {value!r}")


def priority(value: PriorityArg) -> Optional[Priority]:
    """Validates a ``priority=`` argument: None (the server's default), a
    :class:`Priority`, or its string value."""
    if value is None:
        return None
    result: Priority = _coerce(Priority, value, "priority")
    return result


def strategy(value: StrategyArg) -> Optional[RouteStrategy]:
    """Validates a ``strategy=`` argument: None (the route's own), a
    :class:`RouteStrategy`, or its string value."""
    if value is None:
        return None
    result: RouteStrategy = _coerce(RouteStrategy, value, "strategy")
    return None if result == RouteStrategy.UNSPECIFIED else result


def priority_to_proto(p: PriorityArg) -> str:
    """The proto enum value's name (UNSPECIFIED, which the server treats as DEFAULT, for None)."""
    member = priority(p)
    return "PRIORITY_" + (member.name if member is not None else "UNSPECIFIED")


def strategy_to_proto(s: StrategyArg) -> str:
    """The proto enum value's name (UNSPECIFIED, the route's own strategy, for None)."""
    member = strategy(s)
    return "ROUTE_STRATEGY_" + (member.name if member is not None else "UNSPECIFIED")


def non_negative(name: str, value: int) -> int:
    n = int(value)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return n


def outcome_class_to_proto(c: OutcomeClass) -> str:
    """The proto enum value's name (protobuf accepts names for enum fields)."""
    return "OUTCOME_CLASS_" + c.name


def breaker_mode_to_proto(m: BreakerMode) -> str:
    return "BREAKER_MODE_" + m.name


# --- Resilience ---------------------------------------------------------------


def can_proceed_request(
    target: str,
    *,
    caller: str,
    estimated_tokens: int,
    attempt: int,
    priority: PriorityArg = None,
    max_output_tokens: int = 0,
    request_id: str = "",
) -> resilience_pb2.CanProceedRequest:
    return resilience_pb2.CanProceedRequest(
        target=target,
        caller=caller,
        estimated_tokens=int(estimated_tokens),
        attempt=int(attempt),
        priority=priority_to_proto(priority),
        max_output_tokens=non_negative("max_output_tokens", max_output_tokens),
        request_id=request_id,
    )


def admission(target: str, r: resilience_pb2.CanProceedResponse) -> Admission:
    shadow = reason(r.shadow_reason) if r.shadow_reason else None
    return Admission(
        target=target,
        allowed=r.allowed,
        reason=reason(r.reason),
        state=state(r.state),
        retry_after=seconds(r, "retry_after"),
        permit=r.permit,
        key_slot=r.key_slot,
        shadow_reason=shadow,
    )


def record_request(rep: OutcomeReport, *, with_request: bool = True) -> resilience_pb2.RecordOutcomeRequest:
    """``with_request=False`` leaves out ``request_id`` / ``finish`` (outcomes
    reconciled after an outage: the server never saw those requests)."""
    req = resilience_pb2.RecordOutcomeRequest(
        target=rep.target,
        permit=rep.permit,
        outcome=outcome_class_to_proto(rep.outcome),
        http_status=int(rep.http_status),
        error_type=rep.error_type,
        input_tokens=int(rep.input_tokens),
        output_tokens=int(rep.output_tokens),
        attempt=int(rep.attempt),
        headers=dict(rep.headers),
        key_slot=rep.key_slot,
        caller=rep.caller,
    )
    if with_request:
        req.request_id = rep.request_id
        if rep.finish is not None:
            req.finish = request_result_to_proto(rep.finish)
    if rep.latency is not None:
        req.latency.CopyFrom(duration(rep.latency))
    if rep.retry_after is not None:
        req.retry_after.CopyFrom(duration(rep.retry_after))
    return req


def record_batch_request(reports: Sequence[OutcomeReport]) -> resilience_pb2.RecordOutcomeBatchRequest:
    """Many reports in one RecordOutcomeBatch (the server takes at most 1000)."""
    return resilience_pb2.RecordOutcomeBatchRequest(items=[record_request(r, with_request=False) for r in reports])


def batch_errors(r: resilience_pb2.RecordOutcomeBatchResponse) -> List[Optional[str]]:
    """One entry per item of a RecordOutcomeBatch answer: None when accepted,
    else the server's reason for refusing that item."""
    return [f"{i.error.message} (code {i.error.code})" if i.HasField("error") else None for i in r.items]


def retry_advice(r: Any) -> RetryAdvice:
    return RetryAdvice(
        retry=r.retry,
        delay=seconds(r, "delay") or 0.0,
        reason=retry_reason(r.reason),
    )


def outcome_result(target: str, r: resilience_pb2.RecordOutcomeResponse) -> OutcomeResult:
    return OutcomeResult(
        target=target,
        classified_as=outcome_class(r.classified_as),
        state=state(r.state),
        retry=retry_advice(r.retry) if r.HasField("retry") else RetryAdvice(False, 0.0, RetryReason.UNSPECIFIED),
        stale_permit=r.stale_permit,
        duplicate=r.duplicate,
        cost=float(r.cost),
    )


def route_request(
    route: Optional[str],
    candidates: Sequence[str],
    *,
    estimated_tokens: int,
    required_context_tokens: int,
    exclude: Sequence[str],
    caller: str,
    attempt: int,
    priority: PriorityArg = None,
    max_output_tokens: int = 0,
    strategy: StrategyArg = None,
    expected_output_tokens: int = 0,
    request_id: str = "",
) -> resilience_pb2.RouteRequest:
    return resilience_pb2.RouteRequest(
        route=route or "",
        candidates=list(candidates),
        estimated_tokens=int(estimated_tokens),
        required_context_tokens=int(required_context_tokens),
        exclude=list(exclude),
        caller=caller,
        attempt=int(attempt),
        priority=priority_to_proto(priority),
        max_output_tokens=non_negative("max_output_tokens", max_output_tokens),
        strategy=strategy_to_proto(strategy),
        expected_output_tokens=non_negative("expected_output_tokens", expected_output_tokens),
        request_id=request_id,
    )


def request_result(value: Any) -> RequestResult:
    """A :class:`RequestResult` from itself or its name (``"failed"``)."""
    if isinstance(value, RequestResult):
        return value
    try:
        return RequestResult(str(value).lower())
    except ValueError:
        raise ValueError(
            f"result must be a RequestResult or one of completed / deferred / failed, got {value!r}"
        ) from None


def request_result_to_proto(value: Any) -> int:
    r = request_result(value)
    if r == RequestResult.UNSPECIFIED:
        raise ValueError("a request must finish as completed, deferred or failed")
    return int(resilience_pb2.RequestResult.Value(f"REQUEST_RESULT_{r.name}"))


def finish_request_request(
    request_id: str, result: Any, *, route: str = "", elapsed: Optional[float] = None, attempts: int = 0
) -> resilience_pb2.FinishRequestRequest:
    if not request_id:
        raise ValueError("finish_request needs the request_id of the request it closes")
    req = resilience_pb2.FinishRequestRequest(
        request_id=request_id,
        result=request_result_to_proto(result),
        route=route,
        attempts=non_negative("attempts", attempts),
    )
    if elapsed is not None:
        req.elapsed.CopyFrom(duration(elapsed))
    return req


def finish_result(r: resilience_pb2.FinishRequestResponse) -> FinishResult:
    return FinishResult(
        tracked=r.tracked,
        duplicate=r.duplicate,
        duration=seconds(r, "duration") or 0.0,
        attempts=int(r.attempts),
        route=r.route,
    )


def route_decision(r: resilience_pb2.RouteResponse) -> RouteDecision:
    skipped = tuple(
        Skip(target=s.target, reason=reason(s.reason), retry_after=seconds(s, "retry_after")) for s in r.skipped
    )
    return RouteDecision(
        target=r.target or None,
        permit=r.permit,
        key_slot=r.key_slot,
        fallback_depth=r.fallback_depth,
        skipped=skipped,
        max_tokens=r.max_tokens,
        cost_per_mtok_input=r.cost_per_mtok_input,
        cost_per_mtok_output=r.cost_per_mtok_output,
        retry_after=seconds(r, "retry_after"),
        state=state(r.state),
        strategy=route_strategy(r.strategy),
        reason=r.reason,
    )


# --- Deferred -----------------------------------------------------------------


def defer_request(
    queue: str,
    payload: bytes,
    *,
    metadata: Optional[Mapping[str, str]],
    idempotency_key: str,
    not_before: Optional[_dt.datetime],
    max_attempts: int,
) -> deferred_pb2.DeferRequest:
    req = deferred_pb2.DeferRequest(
        queue=queue,
        payload=payload,
        metadata=dict(metadata or {}),
        idempotency_key=idempotency_key,
        max_attempts=int(max_attempts),
    )
    if not_before is not None:
        req.not_before.FromDatetime(not_before)
    return req


def deferred_item(i: deferred_pb2.DeferredItem) -> DeferredItem:
    return DeferredItem(
        id=i.id,
        queue=i.queue,
        payload=bytes(i.payload),
        metadata=dict(i.metadata),
        lease_token=i.lease_token,
        attempt=i.attempt,
        max_attempts=i.max_attempts,
        target=i.target,
        permit=i.permit,
        key_slot=i.key_slot,
        last_error=i.last_error,
        enqueued_at=timestamp(i, "enqueued_at"),
        lease_expires_at=timestamp(i, "lease_expires_at"),
        dead_lettered_at=timestamp(i, "dead_lettered_at"),
    )


def claim_result(r: deferred_pb2.ClaimResponse) -> ClaimResult:
    return ClaimResult(
        items=tuple(deferred_item(i) for i in r.items),
        blocked_reason=reason(r.blocked_reason) if r.blocked_reason else None,
        retry_after=seconds(r, "retry_after"),
    )


def nack_result(r: deferred_pb2.NackResponse) -> NackResult:
    return NackResult(dead_lettered=r.dead_lettered, attempt=r.attempt)


def queue_stat(q: deferred_pb2.QueueStat) -> QueueStat:
    return QueueStat(
        queue=q.queue,
        depth=q.depth,
        in_flight=q.in_flight,
        dead_letters=q.dead_letters,
        oldest_age=seconds(q, "oldest_age"),
        bytes=q.bytes,
    )


# --- Admin --------------------------------------------------------------------


def _counters(c: admin_pb2.OutcomeCounters) -> OutcomeCounters:
    return OutcomeCounters(
        admitted=c.admitted,
        refused=c.refused,
        success=c.success,
        transient=c.transient,
        rate_limited=c.rate_limited,
        persistent=c.persistent,
        bad_input=c.bad_input,
        partial=c.partial,
        timeout=c.timeout,
        stale=c.stale,
    )


def _slot(s: admin_pb2.KeySlotStatus) -> KeySlotStatus:
    learned: Dict[str, Tuple[int, int]] = {lim.kind: (lim.limit, lim.remaining) for lim in s.learned}
    return KeySlotStatus(
        name=s.name,
        disabled=s.disabled,
        disabled_until=timestamp(s, "disabled_until"),
        disabled_reason=s.disabled_reason,
        paused_until=timestamp(s, "paused_until"),
        in_flight=s.in_flight,
        learned=learned,
    )


def target_status(t: admin_pb2.TargetStatus) -> TargetStatus:
    return TargetStatus(
        target=t.target,
        state=state(t.state),
        configured=t.configured,
        consecutive_failures=t.consecutive_failures,
        counters=_counters(t.counters),
        open_until=timestamp(t, "open_until"),
        last_cause=t.last_cause,
        generation=t.generation,
        in_flight=t.in_flight,
        key_slots=tuple(_slot(s) for s in t.key_slots),
        raw=t,
    )


def target_summary(t: admin_pb2.TargetSummary) -> TargetSummary:
    return TargetSummary(
        target=t.target,
        state=state(t.state),
        configured=t.configured,
        consecutive_failures=t.consecutive_failures,
        open_until=timestamp(t, "open_until"),
    )
