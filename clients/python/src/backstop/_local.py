"""The local fail-safe: what the client decides alone while Backstop is unreachable.

A small in-process copy of the server's rules with the server's defaults: one
circuit breaker per target (open after ``failure_threshold`` consecutive
failures, half-open with one probe after ``open_duration``, closed after
``success_threshold`` probe successes), the same failure taxonomy
(:mod:`backstop._taxonomy`, held to the server's by the tests), a pause on
429s that carry a retry hint, and full-jitter backoff. It is deliberately
per-process: it exists so that an agent keeps working (and keeps backing off)
when its control plane is gone, not to replace the fleet's shared view.
"""

from __future__ import annotations

import email.utils
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from ._taxonomy import classify as classify
from .types import (
    Admission,
    BreakerState,
    OutcomeClass,
    OutcomeReport,
    OutcomeResult,
    Reason,
    RetryAdvice,
    RetryReason,
    RouteDecision,
    RouteStrategy,
    Skip,
)

LOCAL_PERMIT_PREFIX = "local:"


@dataclass(frozen=True)
class LocalPolicy:
    """Settings of the local fail-safe. The defaults are the server's defaults."""

    failure_threshold: int = 5
    success_threshold: int = 2
    open_duration: float = 60.0
    persistent_open_duration: float = 600.0
    #: How long a half-open probe may stay unreported before its slot is reclaimed.
    probe_lease: float = 30.0
    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    #: Clamp on a pause a provider's retry-after can impose.
    max_pause: float = 3600.0


def retry_hint(headers: Mapping[str, str], explicit: Optional[float] = None) -> Optional[float]:
    """The provider's retry hint in seconds: ``retry-after-ms``, ``retry-after``
    (seconds or an HTTP date) or the explicit value, whichever is longest."""
    hints: List[float] = []
    if explicit is not None and explicit > 0:
        hints.append(explicit)
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            hints.append(float(ms) / 1000.0)
        except ValueError:
            pass
    ra = lower.get("retry-after")
    if ra is not None:
        try:
            hints.append(float(ra))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
                hints.append(when.timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    good = [h for h in hints if h > 0]
    return max(good) if good else None


@dataclass
class _Breaker:
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    half_open_successes: int = 0
    probes: Dict[str, float] = field(default_factory=dict)
    paused_until: float = 0.0


class LocalEngine:
    """Per-process breakers, pauses and retry advice. Thread-safe."""

    def __init__(
        self,
        policy: LocalPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._breakers: Dict[str, _Breaker] = {}
        self._ids = itertools.count(1)

    def _tick(self, b: _Breaker, now: float) -> None:
        if b.state == BreakerState.OPEN and now >= b.open_until:
            b.state = BreakerState.HALF_OPEN
            b.half_open_successes = 0
            b.probes.clear()
        if b.state == BreakerState.HALF_OPEN:
            for p, until in list(b.probes.items()):
                if until <= now:
                    del b.probes[p]

    def _open(self, b: _Breaker, now: float, for_seconds: float) -> None:
        b.state = BreakerState.OPEN
        b.open_until = max(b.open_until, now + for_seconds)
        b.failures = 0
        b.half_open_successes = 0
        b.probes.clear()

    def state_of(self, target: str) -> BreakerState:
        with self._lock:
            b = self._breakers.get(target)
            if b is None:
                return BreakerState.CLOSED
            self._tick(b, self._clock())
            return b.state

    def seed_open(self, target: str, retry_after: float) -> None:
        """Carries a fleet-wide refusal seen just before the outage into local mode,
        so a target the fleet had opened is not hammered the moment Backstop goes away."""
        with self._lock:
            b = self._breakers.setdefault(target, _Breaker())
            now = self._clock()
            if retry_after > 0 and b.state == BreakerState.CLOSED:
                b.state = BreakerState.OPEN
                b.open_until = now + min(retry_after, self.policy.max_pause)

    def admit(self, target: str, attempt: int = 0) -> Admission:
        with self._lock:
            now = self._clock()
            b = self._breakers.setdefault(target, _Breaker())
            self._tick(b, now)

            def refuse(reason: Reason, after: Optional[float]) -> Admission:
                return Admission(target, False, reason, b.state, retry_after=after, local=True)

            if b.state == BreakerState.OPEN:
                return refuse(Reason.CIRCUIT_OPEN, max(0.0, b.open_until - now))
            if b.paused_until > now:
                return refuse(Reason.RATE_LIMITED, b.paused_until - now)
            permit = f"{LOCAL_PERMIT_PREFIX}{next(self._ids)}"
            if b.state == BreakerState.HALF_OPEN:
                if b.probes:
                    return refuse(Reason.PROBE_LIMIT, max(0.0, min(b.probes.values()) - now))
                b.probes[permit] = now + self.policy.probe_lease
            return Admission(target, True, Reason.ALLOWED, b.state, permit=permit, local=True)

    def _advise(self, cls: OutcomeClass, attempt: int, hint: Optional[float]) -> RetryAdvice:
        p = self.policy
        if cls == OutcomeClass.SUCCESS:
            return RetryAdvice(False, 0.0, RetryReason.SUCCEEDED)
        if cls == OutcomeClass.PERSISTENT:
            return RetryAdvice(False, 0.0, RetryReason.PERSISTENT)
        if cls == OutcomeClass.BAD_INPUT:
            return RetryAdvice(False, 0.0, RetryReason.BAD_INPUT)
        if attempt >= p.max_retries:
            return RetryAdvice(False, 0.0, RetryReason.MAX_RETRIES)
        if cls == OutcomeClass.PARTIAL:
            return RetryAdvice(True, 0.0, RetryReason.CORRECT_AND_RETRY)
        cap = min(p.max_delay, p.base_delay * (2.0 ** min(attempt, 62)))
        delay = max(cap * self._rand(), hint or 0.0)
        return RetryAdvice(True, delay, RetryReason.RETRYABLE)

    def record(self, report: OutcomeReport) -> OutcomeResult:
        cls = classify(report.outcome, report.http_status, report.error_type)
        hint = retry_hint(report.headers, report.retry_after)
        if hint is not None:
            hint = min(hint, self.policy.max_pause)
        with self._lock:
            now = self._clock()
            b = self._breakers.setdefault(report.target, _Breaker())
            self._tick(b, now)
            was_probe = b.probes.pop(report.permit, None) is not None
            if cls == OutcomeClass.RATE_LIMITED and hint:
                b.paused_until = max(b.paused_until, now + hint)
                effect = "ignore"
            elif cls in (OutcomeClass.SUCCESS, OutcomeClass.PARTIAL):
                effect = "success"
            elif cls == OutcomeClass.PERSISTENT:
                effect = "persistent"
            elif cls == OutcomeClass.BAD_INPUT:
                effect = "ignore"
            else:
                effect = "failure"
            p = self.policy
            if effect == "persistent":
                self._open(b, now, p.persistent_open_duration)
            elif b.state == BreakerState.HALF_OPEN and was_probe:
                if effect == "success":
                    b.half_open_successes += 1
                    if b.half_open_successes >= p.success_threshold:
                        b.state = BreakerState.CLOSED
                        b.failures = 0
                        b.probes.clear()
                elif effect == "failure":
                    self._open(b, now, p.open_duration)
            elif b.state == BreakerState.CLOSED:
                if effect == "success":
                    b.failures = 0
                elif effect == "failure":
                    b.failures += 1
                    if b.failures >= p.failure_threshold:
                        self._open(b, now, p.open_duration)
            advice = self._advise(cls, report.attempt, hint)
            return OutcomeResult(report.target, cls, b.state, advice, local=True)

    def route(
        self,
        candidates: Sequence[str],
        exclude: Sequence[str],
        attempt: int = 0,
        *,
        strategy: Optional[RouteStrategy] = None,
    ) -> RouteDecision:
        """The first admissible candidate in list order. A requested
        ``strategy`` cannot be applied here (latencies, load and prices are the
        fleet's, on the server): the decision says ORDERED, and why."""
        skipped: List[Skip] = []
        excluded = set(exclude)
        why = "local fail-safe (Backstop unreachable): first admissible in list order"
        if strategy is not None and strategy not in (RouteStrategy.UNSPECIFIED, RouteStrategy.ORDERED):
            why += f"; {strategy.value} needs the server"
        for depth, cand in enumerate(candidates):
            if cand in excluded:
                skipped.append(Skip(cand, Reason.EXCLUDED))
                continue
            adm = self.admit(cand, attempt)
            if adm.allowed:
                return RouteDecision(
                    target=cand,
                    permit=adm.permit,
                    key_slot=adm.key_slot,
                    fallback_depth=depth,
                    skipped=tuple(skipped),
                    state=adm.state,
                    local=True,
                    strategy=RouteStrategy.ORDERED,
                    reason=why,
                )
            skipped.append(Skip(cand, adm.reason, adm.retry_after))
        afters = [s.retry_after for s in skipped if s.retry_after is not None]
        return RouteDecision(
            target=None,
            skipped=tuple(skipped),
            retry_after=min(afters) if afters else None,
            local=True,
            strategy=RouteStrategy.ORDERED,
        )


class RouteMemory:
    """Candidate lists of routes, as configured locally and as learned from
    Route responses (the chosen target and every skipped one, in order), so
    the fail-safe can fall back along the same order the server uses."""

    def __init__(self, configured: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        self._lock = threading.Lock()
        self._routes: Dict[str, List[str]] = {k: list(v) for k, v in (configured or {}).items()}

    def learn(self, route: str, decision: RouteDecision) -> None:
        observed = [s.target for s in decision.skipped]
        if decision.target:
            observed.append(decision.target)
        if not observed:
            return
        with self._lock:
            known = self._routes.setdefault(route, [])
            for i, t in enumerate(observed):
                if t in known:
                    continue
                if i == 0:
                    known.insert(0, t)
                else:
                    known.insert(known.index(observed[i - 1]) + 1, t)

    def candidates(self, route: str) -> List[str]:
        with self._lock:
            return list(self._routes.get(route, ()))
