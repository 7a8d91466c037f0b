"""Priorities, spend limits and routing strategies, against the real server.

* A budget with ``reserve = { interactive = 0.3 }`` keeps its last 30 % for
  interactive calls: batch and default calls are refused PRIORITY_RESERVED
  (``PriorityReserved`` from guard()) while interactive ones pass.
* A spend limit refuses a call whose reservation (input tokens at the input
  price + ``max_output_tokens`` at the output price) does not fit: SPEND_LIMIT
  with ``retry_after`` (``SpendLimitExceeded`` from guard()), never counted as
  a provider failure; RecordOutcome answers what a call cost.
* Route takes a per-request ``strategy`` and says which strategy chose the
  target, and why.
* The local fail-safe accepts every new parameter.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, List

import pytest

from backstop import (
    AllTargetsFailed,
    AsyncBackstop,
    Backstop,
    BreakerState,
    DeferredWorker,
    OutcomeClass,
    Priority,
    PriorityReserved,
    RateLimited,
    Reason,
    RouteStrategy,
    SpendLimitExceeded,
)
from backstop import _convert as conv
from backstop.testing import BackstopServer, free_port

CONFIG = """
[targets.p]
requests_per_minute = 10
reserve = { interactive = 0.3 }

[targets.m]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
spend = 0.01
window = "1h"

[targets.a]
[targets.b]

[routes.fast]
targets = ["a", "b"]
strategy = "lowest_latency"
explore = 0.0
"""

#: (1000 in, 200 out) at $3 / $15 per million tokens: 0.6 cents of the 1 cent an hour.
IN, OUT, COST = 1000, 200, 0.006


@pytest.fixture
def bs(start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop]) -> Backstop:
    return make_client(start_server(CONFIG).address)


def ok(target: str, max_tokens: int, key_slot: str) -> Any:
    return {"usage": {"input_tokens": IN, "output_tokens": OUT}}


# --- priority ----------------------------------------------------------------------


def test_priority_reserve_refuses_batch_while_interactive_passes(bs: Backstop) -> None:
    # Batch and default share the 7 of 10 requests that are not reserved.
    for i in range(7):
        adm = bs.can_proceed("p", priority=Priority.BATCH if i % 2 else "batch")
        assert adm.allowed, (i, adm)
    refused = bs.can_proceed("p", priority="batch")
    assert not refused.allowed and refused.reason == Reason.PRIORITY_RESERVED
    assert refused.retry_after is not None and refused.retry_after > 0
    assert bs.can_proceed("p").reason == Reason.PRIORITY_RESERVED, "unset priority is DEFAULT"
    assert bs.can_proceed("p", priority=Priority.DEFAULT).reason == Reason.PRIORITY_RESERVED
    # The reserved 3 are for interactive calls.
    for _ in range(3):
        adm = bs.can_proceed("p", priority="interactive")
        assert adm.allowed and adm.reason == Reason.ALLOWED
    assert bs.can_proceed("p", priority=Priority.INTERACTIVE).reason == Reason.RATE_LIMITED


def test_guard_raises_priority_reserved_and_is_not_a_provider_failure(bs: Backstop) -> None:
    for _ in range(7):
        with bs.guard("p", priority="batch"):
            pass
    ran: List[str] = []
    with pytest.raises(PriorityReserved) as err:
        with bs.guard("p", priority=Priority.BATCH):
            ran.append("batch")
    assert isinstance(err.value, RateLimited), "a budget refusal: except RateLimited waits it out too"
    assert err.value.reason == Reason.PRIORITY_RESERVED and err.value.retry_after and not err.value.local
    with bs.guard("p", priority=Priority.INTERACTIVE) as g:
        ran.append("interactive")
    assert ran == ["interactive"]
    assert g.outcome is not None and g.outcome.classified_as == OutcomeClass.SUCCESS
    status = bs.get_target("p")
    assert status.state == BreakerState.CLOSED and status.consecutive_failures == 0


def test_call_passes_priority_down(bs: Backstop) -> None:
    for _ in range(7):
        assert bs.call(["p"], ok, priority="batch") is not None
    calls: List[str] = []

    def fn(target: str, max_tokens: int, key_slot: str) -> Any:
        calls.append(target)
        return ok(target, max_tokens, key_slot)

    with pytest.raises(AllTargetsFailed) as err:
        bs.call(["p"], fn, priority=Priority.BATCH)
    assert calls == []
    [e] = err.value.errors
    assert e.reason == Reason.PRIORITY_RESERVED and e.outcome is None and e.retry_after
    assert bs.call(["p"], fn, priority="interactive") is not None
    assert calls == ["p"]


def test_bad_priority_or_strategy_fails_before_sending(bs: Backstop) -> None:
    with pytest.raises(ValueError, match="priority"):
        bs.can_proceed("p", priority="urgent")
    with pytest.raises(ValueError, match="strategy"):
        bs.route("fast", strategy="fastest")
    with pytest.raises(ValueError, match="max_output_tokens"):
        bs.can_proceed("m", max_output_tokens=-1)
    with pytest.raises(ValueError, match="priority"):
        bs.call("fast", ok, priority="now")
    assert bs.get_target("p").counters.admitted == 0


def test_enum_conversions() -> None:
    assert Priority("batch") is Priority.BATCH and str(Priority.INTERACTIVE) == "interactive"
    assert conv.priority_to_proto(None) == "PRIORITY_UNSPECIFIED"
    assert conv.priority_to_proto("Interactive") == "PRIORITY_INTERACTIVE"
    assert conv.strategy_to_proto(RouteStrategy.MOST_HEADROOM) == "ROUTE_STRATEGY_MOST_HEADROOM"
    assert conv.strategy("unspecified") is None
    assert conv.route_strategy(99) == RouteStrategy.UNSPECIFIED, "a newer server's strategy reads as unspecified"
    req = conv.route_request(
        "fast", [], estimated_tokens=0, required_context_tokens=0, exclude=[], caller="t", attempt=0,
        priority="batch", max_output_tokens=7, strategy="lowest_cost", expected_output_tokens=9,
    )
    assert (req.priority, req.max_output_tokens, req.strategy, req.expected_output_tokens) == (3, 7, 5, 9)


# --- spend limits --------------------------------------------------------------------


def test_max_output_tokens_is_reserved_at_the_output_price(bs: Backstop) -> None:
    first = bs.can_proceed("m", estimated_tokens=IN, max_output_tokens=OUT)
    assert first.allowed  # reserves 0.6 cents
    # Another 0.3 cents of input + 0.15 of output does not fit the 1 cent...
    refused = bs.can_proceed("m", estimated_tokens=IN, max_output_tokens=100)
    assert not refused.allowed and refused.reason == Reason.SPEND_LIMIT
    assert refused.retry_after is not None and refused.retry_after > 0
    # ...but the input alone (0.3 cents) does.
    assert bs.can_proceed("m", estimated_tokens=IN).allowed


def test_spend_limit_refusal_and_record_cost(bs: Backstop) -> None:
    adm = bs.can_proceed("m", estimated_tokens=IN, max_output_tokens=OUT)
    assert adm.allowed
    res = bs.record_outcome(
        "m", permit=adm.permit, outcome=OutcomeClass.SUCCESS, input_tokens=IN, output_tokens=OUT
    )
    assert res.cost == pytest.approx(COST)
    refused = bs.can_proceed("m", estimated_tokens=IN, max_output_tokens=OUT)
    assert not refused.allowed and refused.reason == Reason.SPEND_LIMIT and refused.retry_after


def test_guard_raises_spend_limit_exceeded_with_retry_after(bs: Backstop) -> None:
    with bs.guard("m", estimated_tokens=IN, max_output_tokens=OUT) as g:
        g.usage(IN, OUT)
    assert g.outcome is not None and g.outcome.cost == pytest.approx(COST)
    ran = False
    with pytest.raises(SpendLimitExceeded) as err:
        with bs.guard("m", estimated_tokens=IN, max_output_tokens=OUT):
            ran = True
    assert not ran
    e = err.value
    assert isinstance(e, RateLimited) and e.reason == Reason.SPEND_LIMIT and e.target == "m"
    assert e.retry_after is not None and e.retry_after > 0
    assert "SPEND_LIMIT" in str(e)
    status = bs.get_target("m")
    assert status.state == BreakerState.CLOSED and status.consecutive_failures == 0
    assert status.counters.transient == 0 and status.counters.refused >= 1


def test_call_surfaces_spend_limit_without_calling_the_provider(bs: Backstop) -> None:
    assert bs.call(["m"], ok, estimated_tokens=IN, max_output_tokens=OUT) is not None
    calls: List[str] = []

    def fn(target: str, max_tokens: int, key_slot: str) -> Any:
        calls.append(target)
        return ok(target, max_tokens, key_slot)

    with pytest.raises(AllTargetsFailed) as err:
        bs.call(["m"], fn, estimated_tokens=IN, max_output_tokens=OUT)
    assert calls == []
    [e] = err.value.errors
    assert e.target == "m" and e.reason == Reason.SPEND_LIMIT and e.outcome is None
    assert e.retry_after is not None and e.retry_after > 0
    assert err.value.retry_after is not None and err.value.retry_after > 0
    assert "SPEND_LIMIT" in str(err.value)


# --- routing strategies -----------------------------------------------------------------


def test_route_strategy_and_reason(bs: Backstop) -> None:
    own = bs.route("fast")
    assert own.target in ("a", "b")
    assert own.strategy == RouteStrategy.LOWEST_LATENCY and own.reason.startswith("lowest_latency")
    busy = bs.route("fast", strategy="least_busy")
    assert busy.strategy == RouteStrategy.LEAST_BUSY and busy.reason.startswith("least_busy")
    ordered = bs.route(["a", "b"], strategy=RouteStrategy.ORDERED, priority="interactive")
    assert ordered.target == "a" and ordered.strategy == RouteStrategy.ORDERED and ordered.reason
    cheap = bs.route("fast", strategy=RouteStrategy.LOWEST_COST, estimated_tokens=100, expected_output_tokens=50)
    assert cheap.strategy == RouteStrategy.LOWEST_COST and cheap.target in ("a", "b")


def test_call_passes_strategy_down(bs: Backstop) -> None:
    seen: List[str] = []

    def fn(target: str, max_tokens: int, key_slot: str) -> Any:
        seen.append(target)
        return ok(target, max_tokens, key_slot)

    # Ad-hoc candidates are ORDERED unless asked otherwise; most_headroom is
    # accepted and still picks one of them.
    bs.call(["a", "b"], fn, strategy="most_headroom", expected_output_tokens=10)
    assert seen and seen[0] in ("a", "b")


# --- asyncio --------------------------------------------------------------------------------


def test_async_priority_spend_and_route(start_server: Callable[..., BackstopServer]) -> None:
    server = start_server(CONFIG)

    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0, caller="pytest") as bs:
            for _ in range(7):
                assert (await bs.can_proceed("p", priority="batch")).allowed
            assert (await bs.can_proceed("p", priority=Priority.BATCH)).reason == Reason.PRIORITY_RESERVED
            with pytest.raises(PriorityReserved):
                async with bs.guard("p", priority="default"):
                    pass
            async with bs.guard("p", priority="interactive"):
                pass

            async with bs.guard("m", estimated_tokens=IN, max_output_tokens=OUT) as g:
                g.usage(IN, OUT)
            assert g.outcome is not None and g.outcome.cost == pytest.approx(COST)
            with pytest.raises(SpendLimitExceeded) as err:
                async with bs.guard("m", estimated_tokens=IN, max_output_tokens=OUT):
                    pass
            assert err.value.retry_after
            with pytest.raises(AllTargetsFailed) as failed:
                await bs.call(["m"], ok, estimated_tokens=IN, max_output_tokens=OUT)
            assert [e.reason for e in failed.value.errors] == [Reason.SPEND_LIMIT]

            d = await bs.route("fast", strategy="least_busy", priority="interactive")
            assert d.strategy == RouteStrategy.LEAST_BUSY and d.reason
            assert await bs.call("fast", ok, strategy=RouteStrategy.ORDERED, priority="batch") is not None

    asyncio.run(main())


# --- the local fail-safe ----------------------------------------------------------------------


def test_local_fail_safe_accepts_the_new_parameters(make_client: Callable[..., Backstop]) -> None:
    bs = make_client(f"127.0.0.1:{free_port()}", timeout=0.05, connect_timeout=0.3, reconnect_interval=0.1)
    adm = bs.can_proceed("m", estimated_tokens=IN, priority="batch", max_output_tokens=OUT)
    assert adm.allowed and adm.local
    d = bs.route(
        ["a", "b"], priority=Priority.INTERACTIVE, max_output_tokens=OUT, strategy="lowest_cost", expected_output_tokens=5
    )
    assert d.local and d.target == "a" and d.strategy == RouteStrategy.ORDERED
    assert "lowest_cost" in d.reason, "says the requested strategy needs the server"
    with bs.guard("a", priority="interactive", max_output_tokens=OUT) as g:
        g.usage(IN, OUT)
    assert g.local and g.outcome is not None and g.outcome.cost == 0.0
    assert bs.call(["a", "b"], ok, priority="batch", max_output_tokens=OUT, strategy="least_busy") is not None
    with pytest.raises(ValueError):
        bs.can_proceed("a", priority="whenever")


def test_async_local_fail_safe_accepts_the_new_parameters() -> None:
    async def main() -> None:
        async with AsyncBackstop(
            f"127.0.0.1:{free_port()}", timeout=0.05, connect_timeout=0.3, reconnect_interval=0.1
        ) as bs:
            adm = await bs.can_proceed("m", priority="interactive", max_output_tokens=OUT)
            assert adm.allowed and adm.local
            d = await bs.route(["a"], strategy="weighted", priority="batch", expected_output_tokens=1)
            assert d.local and d.target == "a" and d.strategy == RouteStrategy.ORDERED
            async with bs.guard("a", priority=Priority.BATCH, max_output_tokens=1):
                pass
            assert await bs.call(["a"], ok, priority="default", max_output_tokens=1) is not None

    asyncio.run(main())


# --- the deferred queue ---------------------------------------------------------------------


def test_claim_and_the_worker_admit_at_their_priority(bs: Backstop) -> None:
    for _ in range(7):
        assert bs.can_proceed("p", priority="batch").allowed
    bs.defer("p", {"q": "later"})
    held = bs.claim("p", priority=Priority.BATCH)
    assert held.items == () and held.blocked_reason == Reason.PRIORITY_RESERVED and held.retry_after
    worker = DeferredWorker(bs, "p", lambda item: None, wait=0.1, priority="batch")
    assert worker.priority == Priority.BATCH
    worker.run(timeout=0.3)
    assert worker.stats.claimed == 0, "a batch drain leaves the reserve alone"
    handled: List[Any] = []
    DeferredWorker(bs, "p", lambda item: handled.append(item.json()), wait=0.1, priority="interactive").run(until_empty=True, timeout=5)
    assert handled == [{"q": "later"}]
    with pytest.raises(ValueError, match="priority"):
        DeferredWorker(bs, "p", lambda item: None, priority="soon")
