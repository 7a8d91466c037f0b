"""Fail-safe: an agent is never taken down by its control plane.

Kill the server mid-run: calls keep working on local decisions (with a local
breaker and backoff); restart it on the same port: the client goes back to
the fleet's decisions by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List

import grpc
import pytest

from backstop import (
    AllTargetsFailed,
    AsyncBackstop,
    Backstop,
    BackstopUnreachable,
    BreakerMode,
    ControlPlaneError,
    LocalPolicy,
    Reason,
)
from backstop.testing import (
    BackstopServer,
    Completion,
    FakeProvider,
    free_port,
    overloaded,
)

SONNET, GPT, HAIKU = "anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"
ROUTES = {"chat": [SONNET, GPT, HAIKU]}
LOCAL = LocalPolicy(failure_threshold=2, open_duration=0.5, base_delay=0.01, max_delay=0.04, max_retries=2)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def admitted(bs: Backstop, target: str) -> int:
    """Admissions the server counted for target (0 if it has not seen it since starting)."""
    try:
        return bs.get_target(target).counters.admitted
    except ControlPlaneError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
        return 0


class Loop:
    """An agent calling the chat route continuously in a thread, recording everything."""

    def __init__(self, bs: Backstop, provider: FakeProvider) -> None:
        self.bs = bs
        self.provider = provider
        self.results: List[Dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def fn(self, target: str, max_tokens: int, key_slot: str) -> Completion:
        return self.provider.complete(target, "hi", timeout=2)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                reply = self.bs.call("chat", self.fn)
                self.results.append({"model": reply.model, "mode": self.bs.mode, "secs": time.monotonic() - t0})
            except Exception as e:  # recorded: the test asserts there are none
                self.results.append({"error": repr(e), "mode": self.bs.mode})
            time.sleep(0.01)

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)

    def count(self) -> int:
        return len(self.results)


def test_kill_mid_run_then_restart(
    server: BackstopServer, provider: FakeProvider, make_client: Callable[..., Backstop], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    bs = make_client(server.address, timeout=0.25, local_policy=LOCAL, local_routes=ROUTES, reconnect_interval=0.1)
    with Loop(bs, provider) as loop:
        wait_for(lambda: loop.count() >= 5, 10, "calls through the live server")
        assert all(r.get("model") == SONNET and r["mode"] == "remote" for r in loop.results)

        server.kill()  # kill -9, mid-run
        n = loop.count()
        wait_for(lambda: bs.mode == "local", 5, "the switch to local decisions")
        wait_for(lambda: loop.count() >= n + 10, 10, "calls while Backstop is down")

        # An outage of the primary while the control plane is down: the local
        # breaker opens after 2 failures and the local route falls back.
        provider.set_default(SONNET, overloaded())
        sonnet_before = provider.calls(SONNET)
        n = loop.count()
        wait_for(lambda: loop.count() >= n + 15, 10, "local fallback calls")
        recent = loop.results[n:]
        assert {r.get("model") for r in recent[-5:]} == {GPT}
        assert all(r["mode"] == "local" for r in recent[-5:])
        # Backoff and the local breaker bound the calls to the failing model
        # (2 failures open it; each 500 ms half-open admits one probe).
        assert provider.calls(SONNET) - sonnet_before <= 8
        provider.set_default(SONNET, None)

        server.restart()  # same port
        took = wait_for(lambda: bs.mode == "remote", 10, "reconnecting to the restarted server")
        assert took < 5
        # The loop makes one call at a time: of the calls completed after n, at
        # most two (one in flight, one starting) were admitted before the count below.
        n = loop.count()
        admitted_before = admitted(bs, SONNET) + admitted(bs, GPT)
        wait_for(lambda: loop.count() >= n + 7, 10, "calls after the restart")
        admitted_after = admitted(bs, SONNET) + admitted(bs, GPT)
        assert admitted_after >= admitted_before + 5, "decisions are the server's again"
        assert all(r["mode"] == "remote" for r in loop.results[n + 2 :])

    errors = [r for r in loop.results if "error" in r]
    assert errors == [], errors[:3]
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(down) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]


def stop(pid: int) -> None:
    """SIGSTOP, and wait until every thread of the process is stopped (the signal
    takes a moment to reach threads running on another core: a decision on an
    open Decide stream may be answered meanwhile)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            states = []
            for t in tasks:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return True  # no /proc (not Linux): best effort
        return all(s in ("T", "t") for s in states)

    wait_for(stopped, 5, "the server to stop")


def test_deadline_on_a_hung_server(server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    """A server that accepts but never answers costs one short deadline (default 50 ms)."""
    bs = make_client(server.address, timeout=0.05, reconnect_interval=0.1)
    assert bs.timeout == 0.05 and Backstop("127.0.0.1:1").timeout == 0.05  # the default
    assert bs.can_proceed("hung/model").local is False
    assert server.proc is not None
    stop(server.proc.pid)
    try:
        t0 = time.monotonic()
        adm = bs.can_proceed("hung/model")
        first = time.monotonic() - t0
        assert adm.allowed and adm.local
        assert first < 0.5, first
        t0 = time.monotonic()
        for _ in range(20):  # local mode: no more waiting on the network
            assert bs.can_proceed("hung/model").local
        assert time.monotonic() - t0 < 0.2
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    wait_for(lambda: bs.mode == "remote", 10, "recovery after SIGCONT")
    assert bs.can_proceed("hung/model").local is False


def test_routes_learned_before_the_outage(server: BackstopServer, provider: FakeProvider, make_client: Callable[..., Backstop]) -> None:
    """No local_routes given: the candidate order is learned from Route answers."""
    bs = make_client(server.address, timeout=0.25, local_policy=LOCAL, reconnect_interval=0.1)
    def fn(t: str, m: int, k: str) -> Completion:
        return provider.complete(t, "hi", timeout=2)

    bs.set_breaker_state(SONNET, BreakerMode.FORCE_OPEN)
    bs.set_breaker_state(GPT, BreakerMode.FORCE_OPEN)
    assert bs.call("chat", fn).model == HAIKU  # Route skipped sonnet and gpt: all three learned
    bs.set_breaker_state(SONNET, BreakerMode.AUTOMATIC)
    bs.set_breaker_state(GPT, BreakerMode.AUTOMATIC)
    assert bs.route_memory.candidates("chat") == [SONNET, GPT, HAIKU]

    server.kill()
    provider.set_default(SONNET, overloaded())
    provider.set_default(GPT, overloaded())
    seen: List[str] = []

    def traced(t: str, m: int, k: str) -> Completion:
        seen.append(t)
        return fn(t, m, k)

    reply = bs.call("chat", traced)
    assert bs.mode == "local" and reply.model == HAIKU
    # Local retry advice (max_retries=2), then the local breakers open after 2 failures.
    assert seen == [SONNET, SONNET, GPT, GPT, HAIKU]


def test_fail_closed(server: BackstopServer, provider: FakeProvider, make_client: Callable[..., Backstop]) -> None:
    bs = make_client(server.address, timeout=0.25, policy="fail_closed", local_routes=ROUTES, reconnect_interval=0.1)
    with bs.guard(SONNET):
        pass
    server.kill()
    with pytest.raises(BackstopUnreachable) as refused:
        with bs.guard(SONNET):
            pytest.fail("fail_closed must not admit while Backstop is unreachable")
    assert refused.value.local and refused.value.reason == Reason.CONTROL_PLANE_UNAVAILABLE
    with pytest.raises(AllTargetsFailed) as failed:
        bs.call("chat", lambda t, m, k: provider.complete(t, "hi"))
    assert {e.reason for e in failed.value.errors} == {Reason.CONTROL_PLANE_UNAVAILABLE}
    assert provider.calls(SONNET) == 0
    server.restart()
    wait_for(lambda: bs.mode == "remote", 10, "reconnect")
    with bs.guard(SONNET) as g:
        pass
    assert g.admission is not None and not g.admission.local


def test_unknown_route_while_down_explains_itself(server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    bs = make_client(server.address, timeout=0.25, connect_timeout=0.2, reconnect_interval=0.1)
    server.kill()
    with pytest.raises(AllTargetsFailed) as failed:
        bs.call("chat", lambda t, m, k: "never called")
    assert "local_routes" in str(failed.value)


def test_async_kill_and_restart(server: BackstopServer, provider: FakeProvider) -> None:
    async def main() -> None:
        async with AsyncBackstop(
            server.address, timeout=0.25, local_routes=ROUTES, local_policy=LOCAL, reconnect_interval=0.1
        ) as abs_:
            async def fn(t: str, m: int, k: str) -> str:
                return f"served by {t}"

            assert await abs_.call("chat", fn) == f"served by {SONNET}"
            assert abs_.mode == "remote"
            server.kill()
            for _ in range(5):
                assert await abs_.call("chat", fn) == f"served by {SONNET}"
            assert abs_.mode == "local"
            adm = await abs_.can_proceed(GPT)
            assert adm.local and adm.allowed
            await abs_.record_outcome(GPT, permit=adm.permit, http_status=200)
            server.restart()
            deadline = time.monotonic() + 10
            while abs_.mode != "remote":
                assert time.monotonic() < deadline, "did not reconnect"
                await asyncio.sleep(0.05)
            adm = await abs_.can_proceed(GPT)
            assert not adm.local and adm.permit and not adm.permit.startswith("local:")
            await abs_.record_outcome(GPT, permit=adm.permit, http_status=200)
            status = await abs_.get_target(GPT)
            assert status.counters.success >= 1

    asyncio.run(main())




def test_agent_starts_before_its_control_plane(
    start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop]
) -> None:
    port = free_port()
    bs = make_client(f"127.0.0.1:{port}", timeout=0.05, connect_timeout=0.3, reconnect_interval=0.1)
    t0 = time.monotonic()
    adm = bs.can_proceed(SONNET)
    assert adm.allowed and adm.local and time.monotonic() - t0 < 1.0
    start_server(port=port)
    wait_for(lambda: bs.mode == "remote", 10, "connecting once the server is up")
    assert not bs.can_proceed(SONNET).local
