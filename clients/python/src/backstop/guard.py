"""``guard()``: one provider call between CanProceed and RecordOutcome.

    with bs.guard("anthropic/claude-sonnet", estimated_tokens=2000) as g:
        reply = client.messages.create(model=..., max_tokens=..., messages=...)
        g.usage(reply.usage.input_tokens, reply.usage.output_tokens)

Entering asks CanProceed and raises :class:`CircuitOpen` / :class:`RateLimited`
(with ``retry_after``) when refused; :class:`PriorityReserved` and
:class:`SpendLimitExceeded` are the RateLimited of a budget's priority reserve
and of a spend limit. Leaving reports the outcome, classified
from what the block did (see :func:`backstop._classify.observe_exception`),
and never swallows the block's exception. ``g.outcome`` then holds what
Backstop made of it, including its retry advice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from types import TracebackType
from typing import Any, Awaitable, Dict, Mapping, Optional, Protocol, Type

from ._classify import Observed, normalize_headers, observe_exception
from .errors import ControlPlaneError, refusal
from .types import Admission, OutcomeClass, OutcomeReport, OutcomeResult, PriorityArg, RequestResult, RequestResultArg

log = logging.getLogger("backstop")


# What a guard needs from its client, and nothing more: the clients import this
# module, so it must not import them (a Protocol is satisfied structurally).


class SyncClient(Protocol):
    caller: str

    def can_proceed(
        self,
        target: str,
        *,
        estimated_tokens: int = ...,
        attempt: int = ...,
        priority: PriorityArg = ...,
        max_output_tokens: int = ...,
        request_id: str = ...,
    ) -> Admission: ...

    def _record(self, report: OutcomeReport) -> OutcomeResult: ...

    def _finish_quietly(self, request_id: str, result: RequestResultArg) -> None: ...


class AsyncClient(Protocol):
    caller: str

    def can_proceed(
        self,
        target: str,
        *,
        estimated_tokens: int = ...,
        attempt: int = ...,
        priority: PriorityArg = ...,
        max_output_tokens: int = ...,
        request_id: str = ...,
    ) -> Awaitable[Admission]: ...

    def _record(self, report: OutcomeReport) -> Awaitable[OutcomeResult]: ...

    def _finish_quietly(self, request_id: str, result: RequestResultArg) -> Awaitable[None]: ...


def _admitted(adm: Admission) -> Admission:
    if not adm.allowed:
        raise refusal(adm.target, adm.reason, state=adm.state, retry_after=adm.retry_after, local=adm.local)
    return adm


class _GuardBase:
    def __init__(
        self,
        target: str,
        estimated_tokens: int,
        attempt: int,
        caller: str,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> None:
        self.target = target
        #: The user request this call serves, sent on its CanProceed and
        #: RecordOutcome. A guard without one is a request of its own: its
        #: success closes it as completed, a refusal or failure as failed. A
        #: ``request_id`` you pass may span several guards (your retries): a
        #: success completes it, a failure leaves it open for your next
        #: attempt or your :meth:`~backstop.Backstop.finish_request`.
        self.request_id = request_id or uuid.uuid4().hex
        self._own_request = not request_id
        self.estimated_tokens = estimated_tokens
        self.attempt = attempt
        #: Sent with the CanProceed on entry.
        self.priority = priority
        self.max_output_tokens = max_output_tokens
        self._caller = caller
        #: The admission (set on entry).
        self.admission: Optional[Admission] = None
        #: What Backstop made of the outcome (set on exit).
        self.outcome: Optional[OutcomeResult] = None
        #: The report that was sent (set on exit).
        self.report: Optional[OutcomeReport] = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._headers: Dict[str, str] = {}
        self._override: Optional[Dict[str, Any]] = None
        self._started = 0.0

    @property
    def permit(self) -> str:
        return self.admission.permit if self.admission else ""

    @property
    def key_slot(self) -> str:
        """Which API key to use for this call ("" when the target declares none)."""
        return self.admission.key_slot if self.admission else ""

    @property
    def local(self) -> bool:
        """True when admitted by the local fail-safe (Backstop unreachable)."""
        return bool(self.admission and self.admission.local)

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        """Token usage of the call: settles the token budget with real numbers."""
        self._input_tokens = max(0, int(input_tokens))
        self._output_tokens = max(0, int(output_tokens))

    def response_headers(self, headers: Any) -> None:
        """Headers of a *successful* response: their rate-limit fields let the
        server pause the fleet before the provider starts answering 429."""
        self._headers = normalize_headers(headers)

    def report_as(
        self,
        outcome: OutcomeClass = OutcomeClass.UNSPECIFIED,
        *,
        http_status: int = 0,
        error_type: str = "",
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Overrides the automatic classification, e.g. ``g.report_as(OutcomeClass.PARTIAL)``
        for a reply the block judged unusable without raising."""
        self._override = {
            "outcome": outcome,
            "http_status": http_status,
            "error_type": error_type,
            "headers": normalize_headers(headers) if headers is not None else None,
        }

    def _build(self, exc: Optional[BaseException]) -> OutcomeReport:
        latency = time.monotonic() - self._started
        if exc is None:
            obs = Observed(outcome=OutcomeClass.SUCCESS, headers=dict(self._headers))
        else:
            obs = observe_exception(exc)
        if self._override is not None:
            o = self._override
            obs = dataclasses.replace(
                obs,
                outcome=o["outcome"],
                http_status=o["http_status"] or obs.http_status,
                error_type=o["error_type"] or obs.error_type,
                headers=o["headers"] if o["headers"] is not None else obs.headers,
            )
        obs = dataclasses.replace(obs, input_tokens=self._input_tokens, output_tokens=self._output_tokens)
        adm = self.admission
        assert adm is not None
        report = obs.report(
            target=self.target,
            permit=adm.permit,
            key_slot=adm.key_slot,
            attempt=self.attempt,
            latency=latency,
            caller=self._caller,
        )
        completed = exc is None and obs.outcome in (OutcomeClass.SUCCESS, OutcomeClass.UNSPECIFIED)
        return dataclasses.replace(
            report, request_id=self.request_id, finish=RequestResult.COMPLETED if completed else None
        )

    def _fails_request(self, report: Optional[OutcomeReport]) -> bool:
        """Whether leaving (or a refusal) closes the guard's own request as failed."""
        return self._own_request and (report is None or report.finish is None)

    def _report_failed(self, err: ControlPlaneError, exc: Optional[BaseException]) -> None:
        if exc is None:
            raise err
        # The block's own exception matters more; do not replace it.
        log.error("could not report the outcome of a call to %s: %s", self.target, err)


class Guard(_GuardBase):
    """Sync guard; see the module docs. Create with :meth:`Backstop.guard`."""

    def __init__(
        self,
        client: SyncClient,
        target: str,
        estimated_tokens: int = 0,
        attempt: int = 0,
        *,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(target, estimated_tokens, attempt, client.caller, priority, max_output_tokens, request_id)
        self._client = client

    def __enter__(self) -> Guard:
        adm = self._client.can_proceed(
            self.target,
            estimated_tokens=self.estimated_tokens,
            attempt=self.attempt,
            priority=self.priority,
            max_output_tokens=self.max_output_tokens,
            request_id=self.request_id,
        )
        if not adm.allowed and self._fails_request(None):
            self._client._finish_quietly(self.request_id, RequestResult.FAILED)
        self.admission = _admitted(adm)
        self._started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.report = self._build(exc)
        try:
            self.outcome = self._client._record(self.report)
        except ControlPlaneError as err:
            self._report_failed(err, exc)
        finally:
            if self._fails_request(self.report):
                self._client._finish_quietly(self.request_id, RequestResult.FAILED)


class AsyncGuard(_GuardBase):
    """asyncio guard; see the module docs. Create with :meth:`AsyncBackstop.guard`."""

    def __init__(
        self,
        client: AsyncClient,
        target: str,
        estimated_tokens: int = 0,
        attempt: int = 0,
        *,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(target, estimated_tokens, attempt, client.caller, priority, max_output_tokens, request_id)
        self._client = client

    async def __aenter__(self) -> AsyncGuard:
        adm = await self._client.can_proceed(
            self.target,
            estimated_tokens=self.estimated_tokens,
            attempt=self.attempt,
            priority=self.priority,
            max_output_tokens=self.max_output_tokens,
            request_id=self.request_id,
        )
        if not adm.allowed and self._fails_request(None):
            await self._client._finish_quietly(self.request_id, RequestResult.FAILED)
        self.admission = _admitted(adm)
        self._started = time.monotonic()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.report = self._build(exc)
        try:
            self.outcome = await self._client._record(self.report)
        except ControlPlaneError as err:
            self._report_failed(err, exc)
        finally:
            if self._fails_request(self.report):
                await self._client._finish_quietly(self.request_id, RequestResult.FAILED)
