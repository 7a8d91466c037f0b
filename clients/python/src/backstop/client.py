"""The blocking client, :class:`Backstop`."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from typing import (
    Any,
    Callable,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
    overload,
)

import grpc

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
from ._stream import DECIDE_FIELDS, USE_UNARY, DecideStream
from ._transport import (
    OUTAGE_CODES,
    SERVING,
    Replica,
    ReplicaSet,
    health_request,
    health_serving,
    rpc_error,
    single_server,
    sync_channel,
    target_options,
)
from .errors import BackstopError, ControlPlaneError, ControlPlaneUnavailable
from .guard import Guard
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


class Backstop(Requests[OutcomeResult]):
    """Blocking Backstop client. Thread-safe; create one per process and share it.

    ``address`` is one ``host:port``, or the replicas of a cluster (a list, a
    comma-separated string, or a name with several addresses such as
    ``dns:///backstop-headless:50051``): decisions are balanced over them and
    fail over between them before the local fail-safe takes over.

    ``Backstop(address="127.0.0.1:50051", *, timeout=0.05, policy="fail_open",
    local_policy=None, local_routes=None, caller=None, admin_token=None,
    queue_timeout=5.0, connect_timeout=1.0, reconnect_interval=0.5,
    reconcile_limit=1000, channel_options=(), credentials=None)``; the
    parameters are described on :class:`backstop._core.Core`.
    """

    def _setup(self) -> None:
        self._replicas: ReplicaSet[grpc.Channel] = ReplicaSet(self.addresses, self._connect)
        self._channel = self._replicas.first.channel
        #: The generated stubs, on the first address's channel.
        self.stubs = self._replicas.first.stubs
        self._connect_lock = threading.Lock()
        self._prober_lock = threading.Lock()
        self._stopping = threading.Event()
        self._prober: Optional[threading.Thread] = None
        self._flusher: Optional[threading.Thread] = None
        if self.stream:
            for r in self._replicas.replicas:
                r.decide = DecideStream(self._with_metadata(r.stubs.resilience.Decide), r.target, not single_server(r.target), self.timeout)

    def _connect(self, target: str, sticky: bool) -> grpc.Channel:
        return sync_channel(target, self.credentials, target_options(target, self.channel_options, sticky=sticky))

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stops the recovery probe and closes the channels."""
        with self._mode_lock:
            self._closed = True
        self._stopping.set()
        for t in (self._prober, self._flusher):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)
        for r in self._replicas.replicas:
            if r.decide is not None:
                r.decide.close()
        for channel in self._replicas.channels():
            channel.close()

    def __enter__(self) -> Backstop:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------

    def _unary(self, rpc: Rpc) -> Any:
        """One call, on the replicas in the order the replica set gives; an outage
        answer moves on to the next replica, and the last one's is raised.
        Decisions go over the replica's Decide stream when there is one."""
        queue = rpc.service == "deferred"
        last: Optional[ControlPlaneUnavailable] = None
        for replica in self._replicas.sticky() if queue else self._replicas.balanced(rpc.method):
            try:
                response = self._attempt(replica, rpc, queue)
            except ControlPlaneError as err:
                # A queue call that ran out of time may have been carried out (a
                # Defer saved): only a replica that cannot be reached is skipped.
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

    def _attempt(self, replica: Replica[grpc.Channel], rpc: Rpc, queue: bool) -> Any:
        """One replica's answer (the response message) or its error, as a ControlPlaneError."""
        if replica.decide is not None and rpc.method in DECIDE_FIELDS and rpc.service == "resilience":
            response = replica.decide.call(rpc)
            if response is not USE_UNARY:
                return response
        stubs = replica.queue_stubs() if queue else replica.stubs
        method = getattr(getattr(stubs, rpc.service), rpc.method)
        try:
            return method(rpc.request, timeout=rpc.timeout, metadata=self._metadata(rpc))
        except grpc.RpcError as e:
            raise rpc_error(rpc.method, e) from e

    def _replica_failed(self, replica: Replica[grpc.Channel], err: Any) -> None:
        self._replicas.failed(replica, err)
        self._ensure_prober()  # health-checks the replicas marked down

    def _use_remote(self) -> bool:
        if not self._remote:
            return False
        if not self._connected_once:
            with self._connect_lock:
                if not self._connected_once:
                    self._connected_once = True
                    if not self._wait_connected():
                        self._outage("connect", f"not connected within {self.connect_timeout}s")
        return self._remote

    def _wait_connected(self) -> bool:
        """Waits up to ``connect_timeout`` for any replica's channel to connect."""
        ready = threading.Event()
        futures = [grpc.channel_ready_future(r.channel) for r in self._replicas.replicas]
        for f in futures:
            f.add_done_callback(lambda _f: ready.set())
        connected = ready.wait(self.connect_timeout) and any(f.done() and not f.cancelled() for f in futures)
        for f in futures:
            f.cancel()  # stops waiting; the channels keep connecting on their own
        return connected

    def _outage(self, method: str, err: Any) -> None:
        if self._went_down(method, err):
            self._ensure_prober()

    def _ensure_prober(self) -> None:
        """Starts the background probe, unless it is running (it is restarted if it
        ever died), when Backstop is unreachable or a replica is marked down."""
        with self._prober_lock:
            if self._closed or (self._prober is not None and self._prober.is_alive()):
                return
            if self._remote and not self._replicas.down():
                return
            self._prober = threading.Thread(target=self._probe, name="backstop-reconnect", daemon=True)
            self._prober.start()

    def _probe(self) -> None:
        """Background recovery: health-checks the replicas marked down (every
        replica while the fail-safe decides) until they serve again; on the
        way back from local mode, reports what the fail-safe decided meanwhile,
        then switches back."""
        probe_timeout = max(1.0, self.timeout)
        while not self._stopping.wait(self.reconnect_interval):
            local = not self._remote
            candidates = self._replicas.replicas if local else self._replicas.down()
            if not candidates:
                with self._prober_lock:
                    # Decided under the lock, so a replica marked down now starts a new probe.
                    if self._remote and not self._replicas.down():
                        self._prober = None
                        return
                continue
            if self._health_check(candidates, probe_timeout) and local:
                # The outage's outcomes go first, so the server sees them in the
                # order they happened; callers keep deciding locally meanwhile.
                outage = self._flush_pending()
                if outage is not None:
                    log.debug("Backstop still unreachable for reports: %s", outage)
                    continue
                self._came_back()
                self._kick_reconcile()  # outcomes recorded while the flush ran

    def _health_check(self, replicas: List[Replica[grpc.Channel]], timeout: float) -> bool:
        """Health-checks ``replicas`` at once; marks the serving ones up. True if any serves."""
        pending = []
        for r in replicas:
            try:
                pending.append((r, r.health.future(health_request(), timeout=timeout, wait_for_ready=True)))
            except Exception as e:  # e.g. the channel was closed under us: keep probing until stopped
                log.debug("Backstop health probe of %s failed: %r", r.target, e)
        serving = False
        for r, future in pending:
            try:
                answer = future.result()
            except grpc.RpcError as e:
                if e.code() in OUTAGE_CODES:
                    log.debug("Backstop at %s still unreachable: %s", r.target, e.code())
                    continue
                answer = SERVING  # it answered (e.g. no health service): reachable
            except Exception as e:
                log.debug("Backstop health probe of %s failed: %r", r.target, e)
                continue
            if health_serving(answer):
                self._replicas.succeeded(r)
                serving = True
        return serving

    # --- reconciliation ----------------------------------------------------------------

    def _kick_reconcile(self) -> None:
        if self._closed or not self._remote or not self._reconciler.wants_flush():
            return
        flusher = threading.Thread(target=self._reconcile_in_background, name="backstop-reconcile", daemon=True)
        self._flusher = flusher
        flusher.start()

    def _reconcile_in_background(self) -> None:
        outage = self._flush_pending()
        if outage is not None:
            self._outage("RecordOutcomeBatch", outage)

    def _flush_pending(self) -> Optional[ControlPlaneUnavailable]:
        """Sends the outcomes kept for reconciliation, batch by batch, until none
        are left. Returns the outage that stopped it (the rest stay, one attempt
        spent), or None. Runs on the probe or a background thread, never a caller's."""
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
                    errors = self._unary(self._rpc_record_batch(batch))
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

    def _decide(self, rpc: Rpc, local: Callable[[], T]) -> T:
        """A decision call with the fail-safe: remote when possible, local otherwise."""
        if self._use_remote():
            try:
                return self._unary(rpc)  # type: ignore[no-any-return]
            except ControlPlaneUnavailable as e:
                self._outage(rpc.method, e)
        else:
            self._ensure_prober()
        return local()

    # --- decisions -------------------------------------------------------------------

    def can_proceed(
        self,
        target: str,
        *,
        estimated_tokens: int = 0,
        attempt: int = 0,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: str = "",
    ) -> Admission:
        """May a call go to ``target`` now? (Does not raise on refusal; see :meth:`guard`.)

        ``priority`` (a :class:`Priority` or ``"interactive"`` / ``"default"`` /
        ``"batch"``): budgets with a ``reserve`` refuse lower priorities first,
        with :attr:`Reason.PRIORITY_RESERVED`. ``max_output_tokens``: the most
        output the call may produce, reserved at the output price against spend
        limits (a refusal says :attr:`Reason.SPEND_LIMIT`, with ``retry_after``).
        The local fail-safe accepts both and has nothing to apply them to.
        """
        return self._decide(
            self._rpc_can_proceed(target, estimated_tokens, attempt, priority, max_output_tokens, request_id),
            lambda: self._local_admit(target, attempt),
        )

    def route(
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
        """Which target of ``route`` (a configured route name, or a list of targets) should serve now.

        ``strategy`` (a :class:`RouteStrategy` or its name, e.g.
        ``"lowest_latency"``) overrides the route's own for this request;
        ``expected_output_tokens`` is what LOWEST_COST prices the output at.
        ``priority`` and ``max_output_tokens`` as in :meth:`can_proceed`. The
        decision's ``strategy`` and ``reason`` say how and why this target was chosen.
        """
        name, cands = self._route_args(route)
        return self._decide(
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

    def _record(self, report: OutcomeReport) -> OutcomeResult:
        if self._is_local_permit(report.permit):
            return self._local_record(report)
        return self._decide(self._rpc_record(report), lambda: self._local_record(report))

    def guard(
        self,
        target: str,
        *,
        estimated_tokens: int = 0,
        attempt: int = 0,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> Guard:
        """A context manager around one provider call: CanProceed on entry
        (raising :class:`CircuitOpen` / :class:`RateLimited` when refused; a
        budget reserved for higher priorities raises :class:`PriorityReserved`
        and a spend limit :class:`SpendLimitExceeded`, both RateLimited),
        RecordOutcome on exit, classified from the block's exception."""
        return Guard(
            self,
            target,
            estimated_tokens,
            attempt,
            priority=priority,
            max_output_tokens=max_output_tokens,
            request_id=request_id,
        )

    def finish_request(
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
        return self._unary(self._rpc_finish(request_id, result, route, elapsed, attempts))  # type: ignore[no-any-return]

    def _finish_quietly(
        self, request_id: str, result: RequestResultArg, route: str = "", elapsed: Optional[float] = None, attempts: int = 0
    ) -> None:
        """FinishRequest for the helpers: skipped while the fail-safe decides,
        and never an error for the caller (the request then expires on the server)."""
        if not self._remote or self._closed or not request_id:
            return
        try:
            self._unary(self._rpc_finish(request_id, result, route, elapsed, attempts))
        except Exception as e:
            log.debug("could not finish request %s on Backstop: %s", request_id, e)

    # --- call ------------------------------------------------------------------------

    @overload
    def call(
        self,
        route: RouteArg,
        fn: Callable[[str, int, str], T],
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
    def call(
        self,
        route: RouteArg,
        fn: Callable[[str, int, str], T],
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

    def call(
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
        """Runs ``fn(target, max_tokens, key_slot)`` on the best available target of
        ``route``, retrying per Backstop's advice and falling back along the route.

        Returns ``fn``'s result. When every target is exhausted, raises
        :class:`AllTargetsFailed` (listing every error), or with
        ``defer_to="queue"`` saves ``payload`` to the route's deferred queue and
        returns a :class:`Deferred`. ``deadline`` (seconds) stops retry sleeps
        that would end later than that after the start.

        ``priority`` and ``max_output_tokens`` go with every Route and retry
        CanProceed (see :meth:`can_proceed`); ``strategy`` and
        ``expected_output_tokens`` with every Route (see :meth:`route`). A
        target refused for a spend limit or a priority reserve is skipped, never
        called and never counted as a provider failure: it shows in
        :class:`AllTargetsFailed`'s ``errors`` with reason SPEND_LIMIT /
        PRIORITY_RESERVED and its ``retry_after``.
        """
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
        return self._drive(call_plan(spec), invoker(fn))

    def _drive(self, plan: Generator[Op, Any, Any], fn: Callable[..., Any]) -> Any:
        send: Any = None
        throw: Optional[BaseException] = None
        while True:
            try:
                op = plan.throw(throw) if throw is not None else plan.send(send)
            except StopIteration as done:
                return done.value
            send, throw = None, None
            try:
                send = self._execute(op, fn)
            except BackstopError as e:
                throw = e

    def _execute(self, op: Op, fn: Callable[..., Any]) -> Any:
        if isinstance(op, InvokeOp):
            started = time.monotonic()
            try:
                value = fn(op.target, op.max_tokens, op.key_slot)
            except BaseException as e:  # reported, then re-raised by the plan if not an Exception
                return Invoked(error=e, latency=time.monotonic() - started)
            return Invoked(value=value, latency=time.monotonic() - started)
        if isinstance(op, RecordOp):
            try:
                return self._record(op.report)
            except ControlPlaneError as e:
                log.error("could not report an outcome to Backstop (%s); using local advice", e)
                return self._local_advice(op.report)
        if isinstance(op, RouteOp):
            return self.route(
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
            return self.can_proceed(
                op.target,
                estimated_tokens=op.estimated_tokens,
                attempt=op.attempt,
                priority=op.priority,
                max_output_tokens=op.max_output_tokens,
                request_id=op.request_id,
            )
        if isinstance(op, FinishOp):
            self._finish_quietly(op.request_id, op.result, op.route, op.elapsed, op.attempts)
            return None
        if isinstance(op, SleepOp):
            time.sleep(op.seconds)
            return None
        if isinstance(op, DeferOp):
            return self._unary(
                self._rpc_defer(op.queue, op.payload, op.metadata, op.idempotency_key, None, op.max_attempts)
            )
        raise TypeError(f"unknown operation {op!r}")

    # --- deferred queue ----------------------------------------------------------------

    def defer(
        self,
        queue: str,
        payload: Any,
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        idempotency_key: str = "",
        not_before: Optional[_dt.datetime] = None,
        max_attempts: int = 0,
    ) -> Deferred:
        """Saves a request to ``queue`` (a route or target name) for a :class:`DeferredWorker`.
        ``payload``: bytes, str, or anything JSON-serializable."""
        return self._unary(  # type: ignore[no-any-return]
            self._rpc_defer(queue, payload, metadata, idempotency_key, not_before, max_attempts)
        )

    def claim(
        self,
        queue: str,
        *,
        max_items: int = 1,
        lease: Optional[float] = None,
        wait: float = 0.0,
        worker: str = "",
        priority: PriorityArg = None,
    ) -> ClaimResult:
        """Takes up to ``max_items`` ready items (long-polling up to ``wait`` seconds).
        Each is admitted at ``priority`` (default DEFAULT): a background drain
        that claims as ``"batch"`` never uses what budgets reserve for interactive calls."""
        return self._unary(self._rpc_claim(queue, max_items, lease, wait, worker, priority))  # type: ignore[no-any-return]

    def _claim_future(
        self,
        queue: str,
        max_items: int,
        lease: Optional[float],
        wait: float,
        worker: str,
        priority: PriorityArg = None,
    ) -> Any:
        """A cancellable Claim, so a worker can stop in the middle of a long poll.
        Sent to the queue's replica; if that one turns out to be unreachable, the
        worker's next Claim goes to the next replica."""
        rpc = self._rpc_claim(queue, max_items, lease, wait, worker, priority)
        replica = self._replicas.queue_replica()
        future = replica.queue_stubs().deferred.Claim.future(rpc.request, timeout=rpc.timeout, metadata=self._metadata(rpc))

        def done(f: Any) -> None:
            if f.cancelled():
                return
            e = f.exception()
            if e is None:
                self._replicas.succeeded(replica, queue=True)
            elif isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE:
                self._replica_failed(replica, rpc_error(rpc.method, e))

        future.add_done_callback(done)
        return rpc, future

    def ack(self, item: Union[DeferredItem, str], lease_token: Optional[str] = None) -> None:
        self._unary(self._rpc_ack(item, lease_token))

    def nack(
        self,
        item: Union[DeferredItem, str],
        lease_token: Optional[str] = None,
        *,
        delay: float = 0.0,
        reason: str = "",
    ) -> NackResult:
        return self._unary(self._rpc_nack(item, lease_token, delay, reason))  # type: ignore[no-any-return]

    def queue_stats(self, queue: str = "") -> List[QueueStat]:
        return self._unary(self._rpc_queue_stats(queue))  # type: ignore[no-any-return]

    def dead_letters(self, queue: str = "") -> List[DeferredItem]:
        items: List[DeferredItem] = []
        token = ""
        while True:
            page, token = self._unary(self._rpc_dead_letters(queue, token))
            items.extend(page)
            if not token:
                return items

    def requeue(self, item_id: str) -> None:
        self._unary(self._rpc_requeue(item_id))

    # --- admin -----------------------------------------------------------------------

    def get_target(self, target: str) -> TargetStatus:
        return self._unary(self._rpc_get_target(target))  # type: ignore[no-any-return]

    def list_targets(self, prefix: str = "") -> List[TargetSummary]:
        out: List[TargetSummary] = []
        token = ""
        while True:
            page, token = self._unary(self._rpc_list_targets(prefix, token))
            out.extend(page)
            if not token:
                return out

    def set_breaker_state(self, target: str, mode: BreakerMode, reason: str = "") -> TargetStatus:
        return self._unary(self._rpc_set_breaker(target, mode, reason))  # type: ignore[no-any-return]

    def reset_target(self, target: str) -> TargetStatus:
        return self._unary(self._rpc_reset_target(target))  # type: ignore[no-any-return]
