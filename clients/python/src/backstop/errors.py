"""Exceptions raised by the Backstop client.

Everything derives from :class:`BackstopError`. Refusals (the fleet says
"not now") derive from :class:`Refused` and carry ``retry_after``; errors from
the provider are never wrapped by ``guard()`` (your exception propagates
unchanged) and are collected, classified, in :class:`AllTargetsFailed` by
``call()``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from .types import AttemptError, BreakerState, Reason


class BackstopError(Exception):
    """Base class of every error this package raises."""


class ControlPlaneError(BackstopError):
    """Backstop answered with an error that is not an outage: a bad request
    (INVALID_ARGUMENT), an unknown route (NOT_FOUND), a missing admin token
    (UNAUTHENTICATED)... These are bugs or misconfiguration, so they are
    raised rather than papered over by the fail-safe.

    ``code`` is the ``grpc.StatusCode``.
    """

    def __init__(self, code: Any, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        name = getattr(code, "name", str(code))
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{name}: {details}")


class ControlPlaneUnavailable(ControlPlaneError):
    """Backstop could not be reached for a call that has no local fallback
    (the deferred queue, admin calls)."""


class Unauthenticated(ControlPlaneError):
    """Backstop refused the call's credentials (UNAUTHENTICATED): no token,
    an unknown one, or one the server does not accept (see ``token=``)."""


class PermissionDenied(ControlPlaneError):
    """The caller's principal lacks the role the call needs (PERMISSION_DENIED;
    the message names the role)."""


def control_plane_error(code: Any, details: str, method: str, outage_codes: Any = ()) -> ControlPlaneError:
    """The right :class:`ControlPlaneError` subclass for a gRPC status code."""
    if code in outage_codes:
        return ControlPlaneUnavailable(code, details, method)
    name = getattr(code, "name", "")
    if name == "UNAUTHENTICATED":
        return Unauthenticated(code, details, method)
    if name == "PERMISSION_DENIED":
        return PermissionDenied(code, details, method)
    return ControlPlaneError(code, details, method)


class Refused(BackstopError):
    """Backstop (or the local fail-safe) refused the call.

    ``retry_after`` is how many seconds until asking again can succeed
    (None when unknown). ``local`` is True when the refusal came from the
    client's local fail-safe rather than the fleet's shared view.
    """

    def __init__(
        self,
        target: str,
        reason: Reason,
        *,
        state: BreakerState = BreakerState.UNSPECIFIED,
        retry_after: Optional[float] = None,
        local: bool = False,
    ) -> None:
        self.target = target
        self.reason = reason
        self.state = state
        self.retry_after = retry_after
        self.local = local
        tail = f"; retry in {retry_after:.3g}s" if retry_after is not None else ""
        src = " (local fail-safe)" if local else ""
        super().__init__(f"{target}: refused: {reason.name}{tail}{src}")


class CircuitOpen(Refused):
    """The target's breaker is open, forced open, probing with every probe slot
    taken, or every API key of it is disabled."""


class RateLimited(Refused):
    """A request/token/concurrency budget is spent, the provider asked the
    fleet to pause, or the fleet's retry budget is spent. The two subclasses
    below (a budget's headroom reserved for higher priorities, a spend limit)
    are budget refusals too, so ``except RateLimited`` waits them out as well."""


class PriorityReserved(RateLimited):
    """The budget's remaining room is reserved for higher priorities (its
    ``reserve``): this call's priority fits again after ``retry_after`` seconds.
    Not the provider's fault, and not counted against the breaker."""


class SpendLimitExceeded(RateLimited):
    """A spend limit (money per window, on the target or a budget group it
    draws on) would be exceeded by this call's reservation (its input tokens
    at the input price plus ``max_output_tokens`` at the output price).
    ``retry_after`` says when the window frees enough. Not the provider's
    fault, and not counted against the breaker."""


class RequestTooLarge(Refused):
    """``estimated_tokens`` exceeds what the target's token budget can ever admit."""


class BackstopUnreachable(Refused):
    """Policy ``fail_closed``: Backstop is unreachable, so calls are refused."""


_CIRCUIT = {Reason.CIRCUIT_OPEN, Reason.PROBE_LIMIT, Reason.FORCED_OPEN, Reason.KEY_SLOTS_UNAVAILABLE}
_RATE = {Reason.RATE_LIMITED, Reason.CONCURRENCY_LIMIT, Reason.RETRY_BUDGET_EXHAUSTED}


def refusal(
    target: str,
    reason: Reason,
    *,
    state: BreakerState = BreakerState.UNSPECIFIED,
    retry_after: Optional[float] = None,
    local: bool = False,
) -> Refused:
    """The most specific :class:`Refused` subclass for ``reason``."""
    cls: type = Refused
    if reason in _CIRCUIT:
        cls = CircuitOpen
    elif reason in _RATE:
        cls = RateLimited
    elif reason == Reason.PRIORITY_RESERVED:
        cls = PriorityReserved
    elif reason == Reason.SPEND_LIMIT:
        cls = SpendLimitExceeded
    elif reason == Reason.REQUEST_TOO_LARGE:
        cls = RequestTooLarge
    elif reason == Reason.CONTROL_PLANE_UNAVAILABLE:
        cls = BackstopUnreachable
    err: Refused = cls(target, reason, state=state, retry_after=retry_after, local=local)
    return err


class AllTargetsFailed(BackstopError):
    """Every target of a route failed or was unavailable.

    ``errors`` lists every attempt and every skipped target, in order, so the
    message reads like a post-mortem: which model failed how, and which were
    never tried because their breaker was open. ``retry_after`` is when the
    soonest target may be available again (None if unknown).
    """

    def __init__(
        self,
        route: str,
        errors: Sequence[AttemptError],
        *,
        retry_after: Optional[float] = None,
        defer_error: Optional[BaseException] = None,
        note: str = "",
    ) -> None:
        self.route = route
        self.errors: Tuple[AttemptError, ...] = tuple(errors)
        self.retry_after = retry_after
        self.defer_error = defer_error
        targets = []
        for e in self.errors:
            if e.target not in targets:
                targets.append(e.target)
        head = f"all targets failed for {route}"
        if targets:
            head += f" ({len(targets)} tried or skipped)"
        lines = [head + ":"] + [f"  - {e}" for e in self.errors]
        if note:
            lines.append(f"  ({note})")
        if retry_after is not None:
            lines.append(f"  soonest retry in {retry_after:.3g}s")
        if defer_error is not None:
            lines.append(f"  and the request could not be deferred: {defer_error}")
        super().__init__("\n".join(lines))


class StructuredOutputError(BackstopError):
    """The model's reply still did not match the schema after ``max_corrections``
    correction prompts.

    ``reply`` is the last raw reply; ``errors`` holds each attempt's
    validation error, in order.
    """

    def __init__(self, reply: str, errors: Sequence[str], corrections: int) -> None:
        self.reply = reply
        self.errors = tuple(errors)
        self.corrections = corrections
        last = errors[-1] if errors else "no reply"
        super().__init__(
            f"structured output still invalid after {corrections} correction(s): {last}"
        )


class MalformedOutput(BackstopError):
    """A reply that did not parse or validate. Raised inside ``guard()`` /
    ``call()`` it is reported as PARTIAL (the provider answered; the answer
    was unusable), which is what a correction-prompt retry needs."""

    def __init__(self, message: str, reply: str = "") -> None:
        self.reply = reply
        super().__init__(message)
