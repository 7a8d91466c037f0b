"""The asyncio client, :class:`AsyncBackstop` (grpc.aio): the same API as
:class:`backstop.Backstop`, with coroutines."""

from __future__ import annotations

import asyncio
import datetime as _dt
import inspect
import logging
import time
from typing import (
    Any,
    Awaitable,
    Callable,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    TypeVar,
    Union,
    overload,
)

import grpc
import grpc.aio

from ._core import Requests, RouteArg, Rpc, invoker
from ._plan import (
    AdmitOp,
    DeferOp,
    FinishOp,
    Invoked,
    InvokeOp,
    Op,
    RecordOp,
    RouteOp,
    SleepOp,
    call_plan,
)
from ._stream import DECIDE_FIELDS, USE_UNARY, AsyncDecideStream
from ._transport import (
    OUTAGE_CODES,
    SERVING,
    Replica,
    ReplicaSet,
    Stubs,
    aio_channel,
    health_request,
    health_serving,
    rpc_error,
    single_server,
    target_options,
)
from .errors import BackstopError, ControlPlaneError, ControlPlaneUnavailable
from .guard import AsyncGuard
from .types import (
    Admission,
    BreakerMode,
    ClaimResult,
    Deferred,
    DeferredItem,
    FinishResult,
    NackResult,
    OutcomeReport,
    OutcomeResult,
    PriorityArg,
    QueueStat,
    RequestResultArg,
    RouteDecision,
    StrategyArg,
    TargetStatus,
    TargetSummary,
)

log = logging.getLogger("backstop")

T = TypeVar("T")


class AsyncBackstop(Requests[Awaitable[OutcomeResult]]):
    """asyncio Backstop client; same parameters as :class:`backstop.Backstop`
    (including several replicas' addresses).

    The channels are created on first use, inside the running event loop; use
    one client per event loop.
    """

    def _setup(self) -> None:
        self._replica_set: Optional[ReplicaSet[grpc.aio.Channel]] = None
        self._connect_lock: Optional[asyncio.Lock] = None
        self._prober: Optional[asyncio.Task[None]] = None
        self._flushers: Set[asyncio.Task[None]] = set()

    def _connect(self, target: str, sticky: bool) -> grpc.aio.Channel:
        return aio_channel(target, self.credentials, target_options(target, self.channel_options, sticky=sticky))

    @property
    def _replicas(self) -> ReplicaSet[grpc.aio.Channel]:
        """The replicas and their channels (created on first use, in the running loop)."""
        if self._replica_set is None:
            self._replica_set = ReplicaSet(self.addresses, self._connect)
            if self.stream:
                for r in self._replica_set.replicas:
                    r.decide = AsyncDecideStream(
                        self._with_metadata(r.stubs.resilience.Decide), r.target, not single_server(r.target), self.timeout
                    )
        return self._replica_set

    @property
    def stubs(self) -> Stubs:
        """The generated grpc.aio stubs, on the first address's channel (created on first use)."""
        return self._replicas.first.stubs

    # --- lifecycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Stops the recovery probe and closes the channels."""
        with self._mode_lock:
            self._closed = True
        for task in [self._prober, *self._flushers]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._replica_set is not None:
            for r in self._replica_set.replicas:
                if r.decide is not None:
                    await r.decide.close()
            for channel in self._replica_set.channels():
                await channel.close()

    async def __aenter__(self) -> AsyncBackstop:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- transport -------------------------------------------------------------------

    async def _unary(self, rpc: Rpc) -> Any:
        """See :meth:`backstop.Backstop._unary`: replica after replica until one answers."""
        queue = rpc.service == "deferred"
        last: Optional[ControlPlaneUnavailable] = None
        for replica in self._replicas.sticky() if queue else self._replicas.balanced(rpc.method):
            try:
                response = await self._attempt(replica, rpc, queue)
            except ControlPlaneError as err:
                # A queue call that ran out of time may have been carried out.
                if not isinstance(err, ControlPlaneUnavailable) or (
                    queue and err.code != grpc.StatusCode.UNAVAILABLE
                ):
                    self._replicas.succeeded(replica, queue=queue)
                    raise
                last = err
                self._replica_failed(replica, err)
                continue
            self._replicas.succeeded(replica, queue=queue)
            return rpc.convert(response)
        assert last is not None
        raise last

    async def _attempt(self, replica: Replica[grpc.aio.Channel], rpc: Rpc, queue: bool) -> Any:
        """See :meth:`backstop.Backstop._attempt`."""
        if replica.decide is not None and rpc.method in DECIDE_FIELDS and rpc.service == "resilience":
            response = await replica.decide.call(rpc)
            if response is not USE_UNARY:
                return response
        stubs = replica.queue_stubs() if queue else replica.stubs
        method = getattr(getattr(stubs, rpc.service), rpc.method)
        try:
            return await method(rpc.request, timeout=rpc.timeout, metadata=self._metadata(rpc))
        except grpc.RpcError as e:
            raise rpc_error(rpc.method, e) from e

    def _replica_failed(self, replica: Replica[grpc.aio.Channel], err: Any) -> None:
        self._replicas.failed(replica, err)
        self._ensure_prober()  # health-checks the replicas marked down

    async def _use_remote(self) -> bool:
        if not self._remote:
            return False
        if not self._connected_once:
            if self._connect_lock is None:
                self._connect_lock = asyncio.Lock()
            async with self._connect_lock:
                if not self._connected_once:
                    self._connected_once = True
                    if not await self._wait_connected():
                        self._outage("connect", f"not connected within {self.connect_timeout}s")
        return self._remote

    async def _wait_connected(self) -> bool:
        """Waits up to ``connect_timeout`` for any replica's channel to connect."""
        waits = [asyncio.ensure_future(r.channel.channel_ready()) for r in self._replicas.replicas]
        done, pending = await asyncio.wait(waits, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()  # stops waiting; the channels keep connecting on their own
        await asyncio.gather(*pending, return_exceptions=True)
        return any(not w.cancelled() and w.exception() is None for w in done)

    def _outage(self, method: str, err: Any) -> None:
        if self._went_down(method, err):
            self._ensure_prober()

    def _ensure_prober(self) -> None:
        """Starts the probe task unless it is running (restarted if it ever died),
        when Backstop is unreachable or a replica is marked down."""
        if self._closed or (self._prober is not None and not self._prober.done()):
            return
        if self._remote and not self._replicas.down():
            return
        self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        """See :meth:`backstop.Backstop._probe`: health-checks the replicas marked
        down (all of them while the fail-safe decides); on the way back from
        local mode, reports what was decided meanwhile, then switches back."""
        probe_timeout = max(1.0, self.timeout)
        while not self._closed:
            await asyncio.sleep(self.reconnect_interval)
            local = not self._remote
            candidates = self._replicas.replicas if local else self._replicas.down()
            if not candidates:
                return  # one event loop: nothing can mark a replica down between this check and the return
            if await self._health_check(candidates, probe_timeout) and local:
                # The outage's outcomes go first (see Backstop._probe).
                outage = await self._flush_pending()
                if outage is not None:
                    log.debug("Backstop still unreachable for reports: %s", outage)
                    continue
                self._came_back()
                self._kick_reconcile()  # outcomes recorded while the flush ran

    async def _health_check(self, replicas: List[Replica[grpc.aio.Channel]], timeout: float) -> bool:
        """Health-checks ``replicas`` at once; marks the serving ones up. True if any serves."""

        async def check(r: Replica[grpc.aio.Channel]) -> bool:
            try:
                answer = await r.health(health_request(), timeout=timeout, wait_for_ready=True)
            except grpc.RpcError as e:
                if e.code() in OUTAGE_CODES:
                    log.debug("Backstop at %s still unreachable: %s", r.target, e.code())
                    return False
                answer = SERVING  # it answered (e.g. no health service): reachable
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep probing until closed
                log.debug("Backstop health probe of %s failed: %r", r.target, e)
                return False
            if not health_serving(answer):
                return False
            self._replicas.succeeded(r)
            return True

        return any(await asyncio.gather(*(check(r) for r in replicas)))

    # --- reconciliation ----------------------------------------------------------------

    def _kick_reconcile(self) -> None:
        if self._closed or not self._remote or not self._reconciler.wants_flush():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the client's loop: the next kick or reconnect sends them
            return
        task = loop.create_task(self._reconcile_in_background())
        self._flushers.add(task)
        task.add_done_callback(self._flushers.discard)

    async def _reconcile_in_background(self) -> None:
        outage = await self._flush_pending()
        if outage is not None:
            self._outage("RecordOutcomeBatch", outage)

    async def _flush_pending(self) -> Optional[ControlPlaneUnavailable]:
        """See :meth:`backstop.Backstop._flush_pending`; runs in a task of its own
        or the probe's, never in a caller's."""
        rec = self._reconciler
        if not rec.begin():
            return None
        holding = True
        try:
            while not self._closed:
                batch = rec.next_batch()
                if batch is None:
                    holding = False
                    return None
                try:
                    errors = await self._unary(self._rpc_record_batch(batch))
                except ControlPlaneUnavailable as e:
                    rec.failed()
                    return e
                except ControlPlaneError as e:
                    rec.refused(len(batch), e)
                    continue
                except Exception as e:  # a bug must not stop the probe: counted as a failed attempt
                    log.error("reporting locally decided outcomes failed: %r", e)
                    rec.failed()
                    return None
                rec.delivered(errors)
            return None
        finally:
            if holding:
                rec.end()

    async def _decide(self, rpc: Rpc, local: Callable[[], T]) -> T:
        if await self._use_remote():
            try:
                return await self._unary(rpc)  # type: ignore[no-any-return]
            except ControlPlaneUnavailable as e:
                self._outage(rpc.method, e)
        else:
            self._ensure_prober()
        return local()

    # --- decisions -------------------------------------------------------------------

    async def can_proceed(
        self,
        target: str,
        *,
        estimated_tokens: int = 0,
        attempt: int = 0,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: str = "",
    ) -> Admission:
        """See :meth:`backstop.Backstop.can_proceed`."""
        return await self._decide(
            self._rpc_can_proceed(target, estimated_tokens, attempt, priority, max_output_tokens, request_id),
            lambda: self._local_admit(target, attempt),
        )

    async def route(
        self,
        route: RouteArg,
        *,
        estimated_tokens: int = 0,
        required_context_tokens: int = 0,
        exclude: Sequence[str] = (),
        attempt: int = 0,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        strategy: StrategyArg = None,
        expected_output_tokens: int = 0,
        request_id: str = "",
    ) -> RouteDecision:
        name, cands = self._route_args(route)
        return await self._decide(
            self._rpc_route(
                name,
                cands,
                estimated_tokens,
                required_context_tokens,
                exclude,
                attempt,
                priority,
                max_output_tokens,
                strategy,
                expected_output_tokens,
                request_id,
            ),
            lambda: self._local_route(name, cands, exclude, attempt, strategy),
        )

    async def _record(self, report: OutcomeReport) -> OutcomeResult:
        if self._is_local_permit(report.permit):
            return self._local_record(report)
        return await self._decide(self._rpc_record(report), lambda: self._local_record(report))

    def guard(
        self,
        target: str,
        *,
        estimated_tokens: int = 0,
        attempt: int = 0,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> AsyncGuard:
        """``async with bs.guard(target) as g:`` -- see :meth:`backstop.Backstop.guard`."""
        return AsyncGuard(
            self,
            target,
            estimated_tokens,
            attempt,
            priority=priority,
            max_output_tokens=max_output_tokens,
            request_id=request_id,
        )

    async def finish_request(
        self,
        request_id: str,
        result: RequestResultArg,
        *,
        route: str = "",
        elapsed: Optional[float] = None,
        attempts: int = 0,
    ) -> FinishResult:
        """Closes the user request ``request_id`` (the id sent on its
        CanProceed / Route / RecordOutcome calls) as ``result``
        (``"completed"``, ``"deferred"`` or ``"failed"``): the server counts it in
        ``backstop_requests_total`` and measures its duration and attempts.
        ``route``, ``elapsed`` (seconds) and ``attempts`` are the client's own
        measure, used only by a server that never saw the request (another
        replica, or expired). Finishing twice is harmless (``duplicate``).
        ``call()`` and ``guard()`` do this on their own."""
        return await self._unary(self._rpc_finish(request_id, result, route, elapsed, attempts))  # type: ignore[no-any-return]

    async def _finish_quietly(
        self, request_id: str, result: RequestResultArg, route: str = "", elapsed: Optional[float] = None, attempts: int = 0
    ) -> None:
        """FinishRequest for the helpers: skipped while the fail-safe decides,
        and never an error for the caller (the request then expires on the server)."""
        if not self._remote or self._closed or not request_id:
            return
        try:
            await self._unary(self._rpc_finish(request_id, result, route, elapsed, attempts))
        except Exception as e:
            log.debug("could not finish request %s on Backstop: %s", request_id, e)

    # --- call ------------------------------------------------------------------------

    @overload
    async def call(
        self,
        route: RouteArg,
        fn: Callable[[str, int, str], Awaitable[T]],
        *,
        estimated_tokens: int = ...,
        required_context_tokens: int = ...,
        exclude: Sequence[str] = ...,
        defer_to: None = ...,
        queue: Optional[str] = ...,
        payload: Any = ...,
        metadata: Optional[Mapping[str, Any]] = ...,
        idempotency_key: str = ...,
        max_attempts: int = ...,
        deadline: Optional[float] = ...,
        priority: PriorityArg = ...,
        max_output_tokens: int = ...,
        strategy: StrategyArg = ...,
        expected_output_tokens: int = ...,
        request_id: Optional[str] = ...,
    ) -> T: ...

    @overload
    async def call(
        self,
        route: RouteArg,
        fn: Callable[[str, int, str], Awaitable[T]],
        *,
        estimated_tokens: int = ...,
        required_context_tokens: int = ...,
        exclude: Sequence[str] = ...,
        defer_to: str,
        queue: Optional[str] = ...,
        payload: Any = ...,
        metadata: Optional[Mapping[str, Any]] = ...,
        idempotency_key: str = ...,
        max_attempts: int = ...,
        deadline: Optional[float] = ...,
        priority: PriorityArg = ...,
        max_output_tokens: int = ...,
        strategy: StrategyArg = ...,
        expected_output_tokens: int = ...,
        request_id: Optional[str] = ...,
    ) -> Union[T, Deferred]: ...

    async def call(
        self,
        route: RouteArg,
        fn: Callable[[str, int, str], Any],
        *,
        estimated_tokens: int = 0,
        required_context_tokens: int = 0,
        exclude: Sequence[str] = (),
        defer_to: Optional[str] = None,
        queue: Optional[str] = None,
        payload: Any = None,
        metadata: Optional[Mapping[str, Any]] = None,
        idempotency_key: str = "",
        max_attempts: int = 0,
        deadline: Optional[float] = None,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        strategy: StrategyArg = None,
        expected_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> Any:
        """See :meth:`backstop.Backstop.call`. ``fn`` is normally a coroutine
        function; a plain function works too (its result is used as is)."""
        spec = self._call_spec(
            route,
            estimated_tokens=estimated_tokens,
            required_context_tokens=required_context_tokens,
            exclude=exclude,
            defer_to=defer_to,
            queue=queue,
            payload=payload,
            metadata=metadata,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            deadline=deadline,
            priority=priority,
            max_output_tokens=max_output_tokens,
            strategy=strategy,
            expected_output_tokens=expected_output_tokens,
            request_id=request_id,
        )
        return await self._drive(call_plan(spec), invoker(fn))

    async def _drive(self, plan: Generator[Op, Any, Any], fn: Callable[..., Any]) -> Any:
        send: Any = None
        throw: Optional[BaseException] = None
        while True:
            try:
                op = plan.throw(throw) if throw is not None else plan.send(send)
            except StopIteration as done:
                return done.value
            send, throw = None, None
            try:
                send = await self._execute(op, fn)
            except BackstopError as e:
                throw = e

    async def _execute(self, op: Op, fn: Callable[..., Any]) -> Any:
        if isinstance(op, InvokeOp):
            started = time.monotonic()
            try:
                value = fn(op.target, op.max_tokens, op.key_slot)
                if inspect.isawaitable(value):
                    value = await value
            except BaseException as e:  # reported, then re-raised by the plan if not an Exception
                return Invoked(error=e, latency=time.monotonic() - started)
            return Invoked(value=value, latency=time.monotonic() - started)
        if isinstance(op, RecordOp):
            try:
                return await self._record(op.report)
            except ControlPlaneError as e:
                log.error("could not report an outcome to Backstop (%s); using local advice", e)
                return self._local_advice(op.report)
        if isinstance(op, RouteOp):
            return await self.route(
                op.route or list(op.candidates),
                estimated_tokens=op.estimated_tokens,
                required_context_tokens=op.required_context_tokens,
                exclude=op.exclude,
                attempt=op.attempt,
                priority=op.priority,
                max_output_tokens=op.max_output_tokens,
                strategy=op.strategy,
                expected_output_tokens=op.expected_output_tokens,
                request_id=op.request_id,
            )
        if isinstance(op, AdmitOp):
            return await self.can_proceed(
                op.target,
                estimated_tokens=op.estimated_tokens,
                attempt=op.attempt,
                priority=op.priority,
                max_output_tokens=op.max_output_tokens,
                request_id=op.request_id,
            )
        if isinstance(op, FinishOp):
            await self._finish_quietly(op.request_id, op.result, op.route, op.elapsed, op.attempts)
            return None
        if isinstance(op, SleepOp):
            await asyncio.sleep(op.seconds)
            return None
        if isinstance(op, DeferOp):
            return await self._unary(
                self._rpc_defer(op.queue, op.payload, op.metadata, op.idempotency_key, None, op.max_attempts)
            )
        raise TypeError(f"unknown operation {op!r}")

    # --- deferred queue ----------------------------------------------------------------

    async def defer(
        self,
        queue: str,
        payload: Any,
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        idempotency_key: str = "",
        not_before: Optional[_dt.datetime] = None,
        max_attempts: int = 0,
    ) -> Deferred:
        return await self._unary(  # type: ignore[no-any-return]
            self._rpc_defer(queue, payload, metadata, idempotency_key, not_before, max_attempts)
        )

    async def claim(
        self,
        queue: str,
        *,
        max_items: int = 1,
        lease: Optional[float] = None,
        wait: float = 0.0,
        worker: str = "",
        priority: PriorityArg = None,
    ) -> ClaimResult:
        """See :meth:`backstop.Backstop.claim`."""
        return await self._unary(  # type: ignore[no-any-return]
            self._rpc_claim(queue, max_items, lease, wait, worker, priority)
        )

    async def ack(self, item: Union[DeferredItem, str], lease_token: Optional[str] = None) -> None:
        await self._unary(self._rpc_ack(item, lease_token))

    async def nack(
        self,
        item: Union[DeferredItem, str],
        lease_token: Optional[str] = None,
        *,
        delay: float = 0.0,
        reason: str = "",
    ) -> NackResult:
        return await self._unary(self._rpc_nack(item, lease_token, delay, reason))  # type: ignore[no-any-return]

    async def queue_stats(self, queue: str = "") -> List[QueueStat]:
        return await self._unary(self._rpc_queue_stats(queue))  # type: ignore[no-any-return]

    async def dead_letters(self, queue: str = "") -> List[DeferredItem]:
        items: List[DeferredItem] = []
        token = ""
        while True:
            page, token = await self._unary(self._rpc_dead_letters(queue, token))
            items.extend(page)
            if not token:
                return items

    async def requeue(self, item_id: str) -> None:
        await self._unary(self._rpc_requeue(item_id))

    # --- admin -----------------------------------------------------------------------

    async def get_target(self, target: str) -> TargetStatus:
        return await self._unary(self._rpc_get_target(target))  # type: ignore[no-any-return]

    async def list_targets(self, prefix: str = "") -> List[TargetSummary]:
        out: List[TargetSummary] = []
        token = ""
        while True:
            page, token = await self._unary(self._rpc_list_targets(prefix, token))
            out.extend(page)
            if not token:
                return out

    async def set_breaker_state(self, target: str, mode: BreakerMode, reason: str = "") -> TargetStatus:
        return await self._unary(self._rpc_set_breaker(target, mode, reason))  # type: ignore[no-any-return]

    async def reset_target(self, target: str) -> TargetStatus:
        return await self._unary(self._rpc_reset_target(target))  # type: ignore[no-any-return]
