"""The ``call()`` loop, written once for the sync and the asyncio client.

The loop is a generator that *describes* what to do (route, call the
provider, report, sleep, defer) by yielding small operation objects, and
receives each result back. :class:`backstop.Backstop` runs it with blocking
calls, :class:`backstop.AsyncBackstop` with awaits; the policy itself (when to
retry the same target, when to fall back, what to collect for the error
message) exists in exactly one place.

Errors raised while executing an operation (e.g. NOT_FOUND for an unknown
route) are thrown into the generator, so it can react (a failed Defer becomes
part of :class:`AllTargetsFailed`) or let them propagate.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from ._classify import Observed, describe, observe_exception, observe_success
from .errors import AllTargetsFailed, BackstopError, StructuredOutputError
from .types import (
    Admission,
    AttemptError,
    Deferred,
    OutcomeClass,
    OutcomeReport,
    OutcomeResult,
    Priority,
    Reason,
    RequestResult,
    RouteDecision,
    RouteStrategy,
)

# --- operations ------------------------------------------------------------------


@dataclass(frozen=True)
class RouteOp:
    route: Optional[str]
    candidates: Sequence[str]
    estimated_tokens: int
    required_context_tokens: int
    exclude: Sequence[str]
    attempt: int
    priority: Optional[Priority] = None
    max_output_tokens: int = 0
    strategy: Optional[RouteStrategy] = None
    expected_output_tokens: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class AdmitOp:
    target: str
    estimated_tokens: int
    attempt: int
    priority: Optional[Priority] = None
    max_output_tokens: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class InvokeOp:
    """Call the provider function with ``(target, max_tokens, key_slot)``."""

    target: str
    max_tokens: int
    key_slot: str


@dataclass(frozen=True)
class RecordOp:
    report: OutcomeReport


@dataclass(frozen=True)
class SleepOp:
    seconds: float


@dataclass(frozen=True)
class DeferOp:
    queue: str
    payload: bytes
    metadata: Mapping[str, str]
    idempotency_key: str
    max_attempts: int


@dataclass(frozen=True)
class FinishOp:
    """Close the user request (FinishRequest) when it did not end with a
    success report: FAILED or DEFERRED. ``route``, ``elapsed`` and
    ``attempts`` count only on a server that never saw the request. The
    executor skips it in local mode and never lets it fail the call."""

    request_id: str
    result: RequestResult
    route: str
    elapsed: float
    attempts: int


Op = Union[RouteOp, AdmitOp, InvokeOp, RecordOp, SleepOp, DeferOp, FinishOp]


@dataclass
class Invoked:
    """What one provider call produced."""

    value: Any = None
    error: Optional[BaseException] = None
    latency: float = 0.0


@dataclass
class CallSpec:
    """Everything :func:`call_plan` needs besides the I/O."""

    route: Optional[str]
    candidates: Sequence[str]
    caller: str
    estimated_tokens: int = 0
    required_context_tokens: int = 0
    exclude: Sequence[str] = ()
    defer: bool = False
    queue: str = ""
    payload: Optional[bytes] = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    max_attempts: int = 0
    #: Seconds from the start after which no retry sleep is begun (None = no limit).
    deadline: Optional[float] = None
    #: Sent with every Route and CanProceed of the call.
    priority: Optional[Priority] = None
    max_output_tokens: int = 0
    #: Sent with every Route of the call (None = the route's own strategy).
    strategy: Optional[RouteStrategy] = None
    expected_output_tokens: int = 0
    #: The user request's id, sent on every Route / CanProceed / RecordOutcome
    #: of the call ("" = not measured as a request).
    request_id: str = ""
    clock: Callable[[], float] = time.monotonic


def encode_payload(payload: Any) -> bytes:
    """bytes as-is, str as UTF-8, anything else as JSON (read back with ``item.json()``)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")


def _report(
    spec: CallSpec,
    target: str,
    permit: str,
    key_slot: str,
    attempt: int,
    obs: Observed,
    latency: float,
    finish: Optional[RequestResult] = None,
) -> OutcomeReport:
    report = obs.report(
        target=target, permit=permit, key_slot=key_slot, attempt=attempt, latency=latency, caller=spec.caller
    )
    if not spec.request_id:
        return report
    return dataclasses.replace(report, request_id=spec.request_id, finish=finish)


def _refusal_error(adm: Admission) -> AttemptError:
    return AttemptError(
        target=adm.target,
        outcome=None,
        message="refused",
        reason=adm.reason,
        retry_after=adm.retry_after,
    )


def _post_mortem(errors: List[AttemptError], final: RouteDecision, tried: List[str]) -> List[AttemptError]:
    """Every error in route order: each tried target's attempts, and for the
    others why the last Route passed them over (e.g. CIRCUIT_OPEN, retry in 41s)."""
    by_target: Dict[str, List[AttemptError]] = {}
    for e in errors:
        by_target.setdefault(e.target, []).append(e)
    ordered: List[AttemptError] = []
    for s in final.skipped:
        if s.target in by_target:
            ordered.extend(by_target.pop(s.target))
        elif s.reason != Reason.EXCLUDED and s.target not in tried:
            ordered.append(AttemptError(s.target, None, "skipped", reason=s.reason, retry_after=s.retry_after))
    for rest in by_target.values():
        ordered.extend(rest)
    return ordered


def _route_name(spec: CallSpec) -> str:
    if spec.route:
        return f"route {spec.route!r}"
    return "candidates [" + ", ".join(spec.candidates) + "]"


# How large the prompt was, as the provider's context-length error states it:
# OpenAI "... However, your messages resulted in 150000 tokens", Anthropic
# "prompt is too long: 150000 tokens > 100000 maximum".
_PROMPT_TOKENS = (
    re.compile(r"resulted in (\d+) tokens"),
    re.compile(r"(\d+) tokens > \d+"),
)


def context_tokens_needed(text: str) -> int:
    """The prompt size a context-length error reports (0 if it says none), so
    the fallback Route can skip every model whose window is too small."""
    for pattern in _PROMPT_TOKENS:
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    return 0


class _Progress:
    """What the request-level bookkeeping needs from the attempts loop."""

    __slots__ = ("attempts", "completed")

    def __init__(self) -> None:
        self.attempts = 0
        self.completed = False


def call_plan(spec: CallSpec) -> Generator[Op, Any, Any]:
    """:func:`_attempts`, closed as one user request: the success report
    carries ``finish=COMPLETED``; giving up (an exception) finishes it FAILED
    and deferring it DEFERRED, with the client's own elapsed time and attempt
    count (used by a server that never saw the request)."""
    started = spec.clock()
    progress = _Progress()
    try:
        value = yield from _attempts(spec, progress, started)
    except Exception:
        if spec.request_id and not progress.completed:
            yield _finish(spec, RequestResult.FAILED, progress, started)
        raise
    if isinstance(value, Deferred) and spec.request_id:
        yield _finish(spec, RequestResult.DEFERRED, progress, started)
    return value


def _finish(spec: CallSpec, result: RequestResult, progress: _Progress, started: float) -> FinishOp:
    return FinishOp(spec.request_id, result, spec.route or "", max(0.0, spec.clock() - started), progress.attempts)


def _attempts(spec: CallSpec, progress: _Progress, started: float) -> Generator[Op, Any, Any]:
    """Route -> call -> report -> retry per advice -> fall back -> exhausted.

    * After a failure whose advice says retry, sleep the advised delay and ask
      CanProceed for the *same* target with ``attempt + 1`` (the server draws
      on the fleet's retry budget); a refusal ends that target.
    * When the advice says not to retry (PERSISTENT, BAD_INPUT, MAX_RETRIES,
      RETRY_BUDGET_EXHAUSTED), exclude the target and Route again.
    * A PERSISTENT failure on a named key slot (e.g. a 401 for one API key)
      disables only that slot: Route again *without* excluding the target, so
      another key of the same model serves (a slot that failed twice is
      excluded, so this ends).
    * A BAD_INPUT whose message states the prompt size (a context-length
      error) raises ``required_context_tokens`` for the next Routes, so the
      fallback only goes to models whose context window fits.
    * When Route has no target left: defer (if asked) or raise
      :class:`AllTargetsFailed` with every attempt and every skip.
    """
    errors: List[AttemptError] = []
    exclude: List[str] = list(spec.exclude)
    tried: List[str] = []
    failed_slots: List[Tuple[str, str]] = []
    required_context = spec.required_context_tokens
    last: Optional[RouteDecision] = None
    while True:
        decision: RouteDecision = yield RouteOp(
            spec.route,
            spec.candidates,
            spec.estimated_tokens,
            required_context,
            exclude,
            0,
            priority=spec.priority,
            max_output_tokens=spec.max_output_tokens,
            strategy=spec.strategy,
            expected_output_tokens=spec.expected_output_tokens,
            request_id=spec.request_id,
        )
        last = decision
        if decision.target is None:
            errors = _post_mortem(errors, decision, tried)
            break
        target = decision.target
        if decision.key_slot and (target, decision.key_slot) in failed_slots:
            exclude.append(target)
            continue
        tried.append(target)
        permit, key_slot, attempt = decision.permit, decision.key_slot, 0
        slot_failed = False
        while True:
            inv: Invoked = yield InvokeOp(target, decision.max_tokens, key_slot)
            progress.attempts += 1
            if inv.error is None:
                obs = observe_success(inv.value)
                progress.completed = True  # closed by the report, even if that report is lost
                yield RecordOp(
                    _report(spec, target, permit, key_slot, attempt, obs, inv.latency, RequestResult.COMPLETED)
                )
                return inv.value
            obs = observe_exception(inv.error)
            result: OutcomeResult = yield RecordOp(
                _report(spec, target, permit, key_slot, attempt, obs, inv.latency)
            )
            errors.append(
                AttemptError(
                    target=target,
                    outcome=result.classified_as,
                    message=obs.message or describe(inv.error),
                    http_status=obs.http_status,
                    attempt=attempt,
                    exception=inv.error,
                )
            )
            if isinstance(inv.error, StructuredOutputError):
                # The corrections are used up: falling back would only repeat them.
                raise inv.error
            if not isinstance(inv.error, Exception):
                raise inv.error  # cancellation / interrupt: reported, never swallowed
            advice = result.retry
            if result.classified_as == OutcomeClass.BAD_INPUT:
                required_context = max(required_context, context_tokens_needed(f"{obs.error_type} {obs.message}"))
            if not advice.retry:
                if result.classified_as == OutcomeClass.PERSISTENT and key_slot:
                    failed_slots.append((target, key_slot))
                    slot_failed = True
                break
            if spec.deadline is not None and spec.clock() - started + advice.delay > spec.deadline:
                break
            if advice.delay > 0:
                yield SleepOp(advice.delay)
            attempt += 1
            adm: Admission = yield AdmitOp(
                target,
                spec.estimated_tokens,
                attempt,
                priority=spec.priority,
                max_output_tokens=spec.max_output_tokens,
                request_id=spec.request_id,
            )
            if not adm.allowed:
                errors.append(_refusal_error(adm))
                break
            permit, key_slot = adm.permit, adm.key_slot
        if slot_failed:
            continue  # only that key is disabled: another key slot of the same target may serve
        exclude.append(target)

    retry_after = last.retry_after if last is not None else None
    note = ""
    if last is not None and last.local and not last.skipped and not tried:
        note = (
            "Backstop is unreachable and this client knows no targets for it; "
            "pass local_routes={...} to keep routing while the control plane is down"
        )
    if spec.defer:
        assert spec.payload is not None
        try:
            d = yield DeferOp(spec.queue, spec.payload, spec.metadata, spec.idempotency_key, spec.max_attempts)
        except BackstopError as e:
            raise AllTargetsFailed(
                _route_name(spec), errors, retry_after=retry_after, defer_error=e, note=note
            ) from e
        return Deferred(
            id=d.id,
            queue=d.queue,
            message=d.message,
            duplicate=d.duplicate,
            depth=d.depth,
            errors=tuple(errors),
        )
    raise AllTargetsFailed(_route_name(spec), errors, retry_after=retry_after, note=note)


def defer_message(depth: int) -> str:
    """A fallback user message when the server's is empty."""
    ahead = f" ({depth} request(s) waiting)" if depth else ""
    return f"All models are busy right now; your request is saved and will be processed shortly{ahead}."


def metadata_dict(metadata: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}
