"""call(): route, retry per advice, fall back, aggregate errors, defer; and the deferred worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, List, Tuple

import pytest
from conftest import CHAT, FAST

from backstop import (
    AllTargetsFailed,
    AsyncBackstop,
    AsyncDeferredWorker,
    Backstop,
    BreakerMode,
    BreakerState,
    Deferred,
    DeferredItem,
    DeferredWorker,
    OutcomeClass,
    Reason,
)
from backstop.testing import (
    BackstopServer,
    Completion,
    FakeProvider,
    ProviderError,
    context_length,
    overloaded,
    unauthorized,
)

SONNET, GPT, HAIKU = "anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"


class Recorder:
    """The provider function for call(): records (time, target, max_tokens) of every invocation."""

    def __init__(self, provider: FakeProvider, prompt: str = "hello") -> None:
        self.provider = provider
        self.prompt = prompt
        self.calls: List[Tuple[float, str, int]] = []

    def __call__(self, target: str, max_tokens: int, key_slot: str) -> Completion:
        self.calls.append((time.monotonic(), target, max_tokens))
        return self.provider.complete(target, self.prompt, max_tokens=max_tokens, timeout=2)

    @property
    def targets(self) -> List[str]:
        return [t for _, t, _ in self.calls]


def test_falls_back_past_an_open_primary(bs: Backstop, provider: FakeProvider) -> None:
    provider.set_default(SONNET, overloaded())
    fn = Recorder(provider)
    reply = bs.call("chat", fn, estimated_tokens=100)
    assert reply.model == GPT
    # Sonnet failed, was retried once per the advice (its second failure opened
    # the breaker, so the next CanProceed was refused), then gpt-4o served.
    assert fn.targets == [SONNET, SONNET, GPT]
    assert bs.get_target(SONNET).state == BreakerState.OPEN

    fn2 = Recorder(provider)
    assert bs.call("chat", fn2).model == GPT
    assert fn2.targets == [GPT], "an open primary is skipped without being called"
    assert provider.calls(SONNET) == 2
    assert bs.get_target(GPT).counters.success == 2


def test_honours_backoff_delays(start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], provider: FakeProvider) -> None:
    # Equal jitter: the retry after attempt n waits between cap/2 and cap, cap = 200ms * 2^n.
    config = CHAT + """
[defaults.breaker]
failure_threshold = 10
[defaults.retry]
max_retries = 3
base_delay = "200ms"
max_delay = "2s"
strategy = "equal"
"""
    bs = make_client(start_server(config).address)
    provider.script(SONNET, overloaded(), overloaded())
    fn = Recorder(provider)
    assert bs.call("chat", fn).model == SONNET
    assert fn.targets == [SONNET, SONNET, SONNET]
    t = [c[0] for c in fn.calls]
    first, second = t[1] - t[0], t[2] - t[1]
    assert 0.1 <= first <= 0.2 + 0.25, first
    assert 0.2 <= second <= 0.4 + 0.25, second


def test_honours_the_providers_retry_hint(bs: Backstop, provider: FakeProvider) -> None:
    """A 429 with retry-after-ms: the server's advice is max(hint, backoff), and
    the target is paused fleet-wide until then; call() sleeps it and retries."""
    hint_429 = {
        "status": 429,
        "headers": {"retry-after-ms": "400"},
        "body": {"error": {"type": "rate_limit_error", "message": "slow down"}},
    }
    provider.script(SONNET, hint_429)
    fn = Recorder(provider)
    assert bs.call("chat", fn).model == SONNET
    assert fn.targets == [SONNET, SONNET]
    gap = fn.calls[1][0] - fn.calls[0][0]
    assert 0.38 <= gap <= 1.0, gap
    assert bs.get_target(SONNET).counters.rate_limited == 1


def test_all_targets_failed_lists_every_error(bs: Backstop, provider: FakeProvider) -> None:
    provider.set_default(SONNET, overloaded())
    provider.set_default(GPT, unauthorized())
    provider.set_default(HAIKU, context_length())
    fn = Recorder(provider)
    with pytest.raises(AllTargetsFailed) as failed:
        bs.call("chat", fn)
    err = failed.value
    got = [(e.target, e.outcome, e.reason, e.http_status) for e in err.errors]
    assert got == [
        (SONNET, OutcomeClass.TRANSIENT, None, 529),
        (SONNET, OutcomeClass.TRANSIENT, None, 529),
        # The second failure opened the breaker: its advice says CIRCUIT_OPEN
        # (fall back), so no retry is thrown at a target that would refuse it.
        (GPT, OutcomeClass.PERSISTENT, None, 401),  # never retried
        (HAIKU, OutcomeClass.BAD_INPUT, None, 400),  # never retried
    ]
    assert fn.targets == [SONNET, SONNET, GPT, HAIKU]
    assert isinstance(err.errors[3].exception, ProviderError)
    text = str(err)
    for needle in ("route 'chat'", SONNET, GPT, HAIKU, "http 529", "http 401", "maximum context length"):
        assert needle in text, (needle, text)

    # Every target is now excluded or open: the next call fails without calling anyone.
    fn2 = Recorder(provider)
    with pytest.raises(AllTargetsFailed) as again:
        bs.call("chat", fn2)
    assert fn2.targets == [HAIKU], "only the BAD_INPUT target is still admissible"
    assert {e.reason for e in again.value.errors if e.outcome is None} == {Reason.CIRCUIT_OPEN}


def test_context_window_and_exclude_are_passed_to_route(start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], provider: FakeProvider) -> None:
    config = FAST + CHAT + f"""
[targets."{SONNET}"]
context_window = 200000
max_tokens = 8096
[targets."{GPT}"]
context_window = 128000
[targets."{HAIKU}"]
context_window = 200000
max_tokens = 4096
"""
    bs = make_client(start_server(config).address)
    fn = Recorder(provider)
    # Sonnet excluded by the caller, gpt-4o's window too small: haiku serves, with its max_tokens.
    reply = bs.call("chat", fn, required_context_tokens=150_000, exclude=[SONNET])
    assert reply.model == HAIKU and fn.calls[0][2] == 4096
    d = bs.route("chat", required_context_tokens=150_000)
    assert d.target == SONNET and d.max_tokens == 8096
    bs.record_outcome(SONNET, permit=d.permit, outcome=OutcomeClass.SUCCESS)


def test_candidate_list_instead_of_a_route(bs: Backstop, provider: FakeProvider) -> None:
    provider.set_default("x/one", unauthorized())
    fn = Recorder(provider)
    assert bs.call(["x/one", "x/two"], fn).model == "x/two"
    assert fn.targets == ["x/one", "x/two"]


def _all_down(provider: FakeProvider) -> None:
    for model in (SONNET, GPT, HAIKU):
        provider.set_default(model, overloaded())


def _all_up(provider: FakeProvider) -> None:
    for model in (SONNET, GPT, HAIKU):
        provider.set_default(model, None)


def test_defers_when_every_target_fails(bs: Backstop, provider: FakeProvider) -> None:
    _all_down(provider)
    result = bs.call(
        "chat",
        Recorder(provider),
        defer_to="queue",
        payload={"prompt": "summarise my inbox"},
        metadata={"session": "s-1"},
    )
    assert isinstance(result, Deferred)
    assert result.id and result.queue == "chat" and result.message
    assert {e.target for e in result.errors} == {SONNET, GPT, HAIKU}
    (stat,) = [q for q in bs.queue_stats("chat") if q.queue == "chat"]
    assert stat.depth == 1 and stat.in_flight == 0


def test_defer_is_idempotent(bs: Backstop) -> None:
    first = bs.defer("chat", {"prompt": "once"}, idempotency_key="req-42")
    again = bs.defer("chat", {"prompt": "once"}, idempotency_key="req-42")
    assert again.id == first.id and again.duplicate and not first.duplicate
    (stat,) = [q for q in bs.queue_stats("chat") if q.queue == "chat"]
    assert stat.depth == 1


def test_deferred_worker_drains_after_recovery(bs: Backstop, provider: FakeProvider) -> None:
    _all_down(provider)
    prompts = [f"request {i}" for i in range(3)]
    for p in prompts:
        d = bs.call("chat", Recorder(provider, p), defer_to="queue", payload={"prompt": p}, metadata={"n": p})
        assert isinstance(d, Deferred)

    handled: List[Tuple[str, str, str, int]] = []

    def handler(item: DeferredItem) -> Completion:
        reply = provider.complete(item.target, item.json()["prompt"], timeout=2)
        handled.append((item.target, item.json()["prompt"], item.metadata["n"], item.attempt))
        return reply

    # Nothing is handed out while every target is down (Claim is blocked)...
    blocked = bs.claim("chat", wait=0)
    assert blocked.items == () and blocked.blocked_reason is not None

    _all_up(provider)  # ...the provider recovers; breakers half-open after 500 ms.
    started = time.monotonic()
    stats = DeferredWorker(bs, "chat", handler, wait=1.0, lease=10).run(until_empty=True, timeout=30)
    assert stats.acked == 3 and stats.nacked == 0, stats
    assert sorted(h[1] for h in handled) == prompts
    assert all(h[1] == h[2] for h in handled), "metadata travels with the item"
    assert time.monotonic() - started < 15
    (stat,) = [q for q in bs.queue_stats("chat") if q.queue == "chat"]
    assert (stat.depth, stat.in_flight, stat.dead_letters) == (0, 0, 0)
    # The worker reported each delivery's outcome with the item's permit.
    total_success = sum(bs.get_target(t).counters.success for t in (SONNET, GPT, HAIKU))
    assert total_success >= 3


def test_worker_nacks_failures_and_dead_letters(bs: Backstop, provider: FakeProvider) -> None:
    queue = "solo/model"
    bs.defer(queue, {"prompt": "too long"}, max_attempts=2)
    provider.set_default(queue, context_length())  # BAD_INPUT: fails every time, never trips the breaker
    attempts: List[int] = []

    def handler(item: DeferredItem) -> Any:
        attempts.append(item.attempt)
        assert item.target == queue and item.permit
        return provider.complete(item.target, item.json()["prompt"], timeout=2)

    worker = DeferredWorker(bs, queue, handler, wait=0.5, retry_delay=0.05)
    stats = worker.run(until_empty=True, timeout=20)
    assert attempts == [1, 2]
    assert (stats.acked, stats.nacked, stats.dead_lettered) == (0, 2, 1)
    dead = bs.dead_letters(queue)
    assert len(dead) == 1 and "maximum context length" in dead[0].last_error
    assert bs.get_target(queue).counters.bad_input == 2

    # Requeued with a fresh attempt count, it succeeds once the input is fixed.
    provider.set_default(queue, None)
    bs.requeue(dead[0].id)
    attempts.clear()
    stats = DeferredWorker(bs, queue, handler, wait=0.5).run(until_empty=True, timeout=20)
    assert attempts == [1] and stats.acked == 1
    assert bs.dead_letters(queue) == []


def test_worker_stops_promptly_during_a_long_poll(bs: Backstop) -> None:
    worker = DeferredWorker(bs, "chat", lambda item: None, wait=20.0).start()
    time.sleep(0.3)  # now inside the 20 s long poll
    t0 = time.monotonic()
    worker.stop(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert worker._thread is not None and not worker._thread.is_alive()


def test_async_call_fallback_failure_and_defer(server: BackstopServer, provider: FakeProvider) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0) as abs_:
            seen: List[str] = []

            async def fn(target: str, max_tokens: int, key_slot: str) -> Completion:
                seen.append(target)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, lambda: provider.complete(target, "hi", timeout=2))

            provider.set_default(SONNET, unauthorized())
            reply = await abs_.call("chat", fn)
            assert reply.model == GPT and seen == [SONNET, GPT]

            provider.set_default(GPT, overloaded())
            provider.set_default(HAIKU, overloaded())
            with pytest.raises(AllTargetsFailed) as failed:
                await abs_.call("chat", fn)
            assert [e.target for e in failed.value.errors if e.outcome is not None] == [GPT, GPT, HAIKU, HAIKU]

            d = await abs_.call("chat", fn, defer_to="queue", payload="later please")
            assert isinstance(d, Deferred) and d.id

            provider.set_default(SONNET, None)
            bs_admin = await abs_.reset_target(SONNET)
            assert bs_admin.state == BreakerState.CLOSED
            texts: List[str] = []

            async def handler(item: DeferredItem) -> None:
                texts.append(item.text())

            stats = await AsyncDeferredWorker(abs_, "chat", handler, wait=0.5).run(until_empty=True, timeout=20)
            assert texts == ["later please"] and stats.acked == 1

    asyncio.run(main())


def test_async_worker_stop(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0) as abs_:
            worker = AsyncDeferredWorker(abs_, "chat", lambda item: None, wait=20.0)
            task = asyncio.ensure_future(worker.run())
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            worker.stop()
            await asyncio.wait_for(task, 3)
            assert time.monotonic() - t0 < 2.0

    asyncio.run(main())


def test_forced_open_primary_is_skipped(bs: Backstop, provider: FakeProvider) -> None:
    status = bs.set_breaker_state(SONNET, BreakerMode.FORCE_OPEN, "maintenance")
    assert status.state == BreakerState.FORCED_OPEN
    fn = Recorder(provider)
    assert bs.call("chat", fn).model == GPT and fn.targets == [GPT]
    bs.set_breaker_state(SONNET, BreakerMode.AUTOMATIC)
    fn2 = Recorder(provider)
    assert bs.call("chat", fn2).model == SONNET


