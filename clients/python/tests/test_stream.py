"""Decisions over one ``Decide`` stream per replica (the default).

Against the real server: the stream is used (its ``/metrics`` count
``Decide.*`` items, not unary calls), the opt-outs work, answers are matched
to their callers under concurrency, item errors raise what the unary calls
raise, and a server killed mid-run costs a fail-safe interlude and a new
stream. Against a tiny grpcio double: answers in reverse order, an item never
answered (the per-item deadline sends that one decision to the fail-safe),
item errors of every kind, and a server without ``Decide`` (unary calls,
remembered).
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest

from backstop import AsyncBackstop, Backstop, ControlPlaneError, OutcomeClass
from backstop import _stream
from backstop._proto import resilience_pb2 as pb
from backstop.testing import BackstopServer, FakeProvider, free_port, overloaded

from conftest import CHAT, FAST

SONNET, GPT, HAIKU = "anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"
ROUTES = {"chat": [SONNET, GPT, HAIKU]}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def counts(server: BackstopServer) -> Dict[str, int]:
    """``backstop_rpc_duration_seconds_count`` by method (``CanProceed``, ``Decide.CanProceed``...)."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r'^backstop_rpc_duration_seconds_count\{method="([^"]+)"\} (\d+)', server.metrics(), re.M)
    }


def grew(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def decide_a_little(bs: Backstop) -> None:
    with bs.guard(SONNET):
        pass
    assert bs.route("chat").target == SONNET
    assert not bs.can_proceed(GPT).local


# --- the stream is the default ----------------------------------------------------------


def test_decisions_go_over_the_stream_by_default(server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    bs = make_client(server.address)
    assert bs.stream is True
    before = counts(server)
    decide_a_little(bs)
    g = grew(before, counts(server))
    assert g == {"Decide.CanProceed": 2, "Decide.RecordOutcome": 1, "Decide.Route": 1}, g
    # Admin calls stay unary (the guard's CanProceed and the Route admitted sonnet).
    assert bs.get_target(SONNET).counters.admitted == 2


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_opt_out(
    server: BackstopServer, make_client: Callable[..., Backstop], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "argument":
        bs = make_client(server.address, stream=False)
    else:
        monkeypatch.setenv("BACKSTOP_STREAM", "0")
        bs = make_client(server.address)
    assert bs.stream is False
    before = counts(server)
    decide_a_little(bs)
    g = grew(before, counts(server))
    assert g == {"CanProceed": 2, "RecordOutcome": 1, "Route": 1}, g


def test_an_explicit_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKSTOP_STREAM", "off")
    assert Backstop("127.0.0.1:1", stream=True).stream is True
    assert Backstop("127.0.0.1:1").stream is False
    monkeypatch.setenv("BACKSTOP_STREAM", "1")
    assert Backstop("127.0.0.1:1").stream is True
    monkeypatch.delenv("BACKSTOP_STREAM")
    assert AsyncBackstop("127.0.0.1:1").stream is True


def test_async_decisions_go_over_the_stream(server: BackstopServer) -> None:
    async def main(stream: Optional[bool]) -> Dict[str, int]:
        before = counts(server)
        async with AsyncBackstop(server.address, timeout=1.0, stream=stream) as bs:
            async with bs.guard(SONNET):
                pass
            assert (await bs.route("chat")).target == SONNET
            assert not (await bs.can_proceed(GPT)).local
        return grew(before, counts(server))

    assert asyncio.run(main(None)) == {"Decide.CanProceed": 2, "Decide.RecordOutcome": 1, "Decide.Route": 1}
    assert asyncio.run(main(False)) == {"CanProceed": 2, "RecordOutcome": 1, "Route": 1}


def test_a_full_stream_sends_decisions_as_unary_calls(
    server: BackstopServer, make_client: Callable[..., Backstop], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stream, "MAX_OUTSTANDING", 0)
    bs = make_client(server.address)
    before = counts(server)
    assert not bs.can_proceed(SONNET).local
    assert grew(before, counts(server)) == {"CanProceed": 1}


# --- answers are matched to their callers ----------------------------------------------


def test_concurrent_callers_get_their_own_answers(server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    bs = make_client(server.address)
    targets = [f"model/{i}" for i in range(16)]

    def agent(i: int) -> List[str]:
        problems = []
        for n in range(25):
            target = targets[(i + n) % len(targets)]
            adm = bs.can_proceed(target, estimated_tokens=n)
            if adm.target != target or adm.local or not adm.permit:
                problems.append(f"asked {target}, got {adm}")
            out = bs.record_outcome(target, permit=adm.permit, outcome=OutcomeClass.SUCCESS)
            if out.target != target or out.classified_as != OutcomeClass.SUCCESS or out.duplicate:
                problems.append(f"recorded {target}, got {out}")
            r = bs.route([target, SONNET])
            if r.target != target:
                problems.append(f"routed {target}, got {r.target}")
            bs.record_outcome(r.target, permit=r.permit, http_status=200)
        return problems

    before = counts(server)
    with ThreadPoolExecutor(8) as pool:
        problems = [p for ps in pool.map(agent, range(8)) for p in ps]
    assert problems == []
    g = grew(before, counts(server))
    assert g == {"Decide.CanProceed": 200, "Decide.RecordOutcome": 400, "Decide.Route": 200}, g
    # Every permit settled exactly once: the server counted each outcome.
    assert sum(bs.get_target(t).counters.success for t in targets) == 400


def test_async_concurrent_callers_get_their_own_answers(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0) as bs:

            async def agent(i: int) -> None:
                for n in range(20):
                    target = f"model/{(i + n) % 7}"
                    adm = await bs.can_proceed(target)
                    assert adm.target == target and not adm.local
                    out = await bs.record_outcome(target, permit=adm.permit, http_status=200)
                    assert out.target == target and out.classified_as == OutcomeClass.SUCCESS

            before = counts(server)
            await asyncio.gather(*(agent(i) for i in range(10)))
            assert grew(before, counts(server)) == {"Decide.CanProceed": 200, "Decide.RecordOutcome": 200}

    asyncio.run(main())


# --- item errors: the unary call's exceptions ----------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_item_errors_raise_what_the_unary_call_raises(
    server: BackstopServer, make_client: Callable[..., Backstop], stream: bool
) -> None:
    bs = make_client(server.address, stream=stream)
    with pytest.raises(ControlPlaneError) as e:
        bs.route("no-such-route")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "Route"
    assert 'route "no-such-route" is not configured' in e.value.details
    long_caller = make_client(server.address, stream=stream, caller="x" * 300)
    with pytest.raises(ControlPlaneError) as e:
        long_caller.can_proceed(SONNET)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.method == "CanProceed"
    assert "caller is 300 bytes" in e.value.details
    assert bs.mode == "remote" and long_caller.mode == "remote"


def test_async_item_errors_raise_what_the_unary_call_raises(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0) as bs:
            with pytest.raises(ControlPlaneError) as e:
                await bs.route("no-such-route")
            assert e.value.code == grpc.StatusCode.NOT_FOUND and bs.mode == "remote"

    asyncio.run(main())


# --- kill and restart ---------------------------------------------------------------------


def test_server_killed_and_restarted_mid_run(
    server: BackstopServer, provider: FakeProvider, make_client: Callable[..., Backstop], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    bs = make_client(server.address, timeout=0.25, local_routes=ROUTES, reconnect_interval=0.1)
    results: List[Dict[str, Any]] = []
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            try:
                reply = bs.call("chat", lambda t, m, k: provider.complete(t, "hi", timeout=2))
                results.append({"model": reply.model, "mode": bs.mode})
            except Exception as e:  # recorded: asserted empty
                results.append({"error": repr(e)})
            time.sleep(0.005)

    threads = [threading.Thread(target=agent, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 20, 10, "calls through the live server")
        server.kill()  # kill -9 with items in flight on the stream
        wait_for(lambda: bs.mode == "local", 5, "the switch to the fail-safe")
        n = len(results)
        wait_for(lambda: len(results) >= n + 20, 10, "calls on local decisions")
        server.restart()
        wait_for(lambda: bs.mode == "remote", 10, "the switch back")
        before = counts(server)  # the new process: its counters start at 0
        n = len(results)
        wait_for(lambda: len(results) >= n + 20, 10, "calls after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert [r for r in results if "error" in r] == []
    g = grew(before, counts(server))
    # A new stream to the restarted server (not unary calls).
    assert g.get("Decide.Route", 0) >= 15 and "Route" not in g and "CanProceed" not in g, g
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


def test_async_server_killed_and_restarted(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=0.25, local_routes=ROUTES, reconnect_interval=0.1) as bs:

            async def decide() -> bool:
                adm = await bs.can_proceed(SONNET)
                await bs.record_outcome(SONNET, permit=adm.permit, http_status=200)
                return adm.local

            assert not any(await asyncio.gather(*(decide() for _ in range(10))))
            server.kill()
            await asyncio.gather(*(decide() for _ in range(10)))  # in flight when it dies, or after
            assert bs.mode == "local" and await decide()
            server.restart()
            deadline = time.monotonic() + 10
            while bs.mode != "remote":
                assert time.monotonic() < deadline, "never switched back"
                await asyncio.sleep(0.02)
            assert not any(await asyncio.gather(*(decide() for _ in range(10))))
            g = counts(server)
            assert g.get("Decide.CanProceed", 0) >= 10 and g.get("CanProceed", 0) == 0, g

    asyncio.run(main())


def test_a_stream_that_broke_while_idle_is_reopened(
    server: BackstopServer, make_client: Callable[..., Backstop]
) -> None:
    bs = make_client(server.address, timeout=1.0, reconnect_interval=0.1)
    assert not bs.can_proceed(SONNET).local
    server.restart()  # kill -9 and start again, while no decision is in flight
    time.sleep(0.3)
    # The next decision opens a new stream on the reconnected channel.
    wait_for(lambda: not bs.can_proceed(SONNET).local, 5, "a remote decision after the restart")
    assert counts(server).get("Decide.CanProceed", 0) >= 1


# --- a test double: out of order, unanswered items, item errors, no Decide ---------------------


class Double:
    """A tiny grpcio server for ``backstop.v1.Resilience``.

    With ``decide=True`` it serves ``Decide`` and answers each item by its
    target: ``hold/...`` never, ``error/CODE`` with that item error, anything
    else at once, or (``reverse=n``) in groups of n, in reverse order. The
    unary CanProceed / RecordOutcome / Route are always served. Everything
    received is recorded.
    """

    def __init__(self, *, decide: bool = True, reverse: int = 0) -> None:
        self.calls: List[str] = []
        self.items: List[pb.DecideRequest] = []
        self.reverse = reverse
        self._lock = threading.Lock()
        outer = self

        def admit(req: pb.CanProceedRequest, tag: str) -> pb.CanProceedResponse:
            return pb.CanProceedResponse(
                allowed=True, reason=pb.REASON_ALLOWED, state=pb.BREAKER_STATE_CLOSED, permit=f"{tag}:{req.target}"
            )

        def route(req: pb.RouteRequest, tag: str) -> pb.RouteResponse:
            return pb.RouteResponse(target=req.candidates[0], permit=f"{tag}:{req.candidates[0]}", state=pb.BREAKER_STATE_CLOSED)

        def record(req: pb.RecordOutcomeRequest) -> pb.RecordOutcomeResponse:
            return pb.RecordOutcomeResponse(classified_as=pb.OUTCOME_CLASS_SUCCESS, state=pb.BREAKER_STATE_CLOSED)

        def answer(item: pb.DecideRequest) -> Optional[pb.DecideResponse]:
            kind = item.WhichOneof("request")
            target = item.route.candidates[0] if kind == "route" else getattr(item, kind).target
            if target.startswith("hold/"):
                return None
            if target.startswith("error/"):
                code = getattr(grpc.StatusCode, target.split("/", 1)[1])
                return pb.DecideResponse(id=item.id, error=pb.ItemError(code=code.value[0], message=f"fake {code.name}"))
            if kind == "can_proceed":
                return pb.DecideResponse(id=item.id, can_proceed=admit(item.can_proceed, f"stream{item.id}"))
            if kind == "route":
                return pb.DecideResponse(id=item.id, route=route(item.route, f"stream{item.id}"))
            return pb.DecideResponse(id=item.id, record_outcome=record(item.record_outcome))

        def decide_handler(requests: Iterator[pb.DecideRequest], context: grpc.ServicerContext) -> Iterator[pb.DecideResponse]:
            held: List[pb.DecideResponse] = []
            for item in requests:
                with outer._lock:
                    outer.items.append(item)
                resp = answer(item)
                if resp is None:
                    continue
                if not outer.reverse:
                    yield resp
                    continue
                held.append(resp)
                if len(held) >= outer.reverse:
                    yield from reversed(held)
                    held = []

        unary = {
            "CanProceed": (lambda r, c: admit(r, "unary"), pb.CanProceedRequest),
            "Route": (lambda r, c: route(r, "unary"), pb.RouteRequest),
            "RecordOutcome": (lambda r, c: record(r), pb.RecordOutcomeRequest),
        }

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                method = details.method.rsplit("/", 1)[-1]
                with outer._lock:
                    outer.calls.append(method)
                if method == "Decide" and decide:
                    return grpc.stream_stream_rpc_method_handler(
                        decide_handler,
                        request_deserializer=pb.DecideRequest.FromString,
                        response_serializer=pb.DecideResponse.SerializeToString,
                    )
                if method in unary:
                    fn, req = unary[method]
                    return grpc.unary_unary_rpc_method_handler(
                        fn, request_deserializer=req.FromString, response_serializer=lambda m: m.SerializeToString()
                    )
                return None  # UNIMPLEMENTED (Decide too, with decide=False; and the health check)

        self.address = f"127.0.0.1:{free_port()}"
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8), handlers=[Handler()])
        self.server.add_insecure_port(self.address)
        self.server.start()

    def count(self, method: str) -> int:
        with self._lock:
            return self.calls.count(method)

    def close(self) -> None:
        self.server.stop(None)


@pytest.fixture
def double_factory() -> Iterator[Callable[..., Double]]:
    made: List[Double] = []

    def make(**kw: Any) -> Double:
        d = Double(**kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_answers_out_of_order_are_matched_by_id(
    double_factory: Callable[..., Double], make_client: Callable[..., Backstop]
) -> None:
    double = double_factory(reverse=8)  # answers every 8 items, last first
    bs = make_client(double.address, timeout=2.0)
    barrier = threading.Barrier(8)

    def agent(i: int) -> Tuple[str, str, str]:
        barrier.wait()
        adm = bs.can_proceed(f"model/{i}")
        return adm.target, adm.permit, str(adm.local)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(agent, range(8)))
    ids = {item.id for item in double.items}
    assert len(ids) == 8
    for i, (target, permit, local) in enumerate(got):
        assert target == f"model/{i}" and local == "False"
        # The permit names the item it answered: the one this caller sent.
        n = int(permit.split(":")[0].removeprefix("stream"))
        sent = next(item for item in double.items if item.id == n)
        assert sent.can_proceed.target == f"model/{i}"
    assert double.count("Decide") == 1 and double.count("CanProceed") == 0


def test_async_answers_out_of_order_are_matched_by_id(double_factory: Callable[..., Double]) -> None:
    double = double_factory(reverse=5)

    async def main() -> None:
        async with AsyncBackstop(double.address, timeout=2.0) as bs:
            got = await asyncio.gather(*(bs.route([f"model/{i}", "other/x"]) for i in range(10)))
            assert [r.target for r in got] == [f"model/{i}" for i in range(10)]
            assert not any(r.local for r in got)

    asyncio.run(main())
    assert double.count("Decide") == 1 and double.count("Route") == 0


def test_an_item_unanswered_in_time_goes_to_the_fail_safe(
    double_factory: Callable[..., Double], make_client: Callable[..., Backstop]
) -> None:
    double = double_factory()
    bs = make_client(double.address, timeout=0.2, reconnect_interval=0.05)
    assert not bs.can_proceed("model/a").local
    t0 = time.monotonic()
    adm = bs.can_proceed("hold/model")  # the server never answers this item
    took = time.monotonic() - t0
    assert adm.local and adm.allowed
    assert 0.15 <= took < 1.0, took
    # The item carried its deadline, so the server can give up on it too.
    held = [i for i in double.items if i.can_proceed.target == "hold/model"]
    assert len(held) == 1 and held[0].deadline.ToTimedelta().total_seconds() == pytest.approx(0.2)
    # The probe finds the server (it answers; it has no health service). The
    # stream answered nothing while the item waited: presumed wedged, replaced.
    wait_for(lambda: bs.mode == "remote", 5, "the switch back")
    assert not bs.can_proceed("model/b").local
    assert double.count("Decide") == 2


def test_async_an_item_unanswered_in_time_goes_to_the_fail_safe(double_factory: Callable[..., Double]) -> None:
    double = double_factory()

    async def main() -> None:
        async with AsyncBackstop(double.address, timeout=0.2, reconnect_interval=0.05) as bs:
            assert not (await bs.can_proceed("model/a")).local
            slow, fast = await asyncio.gather(bs.can_proceed("hold/model"), bs.can_proceed("model/b"))
            assert slow.local and not fast.local

    asyncio.run(main())
    # The stream answered another item meanwhile: it is not replaced.
    assert double.count("Decide") == 1


@pytest.mark.parametrize("client", ["sync", "async"])
def test_item_errors_from_the_double(double_factory: Callable[..., Double], client: str) -> None:
    double = double_factory()

    async def main() -> None:
        async with AsyncBackstop(double.address, timeout=0.5, reconnect_interval=0.05) as abs_:
            with pytest.raises(ControlPlaneError) as e:
                await abs_.can_proceed("error/INVALID_ARGUMENT")
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details == "fake INVALID_ARGUMENT"
            assert (await abs_.can_proceed("error/DEADLINE_EXCEEDED")).local

    if client == "async":
        asyncio.run(main())
        return
    with Backstop(double.address, timeout=0.5, reconnect_interval=0.05) as bs:
        with pytest.raises(ControlPlaneError) as e:
            bs.can_proceed("error/NOT_FOUND")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "CanProceed"
        with pytest.raises(ControlPlaneError) as e:
            bs.route(["error/FAILED_PRECONDITION"])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.method == "Route"
        assert bs.mode == "remote"
        # DEADLINE_EXCEEDED / UNAVAILABLE for an item: an outage answer, so the fail-safe decides.
        assert bs.can_proceed("error/DEADLINE_EXCEEDED").local
        wait_for(lambda: bs.mode == "remote", 5, "the switch back")
        assert bs.can_proceed("error/UNAVAILABLE").local


def test_a_stream_full_on_the_server_sends_the_item_as_a_unary_call(
    double_factory: Callable[..., Double], make_client: Callable[..., Backstop], monkeypatch: pytest.MonkeyPatch
) -> None:
    double = double_factory()
    bs = make_client(double.address)
    answer = _stream._answer

    def full(method: str, response: Any) -> Any:
        return answer(
            method,
            pb.DecideResponse(
                id=response.id,
                error=pb.ItemError(
                    code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    message="this stream already has 1024 requests outstanding; wait for answers",
                ),
            ),
        )

    monkeypatch.setattr(_stream, "_answer", full)
    adm = bs.can_proceed("model/a")
    assert not adm.local and adm.permit == "unary:model/a"
    assert double.count("CanProceed") == 1


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_server_without_decide_gets_unary_calls(
    double_factory: Callable[..., Double], caplog: pytest.LogCaptureFixture, client: str
) -> None:
    caplog.set_level(logging.INFO, logger="backstop")
    double = double_factory(decide=False)

    def check(results: List[Any]) -> None:
        assert all(not r.local for r in results)
        assert {r.permit for r in results if hasattr(r, "permit")} <= {"unary:model/a", "unary:model/b"}
        # Tried once, remembered for the channel. (grpc.aio may hide the
        # UNIMPLEMENTED behind an INTERNAL when items were being written: the
        # asyncio client then asks once more with an empty stream.)
        assert double.count("Decide") in ((1,) if client == "sync" else (1, 2))
        assert double.count("CanProceed") == 10 and double.count("Route") == 5 and double.count("RecordOutcome") == 5
        assert sum("no Decide stream" in r.getMessage() for r in caplog.records) == 1

    if client == "sync":
        with Backstop(double.address, timeout=1.0) as bs:
            with ThreadPoolExecutor(5) as pool:  # the first decisions race the UNIMPLEMENTED answer
                results = list(pool.map(lambda _: bs.can_proceed("model/a"), range(5)))
            for _ in range(5):
                results.append(bs.can_proceed("model/a"))
                results.append(bs.route(["model/b"]))
                results.append(bs.record_outcome("model/a", permit="unary:model/a", http_status=200))
        check(results)
        return

    async def main() -> List[Any]:
        async with AsyncBackstop(double.address, timeout=1.0) as abs_:
            out = list(await asyncio.gather(*(abs_.can_proceed("model/a") for _ in range(5))))
            for _ in range(5):
                out.append(await abs_.can_proceed("model/a"))
                out.append(await abs_.route(["model/b"]))
                out.append(await abs_.record_outcome("model/a", permit="unary:model/a", http_status=200))
            return out

    check(asyncio.run(main()))


# --- lifecycle ------------------------------------------------------------------------------


def test_a_process_exits_without_closing_its_client(server: BackstopServer) -> None:
    code = (
        "import sys; from backstop import Backstop\n"
        f"bs = Backstop({server.address!r}, timeout=1.0)\n"
        "assert not bs.can_proceed('a/b').local\n"
        "print('decided')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "decided" in out.stdout, out.stderr


def test_close_with_decisions_in_flight(double_factory: Callable[..., Double]) -> None:
    double = double_factory()
    bs = Backstop(double.address, timeout=2.0)
    assert not bs.can_proceed("model/a").local
    got: List[Any] = []
    t = threading.Thread(target=lambda: got.append(bs.can_proceed("hold/x")))
    t.start()
    wait_for(lambda: any(i.can_proceed.target == "hold/x" for i in double.items), 5, "the item to be sent")
    t0 = time.monotonic()
    bs.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 3
    assert got and got[0].local  # failed over to the fail-safe, not hung


def test_unit_resend_rules() -> None:
    assert _stream.resends_allowed("CanProceed", several_servers=False) == 0
    assert _stream.resends_allowed("Route", several_servers=False) == 0
    assert _stream.resends_allowed("RecordOutcome", several_servers=False) == 1
    assert _stream.resends_allowed("CanProceed", several_servers=True) == 2


def test_overloaded_provider_still_reported_over_the_stream(
    server: BackstopServer, provider: FakeProvider, make_client: Callable[..., Backstop]
) -> None:
    # The breaker opens fleet-wide from outcomes reported over the stream.
    bs = make_client(server.address)
    provider.set_default(SONNET, overloaded())
    for _ in range(2):
        try:
            with bs.guard(SONNET):
                provider.complete(SONNET, "hi")
        except Exception:
            pass
    adm = bs.can_proceed(SONNET)
    assert not adm.allowed and not adm.local
    assert counts(server).get("RecordOutcome", 0) == 0
