"""Reconciliation: outcomes the fail-safe decided reach the server once it is back.

The bookkeeping (what is kept, what is sent, when it is given up) is tested on
its own with a fake clock; the wiring against the real server (kill, decide
locally, restart) for both clients, and against a stand-in server that
answers health checks but fails or stalls the reports, for the bounds: a
caller never waits for reconciliation, and an outcome that cannot be sent is
dropped after a bounded number of attempts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator, List

import grpc
import pytest

from backstop import AsyncBackstop, Backstop, ControlPlaneError, OutcomeClass, OutcomeReport, OutcomeResult, ReconcileStats
from backstop._convert import record_request
from backstop._local import LOCAL_PERMIT_PREFIX
from backstop._proto import resilience_pb2
from backstop._reconcile import MAX_ATTEMPTS, MAX_BATCH, Reconciler, reconciled
from backstop.testing import BackstopServer, ProviderError, free_port
from backstop.types import BreakerState, RequestResult, RetryAdvice, RetryReason


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def result(cls: OutcomeClass) -> OutcomeResult:
    return OutcomeResult("t", cls, BreakerState.CLOSED, RetryAdvice(False, 0.0, RetryReason.UNSPECIFIED), local=True)


def report(n: int = 0, **kw: Any) -> OutcomeReport:
    kw.setdefault("permit", f"{LOCAL_PERMIT_PREFIX}{n}")
    kw.setdefault("http_status", 529)
    return OutcomeReport(target=f"t{n}", **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the one definition of a report ------------------------------------------------------


def test_record_outcome_takes_the_fields_of_a_report() -> None:
    """record_outcome is written once (both clients share it), its parameters
    are OutcomeReport's fields, and the wire conversion sends every field:
    a field added to one of them and not the others fails here."""
    assert "record_outcome" not in vars(Backstop) and "record_outcome" not in vars(AsyncBackstop)  # inherited, once
    fields = {f.name for f in dataclasses.fields(OutcomeReport)}
    params = set(inspect.signature(Backstop.record_outcome).parameters) - {"self"}
    assert params == fields - {"caller"}  # the caller is the client's own
    full = OutcomeReport(
        target="t", permit="p", outcome=OutcomeClass.PARTIAL, http_status=503, error_type="e", latency=1.5,
        retry_after=2.0, input_tokens=3, output_tokens=4, attempt=5, headers={"h": "v"}, key_slot="k", caller="c",
        request_id="r", finish=RequestResult.COMPLETED,
    )
    wire = record_request(full)
    assert {f.name for f, _ in wire.ListFields()} == fields


# --- the bookkeeping ------------------------------------------------------------------------


def test_what_is_sent_is_what_is_still_true() -> None:
    base = OutcomeReport(
        target="m", permit="local:7", http_status=429, error_type="rate_limit_error", latency=0.3,
        retry_after=9.0, input_tokens=100, output_tokens=50, attempt=1,
        headers={"retry-after": "9", "x-ratelimit-remaining-requests": "0", "x-request-id": "abc"}, caller="agent-1",
    )
    sent = reconciled(base, paused_until=104.0, now=100.5)
    # A local permit means nothing to the server; no header or usage is replayed;
    # the pause still running is sent as what is left of it.
    assert sent.permit == "" and sent.headers == {} and sent.input_tokens == 0 and sent.output_tokens == 0
    assert sent.retry_after == pytest.approx(3.5)
    assert (sent.target, sent.http_status, sent.error_type, sent.latency, sent.attempt, sent.caller) == (
        "m", 429, "rate_limit_error", 0.3, 1, "agent-1"
    )
    # A pause that is over: the smallest pause, so it still reads as "paused, not a failure".
    assert reconciled(base, paused_until=104.0, now=200.0).retry_after == pytest.approx(0.001)
    # Not a paused rate limit: no hint at all.
    assert reconciled(base, paused_until=None, now=200.0).retry_after is None
    # A server permit (its RecordOutcome failed in the outage) goes back verbatim with its usage.
    server = reconciled(dataclasses.replace(base, permit="2.abc.def"), None, 0.0)
    assert server.permit == "2.abc.def" and (server.input_tokens, server.output_tokens) == (100, 50)


def test_a_hinted_rate_limit_is_remembered_with_its_pause() -> None:
    clock = Clock()
    rec = Reconciler(10, clock=clock)
    rec.add(report(1, http_status=429, headers={"retry-after-ms": "2500"}), result(OutcomeClass.RATE_LIMITED))
    rec.add(report(2, http_status=429), result(OutcomeClass.RATE_LIMITED))  # no hint: a plain failure
    clock.now += 1.0
    assert rec.begin()
    batch = rec.next_batch()
    assert batch is not None
    assert [r.retry_after for r in batch] == [pytest.approx(1.5), None]


def test_bounded_oldest_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    rec = Reconciler(3)
    for n in range(5):
        rec.add(report(n), result(OutcomeClass.TRANSIENT))
    assert rec.stats() == ReconcileStats(pending=3, dropped=2)
    assert rec.begin()
    batch = rec.next_batch()
    assert batch is not None and [r.target for r in batch] == ["t2", "t3", "t4"]
    warnings = [r.getMessage() for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per outage, not once per outcome


def test_batches_follow_the_server_bound_and_items_are_settled_one_by_one() -> None:
    rec = Reconciler(2500)
    for n in range(2500):
        rec.add(report(n), result(OutcomeClass.TRANSIENT))
    assert rec.begin()
    sizes = []
    while True:
        batch = rec.next_batch()
        if batch is None:
            break
        sizes.append(len(batch))
        rec.delivered(["INVALID_ARGUMENT" if i == 0 else None for i in range(len(batch))])
    assert sizes == [MAX_BATCH, MAX_BATCH, 500]
    assert rec.stats() == ReconcileStats(pending=0, reported=2497, rejected=3)


def test_one_sender_at_a_time_and_the_role_is_given_back() -> None:
    rec = Reconciler(10)
    assert rec.add(report(1), result(OutcomeClass.SUCCESS)) is True  # nobody sends: start one
    assert rec.begin() and not rec.begin()
    assert rec.add(report(2), result(OutcomeClass.SUCCESS)) is False  # the sender will pick it up
    batch = rec.next_batch()
    assert batch is not None and len(batch) == 2
    rec.delivered([None, None])
    assert rec.next_batch() is None  # empty: the role is given back...
    assert rec.add(report(3), result(OutcomeClass.SUCCESS)) is True  # ...so the next outcome starts a sender
    assert rec.wants_flush()


def test_dropped_after_bounded_failed_attempts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    rec = Reconciler(10, max_attempts=3)
    rec.add(report(1), result(OutcomeClass.TRANSIENT))
    for attempt in range(1, 4):
        assert rec.begin()
        assert rec.next_batch() is not None
        rec.failed()
        rec.end()
        assert rec.stats().pending == (0 if attempt == 3 else 1)
    assert rec.stats() == ReconcileStats(pending=0, dropped=1)
    assert any("after 3 failed attempts" in r.getMessage() for r in caplog.records)
    # An outcome added after others failed has its own attempts.
    rec.add(report(2), result(OutcomeClass.TRANSIENT))
    assert rec.begin() and rec.next_batch() is not None
    rec.failed()
    assert rec.stats().pending == 1


def test_evicted_while_on_the_wire() -> None:
    """Outcomes pushed out by the bound while their batch is being sent count as
    reported if it arrives, as dropped if it does not, never both."""
    for delivered in (True, False):
        rec = Reconciler(3)
        for n in range(3):
            rec.add(report(n), result(OutcomeClass.TRANSIENT))
        assert rec.begin()
        assert rec.next_batch() is not None
        for n in range(3, 5):
            rec.add(report(n), result(OutcomeClass.TRANSIENT))  # evicts t0 and t1, both in flight
        if delivered:
            rec.delivered([None, None, None])
            assert rec.stats() == ReconcileStats(pending=2, reported=3, dropped=0)
        else:
            rec.failed()
            assert rec.stats() == ReconcileStats(pending=3, dropped=2)
        batch = rec.next_batch()
        assert batch is not None and [r.target for r in batch] == (["t3", "t4"] if delivered else ["t2", "t3", "t4"])


def test_turned_off() -> None:
    rec = Reconciler(0)
    assert rec.add(report(1), result(OutcomeClass.TRANSIENT)) is False
    assert rec.stats() == ReconcileStats() and not rec.begin()
    with pytest.raises(ValueError):
        Reconciler(-1)


# --- against the real server -------------------------------------------------------------------


def overloaded_call() -> None:
    raise ProviderError(529, {}, '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}')


def test_outcomes_decided_locally_reach_the_server_once_it_is_back(
    server: BackstopServer, make_client: Callable[..., Backstop]
) -> None:
    bs = make_client(server.address, timeout=0.25, reconnect_interval=0.05)
    with bs.guard("x/warmup"):
        pass
    server.kill()
    # A target the server has never seen: whatever it counts later came from reconciliation.
    for _ in range(3):
        with bs.guard("x/recon") as g:
            assert g.local
    with pytest.raises(ProviderError):
        with bs.guard("x/recon"):
            overloaded_call()
    assert bs.mode == "local" and bs.reconcile_stats.pending == 4

    server.restart()
    wait_for(lambda: bs.mode == "remote", 10, "reconnecting")
    # The probe reports the outage's outcomes before switching back: they are there already.
    counters = bs.get_target("x/recon").counters
    assert (counters.success, counters.transient) == (3, 1)
    assert counters.admitted == 0, "reconciled reports carry no permit"
    assert bs.reconcile_stats == ReconcileStats(pending=0, reported=4)

    # Admitted locally, finished after Backstop came back: reported right away, in the background.
    server.kill()
    with bs.guard("x/late") as g:
        assert g.local
        server.restart()
        wait_for(lambda: bs.mode == "remote", 10, "reconnecting")
    wait_for(lambda: bs.reconcile_stats.reported == 5, 5, "the late outcome")
    assert bs.get_target("x/late").counters.success == 1


def test_async_outcomes_decided_locally_reach_the_server(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=0.25, reconnect_interval=0.05, caller="pytest") as bs:
            async with bs.guard("x/warmup"):
                pass
            server.kill()
            for _ in range(2):
                async with bs.guard("x/arecon") as g:
                    assert g.local
            with pytest.raises(ProviderError):
                async with bs.guard("x/arecon"):
                    overloaded_call()
            assert bs.reconcile_stats.pending == 3
            server.restart()
            deadline = time.monotonic() + 10
            while bs.mode != "remote":
                assert time.monotonic() < deadline, "did not reconnect"
                await asyncio.sleep(0.02)
            counters = (await bs.get_target("x/arecon")).counters
            assert (counters.success, counters.transient, counters.admitted) == (2, 1, 0)

            server.kill()
            async with bs.guard("x/alate") as g:
                assert g.local
                server.restart()
                while bs.mode != "remote":
                    assert time.monotonic() < deadline + 10, "did not reconnect"
                    await asyncio.sleep(0.02)
            while bs.reconcile_stats.reported < 4:
                assert time.monotonic() < deadline + 20, "the late outcome was not reported"
                await asyncio.sleep(0.02)
            assert (await bs.get_target("x/alate")).counters.success == 1

    asyncio.run(main())


# --- against a server that fails or stalls the reports ---------------------------------------


class StandIn:
    """A gRPC server on ``port`` that answers health checks SERVING and
    RecordOutcomeBatch with ``on_batch`` (nothing else)."""

    def __init__(self, port: int, on_batch: Callable[[Any, grpc.ServicerContext], Any]) -> None:
        self.batches: List[Any] = []

        def batch(request: Any, context: grpc.ServicerContext) -> Any:
            self.batches.append(request)
            return on_batch(request, context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "grpc.health.v1.Health",
                    {"Check": grpc.unary_unary_rpc_method_handler(lambda request, context: b"\x08\x01")},
                ),
                grpc.method_handlers_generic_handler(
                    "backstop.v1.Resilience",
                    {
                        "RecordOutcomeBatch": grpc.unary_unary_rpc_method_handler(
                            batch,
                            request_deserializer=resilience_pb2.RecordOutcomeBatchRequest.FromString,
                            response_serializer=resilience_pb2.RecordOutcomeBatchResponse.SerializeToString,
                        )
                    },
                ),
            )
        )
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)


@dataclasses.dataclass
class Offline:
    """A client whose server is not there yet (it decides locally), and the port it will be on."""

    bs: Backstop
    port: int


@pytest.fixture
def offline() -> Iterator[Offline]:
    port = free_port()
    bs = Backstop(f"127.0.0.1:{port}", timeout=0.05, connect_timeout=0.2, reconnect_interval=0.05, caller="pytest")
    yield Offline(bs, port)
    bs.close()


def accepted(request: Any, context: grpc.ServicerContext) -> Any:
    ok = resilience_pb2.RecordOutcomeResult(ok=resilience_pb2.RecordOutcomeResponse(classified_as="OUTCOME_CLASS_TRANSIENT"))
    return resilience_pb2.RecordOutcomeBatchResponse(items=[ok] * len(request.items))


def test_unsendable_outcomes_are_dropped_after_bounded_attempts(
    offline: Offline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    bs = offline.bs
    adm = bs.can_proceed("t")
    assert adm.local
    bs.record_outcome("t", permit=adm.permit, http_status=529)

    def unavailable(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    stand_in = StandIn(offline.port, unavailable)
    try:
        # Each failed attempt keeps the client local; after the last one the
        # outcome is given up and the client switches back.
        wait_for(lambda: bs.mode == "remote", 15, "giving up and switching back")
    finally:
        stand_in.close()
    assert len(stand_in.batches) == MAX_ATTEMPTS
    assert [len(b.items) for b in stand_in.batches] == [1] * MAX_ATTEMPTS
    item = stand_in.batches[0].items[0]
    assert (item.target, item.permit, item.http_status, item.caller) == ("t", "", 529, "pytest")
    assert bs.reconcile_stats == ReconcileStats(pending=0, dropped=1)
    assert any(f"after {MAX_ATTEMPTS} failed attempts" in r.getMessage() for r in caplog.records)


def test_a_stalled_reconciliation_never_blocks_a_caller(offline: Offline) -> None:
    bs = offline.bs
    adm = bs.can_proceed("t")
    bs.record_outcome("t", permit=adm.permit, http_status=200)
    received, release = threading.Event(), threading.Event()

    def stall(request: Any, context: grpc.ServicerContext) -> Any:
        received.set()
        release.wait(10)
        return accepted(request, context)

    stand_in = StandIn(offline.port, stall)
    try:
        assert received.wait(10), "the probe never sent the batch"
        # The report is on the wire and unanswered: callers still decide (locally), at once.
        for _ in range(20):
            t0 = time.monotonic()
            with bs.guard("t") as g:
                pass
            assert time.monotonic() - t0 < 0.1 and g.local
        assert bs.mode == "local"
        release.set()
        wait_for(lambda: bs.mode == "remote", 10, "switching back after the report")
    finally:
        release.set()
        stand_in.close()
    # The first batch, then the 20 outcomes recorded while it was stalled.
    assert [len(b.items) for b in stand_in.batches] == [1, 20]
    assert bs.reconcile_stats == ReconcileStats(pending=0, reported=21)


def test_a_refused_batch_is_not_retried(offline: Offline) -> None:
    """A server that answers with an error other than an outage would answer it
    again: the batch is counted as rejected and the client carries on."""
    bs = offline.bs
    adm = bs.can_proceed("t")
    bs.record_outcome("t", permit=adm.permit, http_status=200)

    def unimplemented(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "an older server")

    stand_in = StandIn(offline.port, unimplemented)
    try:
        wait_for(lambda: bs.mode == "remote", 10, "switching back")
    finally:
        stand_in.close()
    assert len(stand_in.batches) == 1
    assert bs.reconcile_stats == ReconcileStats(pending=0, rejected=1)


def test_a_report_the_server_refused_is_not_kept(server: BackstopServer, make_client: Callable[..., Backstop]) -> None:
    """Only outcomes decided because Backstop was unreachable are reconciled:
    one the server saw and refused would be refused again."""
    bs = make_client(server.address)
    with pytest.raises(ControlPlaneError):
        bs.record_outcome("t", permit="not-a-permit", http_status=200)
    assert bs.mode == "remote" and bs.reconcile_stats == ReconcileStats()
