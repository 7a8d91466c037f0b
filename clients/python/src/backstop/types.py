"""Typed results of Backstop calls.

The wire types (``backstop._proto``) use protobuf enums and Durations; these
are plain, immutable Python values: enums with readable values and durations
as float seconds. Every result also says whether it came from the server or
from the client's local fail-safe (``local``), so an agent can tell a fleet
decision from a decision taken alone while Backstop was unreachable.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Mapping, Optional, Tuple, Union


class _ProtoEnum(str, Enum):
    """An enum mirroring a proto enum; values are the lower-case names without the prefix."""

    @classmethod
    def _from_proto_name(cls, name: str, prefix: str) -> Any:
        short = name[len(prefix):] if name.startswith(prefix) else name
        try:
            return cls[short]
        except KeyError:
            # A newer server may send values this client does not know yet.
            return cls["UNSPECIFIED"]

    def __str__(self) -> str:
        return str(self.value)


class BreakerState(_ProtoEnum):
    """State of a target's circuit breaker (``backstop.v1.BreakerState``)."""

    UNSPECIFIED = "unspecified"
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"


class Reason(_ProtoEnum):
    """Why a call was admitted or refused (``backstop.v1.Reason``).

    ``CONTROL_PLANE_UNAVAILABLE`` is client-side only: the refusal of the
    ``fail_closed`` policy while Backstop cannot be reached.
    """

    UNSPECIFIED = "unspecified"
    ALLOWED = "allowed"
    CIRCUIT_OPEN = "circuit_open"
    PROBE_LIMIT = "probe_limit"
    FORCED_OPEN = "forced_open"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMIT = "concurrency_limit"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    KEY_SLOTS_UNAVAILABLE = "key_slots_unavailable"
    REQUEST_TOO_LARGE = "request_too_large"
    EXCLUDED = "excluded"
    CONTEXT_TOO_SMALL = "context_too_small"
    PRIORITY_RESERVED = "priority_reserved"
    SPEND_LIMIT = "spend_limit"
    CONTROL_PLANE_UNAVAILABLE = "control_plane_unavailable"


class OutcomeClass(_ProtoEnum):
    """The failure taxonomy (``backstop.v1.OutcomeClass``).

    ``UNSPECIFIED`` in a report means "let the server classify from the HTTP
    status, the error type and the headers", which is what the client does
    whenever the provider gave an HTTP status.
    """

    UNSPECIFIED = "unspecified"
    SUCCESS = "success"
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    PERSISTENT = "persistent"
    BAD_INPUT = "bad_input"
    PARTIAL = "partial"
    TIMEOUT = "timeout"


class RetryReason(_ProtoEnum):
    """Why retry advice said what it said (``backstop.v1.RetryReason``)."""

    UNSPECIFIED = "unspecified"
    SUCCEEDED = "succeeded"
    RETRYABLE = "retryable"
    PERSISTENT = "persistent"
    BAD_INPUT = "bad_input"
    MAX_RETRIES = "max_retries"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    CORRECT_AND_RETRY = "correct_and_retry"
    #: The target's breaker is open (perhaps opened by this very outcome): do
    #: not retry it; fall back or defer. ``delay`` says when it admits again.
    CIRCUIT_OPEN = "circuit_open"


class Priority(_ProtoEnum):
    """How urgent a call is (``backstop.v1.Priority``).

    A budget may reserve headroom for higher priorities (``reserve = {
    interactive = 0.2 }``): when it runs low, ``BATCH`` and ``DEFAULT`` calls
    are refused with :attr:`Reason.PRIORITY_RESERVED` while ``INTERACTIVE``
    ones keep flowing. Wherever a ``priority=`` is accepted, the plain strings
    ``"interactive"``, ``"default"`` and ``"batch"`` work too; None (the
    default) is ``DEFAULT``.
    """

    INTERACTIVE = "interactive"
    DEFAULT = "default"
    BATCH = "batch"


class RouteStrategy(_ProtoEnum):
    """How Route orders a route's candidates (``backstop.v1.RouteStrategy``).

    In a request, None (or ``UNSPECIFIED``) means the route's own strategy.
    Plain strings (``"lowest_latency"``) are accepted wherever a strategy is.
    """

    UNSPECIFIED = "unspecified"
    #: First admissible in list order: a fallback list.
    ORDERED = "ordered"
    #: Random by the route's weights among admissible candidates.
    WEIGHTED = "weighted"
    #: Fewest outstanding permits.
    LEAST_BUSY = "least_busy"
    #: Lowest recent latency (with a small exploration share).
    LOWEST_LATENCY = "lowest_latency"
    #: Lowest expected price (estimated tokens at the input price plus
    #: ``expected_output_tokens`` at the output price).
    LOWEST_COST = "lowest_cost"
    #: Largest remaining budget fraction.
    MOST_HEADROOM = "most_headroom"


#: What a ``priority=`` argument accepts: a :class:`Priority`, its string value, or None (DEFAULT).
PriorityArg = Union[Priority, str, None]
#: What a ``strategy=`` argument accepts: a :class:`RouteStrategy`, its string value, or None (the route's own).
StrategyArg = Union[RouteStrategy, str, None]


class RequestResult(_ProtoEnum):
    """How a user request ended, after all its retries and fallbacks (``backstop.v1.RequestResult``)."""

    UNSPECIFIED = "unspecified"
    #: Answered.
    COMPLETED = "completed"
    #: Saved to the durable queue, to be served later.
    DEFERRED = "deferred"
    #: Given up on: every retry and fallback failed or was refused.
    FAILED = "failed"


#: A :class:`RequestResult` or its name (``"completed"``, ``"deferred"``, ``"failed"``).
RequestResultArg = Union[RequestResult, str]


class BreakerMode(_ProtoEnum):
    """How an operator sets a breaker (``backstop.v1.BreakerMode``)."""

    UNSPECIFIED = "unspecified"
    AUTOMATIC = "automatic"
    FORCE_OPEN = "force_open"
    FORCE_CLOSED = "force_closed"


@dataclass(frozen=True)
class Admission:
    """The answer to "may I call ``target`` now?" (CanProceed)."""

    target: str
    allowed: bool
    reason: Reason
    state: BreakerState
    #: When refused: seconds until asking again can succeed (None if unknown).
    retry_after: Optional[float] = None
    #: Pass back with the outcome: it releases reserved budget and makes a probe count.
    permit: str = ""
    #: Which of the target's API keys to use ("" when the target declares none).
    key_slot: str = ""
    #: Shadow mode: the refusal that would have been answered.
    shadow_reason: Optional[Reason] = None
    #: Decided by the local fail-safe because Backstop was unreachable.
    local: bool = False


@dataclass(frozen=True)
class RetryAdvice:
    """Whether and when to retry the call just reported."""

    retry: bool
    #: Seconds to wait first: max(provider hint, jittered backoff).
    delay: float
    reason: RetryReason


@dataclass(frozen=True)
class OutcomeResult:
    """What Backstop made of a reported outcome (RecordOutcome)."""

    target: str
    classified_as: OutcomeClass
    state: BreakerState
    retry: RetryAdvice
    #: The permit was from an older breaker generation: counted, but did not move the breaker.
    stale_permit: bool = False
    local: bool = False
    #: The permit had already been reported: nothing changed on the server,
    #: and this answer repeats the first one (a retried report is safe).
    duplicate: bool = False
    #: What the call cost at the target's prices (``cost_per_mtok_input`` /
    #: ``cost_per_mtok_output`` times the reported usage); 0.0 when the target
    #: is unpriced, no usage was reported, or the fail-safe decided.
    cost: float = 0.0


@dataclass(frozen=True)
class Skip:
    """A route candidate passed over, and why."""

    target: str
    reason: Reason
    retry_after: Optional[float] = None


@dataclass(frozen=True)
class RouteDecision:
    """Which target of a route should serve this request now (Route).

    ``target`` is None when no candidate is available; ``skipped`` then says
    why for each, and ``retry_after`` when the soonest may be tried again.
    """

    target: Optional[str]
    permit: str = ""
    key_slot: str = ""
    fallback_depth: int = 0
    skipped: Tuple[Skip, ...] = ()
    #: The chosen target's configured max_tokens (0 = not configured).
    max_tokens: int = 0
    cost_per_mtok_input: float = 0.0
    cost_per_mtok_output: float = 0.0
    retry_after: Optional[float] = None
    state: BreakerState = BreakerState.UNSPECIFIED
    local: bool = False
    #: The strategy that ordered the candidates (the route's own, or the one
    #: the request asked for).
    strategy: RouteStrategy = RouteStrategy.UNSPECIFIED
    #: Why this target, in words, e.g. ``"least_busy: b has the fewest permits
    #: outstanding (1)"``.
    reason: str = ""


@dataclass(frozen=True)
class OutcomeReport:
    """One provider call's outcome, as sent to RecordOutcome.

    ``outcome`` UNSPECIFIED lets the server classify from ``http_status``,
    ``error_type`` and ``headers`` (the normal case for HTTP errors: the
    server's taxonomy is the fleet's single source of truth).
    """

    target: str
    permit: str = ""
    outcome: OutcomeClass = OutcomeClass.UNSPECIFIED
    http_status: int = 0
    error_type: str = ""
    latency: Optional[float] = None
    retry_after: Optional[float] = None
    input_tokens: int = 0
    output_tokens: int = 0
    attempt: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    key_slot: str = ""
    caller: str = ""
    #: The user request this call served (the same on every retry and
    #: fallback of that request; "" = none). See :meth:`Backstop.finish_request`.
    request_id: str = ""
    #: Set on a request's last outcome to close it in the same call (needs ``request_id``).
    finish: Optional["RequestResult"] = None


@dataclass(frozen=True)
class FinishResult:
    """What :meth:`Backstop.finish_request` got back."""

    #: True when this server saw the request start and measured it itself.
    tracked: bool
    #: True when the request had already been finished (nothing counted again).
    duplicate: bool
    #: Seconds from first admission to finish (or the client's ``elapsed`` when not tracked).
    duration: float
    #: Outcomes reported for the request (or the client's ``attempts`` when not tracked).
    attempts: int
    #: The route label it was counted under ("direct" when no configured route served it).
    route: str


@dataclass(frozen=True)
class ReconcileStats:
    """Reconciliation of outcomes decided by the local fail-safe (see
    :attr:`backstop.Backstop.reconcile_stats`); counts since the client started."""

    #: Locally decided outcomes waiting to be reported once Backstop is back.
    pending: int = 0
    #: Reported and accepted by the server.
    reported: int = 0
    #: Reported, but refused by the server (e.g. nothing to classify).
    rejected: int = 0
    #: Never reported: more piled up than the client keeps, or every attempt to send them failed.
    dropped: int = 0


@dataclass(frozen=True)
class AttemptError:
    """One failed attempt (or refusal) inside :meth:`Backstop.call`."""

    target: str
    #: How Backstop classified the failure (None for a refusal or a skip).
    outcome: Optional[OutcomeClass]
    message: str
    http_status: int = 0
    #: For refusals and route skips: why the target was not called.
    reason: Optional[Reason] = None
    retry_after: Optional[float] = None
    attempt: int = 0
    exception: Optional[BaseException] = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        if self.outcome is not None:
            what = self.outcome.name
            if self.http_status:
                what += f" (http {self.http_status})"
            return f"{self.target}: {what}: {self.message}" if self.message else f"{self.target}: {what}"
        reason = self.reason.name if self.reason else "refused"
        tail = f", retry in {self.retry_after:.3g}s" if self.retry_after is not None else ""
        return f"{self.target}: {reason}{tail}"


@dataclass(frozen=True)
class Deferred:
    """The result of a :meth:`Backstop.call` that saved the request for later.

    ``message`` is meant for the end user ("we'll get back to you..."); the
    deferred item is processed by a :class:`backstop.DeferredWorker` once the
    route is admissible again.
    """

    id: str
    queue: str
    message: str
    duplicate: bool = False
    depth: int = 0
    #: Why it was deferred: every attempt that failed first.
    errors: Tuple[AttemptError, ...] = ()


@dataclass
class DeferredItem:
    """A claimed deferred request: call ``target`` (it is already admitted with
    ``permit`` and ``key_slot``) with the request in ``payload``."""

    id: str
    queue: str
    payload: bytes
    metadata: Dict[str, str]
    lease_token: str
    attempt: int
    max_attempts: int
    target: str = ""
    permit: str = ""
    key_slot: str = ""
    last_error: str = ""
    enqueued_at: Optional[_dt.datetime] = None
    lease_expires_at: Optional[_dt.datetime] = None
    dead_lettered_at: Optional[_dt.datetime] = None
    #: Token usage the handler reports with :meth:`usage` (sent with the outcome).
    input_tokens: int = 0
    output_tokens: int = 0

    def json(self) -> Any:
        """The payload decoded as JSON (what :meth:`Backstop.call` stores for dict payloads)."""
        return json.loads(self.payload.decode("utf-8"))

    def text(self) -> str:
        return self.payload.decode("utf-8")

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        """Records the provider's token usage for this delivery's outcome report."""
        self.input_tokens = int(input_tokens)
        self.output_tokens = int(output_tokens)


@dataclass(frozen=True)
class ClaimResult:
    """Items handed to a worker, or why none were (the queue's route is not admissible)."""

    items: Tuple[DeferredItem, ...]
    blocked_reason: Optional[Reason] = None
    retry_after: Optional[float] = None


@dataclass(frozen=True)
class NackResult:
    dead_lettered: bool
    attempt: int


@dataclass(frozen=True)
class QueueStat:
    queue: str
    depth: int
    in_flight: int
    dead_letters: int
    #: Age in seconds of the oldest waiting or in-flight item (None when empty).
    oldest_age: Optional[float]
    bytes: int


@dataclass(frozen=True)
class OutcomeCounters:
    admitted: int = 0
    refused: int = 0
    success: int = 0
    transient: int = 0
    rate_limited: int = 0
    persistent: int = 0
    bad_input: int = 0
    partial: int = 0
    timeout: int = 0
    stale: int = 0


@dataclass(frozen=True)
class KeySlotStatus:
    name: str
    disabled: bool
    disabled_until: Optional[_dt.datetime]
    disabled_reason: str
    #: The provider asked the fleet to pause until this time.
    paused_until: Optional[_dt.datetime]
    in_flight: int
    #: Limits the provider reported in headers: kind -> (limit, remaining).
    learned: Dict[str, Tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetStatus:
    """Everything Backstop knows about one target (Admin GetTarget).

    The most used fields are typed here; ``raw`` is the full
    ``backstop.v1.TargetStatus`` message for everything else.
    """

    target: str
    state: BreakerState
    configured: bool
    consecutive_failures: int
    counters: OutcomeCounters
    open_until: Optional[_dt.datetime]
    last_cause: str
    generation: int
    in_flight: int
    key_slots: Tuple[KeySlotStatus, ...]
    raw: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TargetSummary:
    target: str
    state: BreakerState
    configured: bool
    consecutive_failures: int
    open_until: Optional[_dt.datetime]
