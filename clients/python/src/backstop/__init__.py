"""Python client for Backstop, the resilience control plane for fleets of AI agents.

One Backstop server owns the circuit breakers, rate-limit budgets, retry
budget and fallback order for a whole fleet; this package asks it before every
provider call and tells it what happened after:

    from backstop import Backstop

    bs = Backstop("127.0.0.1:50051")
    reply = bs.call("chat", lambda target, max_tokens, key_slot: ask(target, prompt, max_tokens))

See :class:`Backstop` (and :class:`AsyncBackstop`) for ``guard()``, ``call()``,
the deferred queue and admin calls; :func:`structured` for validated JSON
replies; :class:`DeferredWorker` to drain deferred requests.
"""

from ._local import LocalPolicy
from ._transport import TLSConfig
from .aio import AsyncBackstop
from .client import Backstop
from .errors import (
    AllTargetsFailed,
    BackstopError,
    BackstopUnreachable,
    CircuitOpen,
    ControlPlaneError,
    ControlPlaneUnavailable,
    MalformedOutput,
    PermissionDenied,
    PriorityReserved,
    RateLimited,
    Refused,
    RequestTooLarge,
    SpendLimitExceeded,
    StructuredOutputError,
    Unauthenticated,
)
from .guard import AsyncGuard, Guard
from .structured import Correction, Structured, structured
from .types import (
    Admission,
    AttemptError,
    BreakerMode,
    BreakerState,
    ClaimResult,
    Deferred,
    DeferredItem,
    FinishResult,
    NackResult,
    OutcomeClass,
    OutcomeCounters,
    OutcomeReport,
    OutcomeResult,
    Priority,
    QueueStat,
    Reason,
    RequestResult,
    RetryAdvice,
    ReconcileStats,
    RetryReason,
    RouteDecision,
    RouteStrategy,
    Skip,
    TargetStatus,
    TargetSummary,
)
from .worker import AsyncDeferredWorker, DeferredWorker, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "AllTargetsFailed",
    "AsyncBackstop",
    "AsyncDeferredWorker",
    "AsyncGuard",
    "AttemptError",
    "Backstop",
    "BackstopError",
    "BackstopUnreachable",
    "BreakerMode",
    "BreakerState",
    "CircuitOpen",
    "ClaimResult",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "Correction",
    "Deferred",
    "DeferredItem",
    "DeferredWorker",
    "FinishResult",
    "Guard",
    "LocalPolicy",
    "MalformedOutput",
    "NackResult",
    "OutcomeClass",
    "OutcomeCounters",
    "OutcomeReport",
    "OutcomeResult",
    "PermissionDenied",
    "Priority",
    "PriorityReserved",
    "QueueStat",
    "RateLimited",
    "Reason",
    "ReconcileStats",
    "Refused",
    "RequestResult",
    "RequestTooLarge",
    "RetryAdvice",
    "RetryReason",
    "RouteDecision",
    "RouteStrategy",
    "Skip",
    "SpendLimitExceeded",
    "Structured",
    "StructuredOutputError",
    "TLSConfig",
    "TargetStatus",
    "TargetSummary",
    "Unauthenticated",
    "WorkerStats",
    "structured",
]
