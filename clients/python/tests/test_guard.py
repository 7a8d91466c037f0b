"""guard(): admission on entry, classified outcome on exit, asserted via the server."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict

import pytest

from backstop import (
    AsyncBackstop,
    Backstop,
    BreakerState,
    CircuitOpen,
    OutcomeClass,
    RateLimited,
    Reason,
    RetryReason,
)
from backstop.testing import (
    BackstopServer,
    FakeProvider,
    ProviderError,
    ProviderTimeout,
    context_length,
    hang,
    insufficient_quota,
    malformed,
    overloaded,
    rate_limited_anthropic,
    rate_limited_openai,
    server_error,
    unauthorized,
    unavailable,
)

# name -> (provider behaviour, class the server must record, counter that must read 1)
CASES: Dict[str, Any] = {
    "overloaded-529": (overloaded(), OutcomeClass.TRANSIENT, "transient"),
    "server-error-500": (server_error(), OutcomeClass.TRANSIENT, "transient"),
    "unavailable-503": (unavailable(), OutcomeClass.TRANSIENT, "transient"),
    "openai-429": (rate_limited_openai(retry_after=1), OutcomeClass.RATE_LIMITED, "rate_limited"),
    "anthropic-429": (rate_limited_anthropic(retry_after=1), OutcomeClass.RATE_LIMITED, "rate_limited"),
    "insufficient-quota-429": (insufficient_quota(), OutcomeClass.PERSISTENT, "persistent"),
    "unauthorized-401": (unauthorized(), OutcomeClass.PERSISTENT, "persistent"),
    "context-length-400": (context_length(), OutcomeClass.BAD_INPUT, "bad_input"),
    "timeout": (hang(2.0), OutcomeClass.TIMEOUT, "timeout"),
}


def _call(provider: FakeProvider, target: str) -> Any:
    return provider.complete(target, "hello there", timeout=0.3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_guard_classifies_provider_failures(case: str, bs: Backstop, provider: FakeProvider) -> None:
    behaviour, expected, counter = CASES[case]
    target = f"test/{case}"
    provider.set_default(target, behaviour)

    expected_exc = ProviderTimeout if expected == OutcomeClass.TIMEOUT else ProviderError
    with pytest.raises(expected_exc):  # the block's exception propagates unchanged
        with bs.guard(target, estimated_tokens=100) as g:
            _call(provider, target)

    assert g.outcome is not None and not g.outcome.local
    assert g.outcome.classified_as == expected
    status = bs.get_target(target)
    counters = status.counters
    assert getattr(counters, counter) == 1, counters
    others: Dict[str, int] = {f: getattr(counters, f) for f in ("success", "transient", "rate_limited", "persistent", "bad_input", "partial", "timeout")}
    del others[counter]
    assert set(others.values()) == {0}, others
    assert status.counters.admitted == 1

    if expected == OutcomeClass.PERSISTENT:
        # Opens at once, and stays open far longer than an ordinary failure would.
        assert status.state == BreakerState.OPEN
        assert g.outcome.retry.retry is False and g.outcome.retry.reason == RetryReason.PERSISTENT
    if expected == OutcomeClass.BAD_INPUT:
        assert status.state == BreakerState.CLOSED and status.consecutive_failures == 0
        assert g.outcome.retry.reason == RetryReason.BAD_INPUT
    if expected in (OutcomeClass.TRANSIENT, OutcomeClass.TIMEOUT):
        assert status.consecutive_failures == 1
        assert g.outcome.retry.retry is True and g.outcome.retry.reason == RetryReason.RETRYABLE


@pytest.mark.parametrize(
    "case,behaviour,limit",
    [("openai", rate_limited_openai(retry_after=1), 500), ("anthropic", rate_limited_anthropic(retry_after=1), 50)],
)
def test_rate_limit_headers_reach_the_server(
    case: str, behaviour: Dict[str, Any], limit: int, bs: Backstop, provider: FakeProvider
) -> None:
    """The raw 429 headers are passed through: the server learns the limits and
    pauses the target for the whole fleet, so the next admission is refused."""
    target = f"test/headers-{case}"
    provider.set_default(target, behaviour)
    with pytest.raises(ProviderError):
        with bs.guard(target) as g:
            _call(provider, target)
    assert g.report is not None and g.report.headers["retry-after"]
    slot = bs.get_target(target).key_slots[0]
    assert slot.paused_until is not None
    assert slot.learned["requests"] == (limit, 0)
    assert g.outcome is not None and g.outcome.retry.delay >= 0.9  # max(retry-after, backoff)

    with pytest.raises(RateLimited) as refused:
        with bs.guard(target):
            pytest.fail("a paused target must not be admitted")
    assert refused.value.reason == Reason.RATE_LIMITED
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 1.5


def test_success_reports_usage_and_headers(bs: Backstop, provider: FakeProvider) -> None:
    target = "test/success"
    with bs.guard(target, estimated_tokens=50) as g:
        reply = _call(provider, target)
        g.usage(reply.usage.input_tokens, reply.usage.output_tokens)
        g.response_headers({"x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "12345"})
    assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.SUCCESS
    assert g.report is not None and g.report.output_tokens == 12 and g.report.latency is not None
    status = bs.get_target(target)
    assert status.counters.success == 1
    assert status.key_slots[0].learned["tokens"] == (30000, 12345)


def test_malformed_reply_is_partial(bs: Backstop, provider: FakeProvider) -> None:
    target = "test/malformed"
    provider.script(target, malformed())
    with pytest.raises(json.JSONDecodeError):
        with bs.guard(target) as g:
            json.loads(_call(provider, target).text)
    assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.PARTIAL
    assert g.outcome.retry.reason == RetryReason.CORRECT_AND_RETRY
    status = bs.get_target(target)
    assert status.counters.partial == 1 and status.consecutive_failures == 0


def test_a_bug_in_the_block_does_not_blame_the_provider(bs: Backstop) -> None:
    target = "test/bug"
    settings: Dict[str, str] = {}
    for _ in range(3):  # more than failure_threshold
        with pytest.raises(KeyError):
            with bs.guard(target):
                settings["missing"]
    status = bs.get_target(target)
    assert status.state == BreakerState.CLOSED and status.consecutive_failures == 0
    assert status.counters.bad_input == 3


def test_open_breaker_refuses_on_entry(bs: Backstop, provider: FakeProvider) -> None:
    target = "test/opens"
    provider.set_default(target, overloaded())
    for _ in range(2):  # failure_threshold = 2
        with pytest.raises(ProviderError):
            with bs.guard(target):
                _call(provider, target)
    calls = provider.calls(target)
    with pytest.raises(CircuitOpen) as refused:
        with bs.guard(target):
            _call(provider, target)
    assert refused.value.reason == Reason.CIRCUIT_OPEN and not refused.value.local
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 0.5
    assert provider.calls(target) == calls, "the block must not run when refused"
    assert bs.get_target(target).state == BreakerState.OPEN


def test_async_guard(server: BackstopServer, provider: FakeProvider) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0) as abs_:
            target = "test/async"
            async with abs_.guard(target, estimated_tokens=10) as g:
                await asyncio.sleep(0)
            assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.SUCCESS

            with pytest.raises(asyncio.TimeoutError):
                async with abs_.guard(target) as g:
                    await asyncio.wait_for(asyncio.sleep(1), timeout=0.05)
            assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.TIMEOUT

            provider.set_default(target, overloaded())
            loop = asyncio.get_running_loop()
            with pytest.raises(ProviderError):
                async with abs_.guard(target) as g:
                    await loop.run_in_executor(None, _call, provider, target)
            # Second consecutive failure (timeout, then 529) opens it: threshold 2.
            assert g.outcome is not None and g.outcome.state == BreakerState.OPEN
            with pytest.raises(CircuitOpen):
                async with abs_.guard(target):
                    pass
            status = await abs_.get_target(target)
            assert (status.counters.success, status.counters.timeout, status.counters.transient) == (1, 1, 1)

    asyncio.run(main())


def test_report_as_overrides_classification(bs: Backstop) -> None:
    target = "test/override"
    with bs.guard(target) as g:
        g.report_as(OutcomeClass.PARTIAL)
    assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.PARTIAL
    assert bs.get_target(target).counters.partial == 1


