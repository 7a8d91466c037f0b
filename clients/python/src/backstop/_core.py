"""State and rules shared by the sync and the asyncio client.

Both clients hold one of these: settings, the local fail-safe engine, the
route memory, and the remote/local switch. They differ only in how they
perform I/O (blocking gRPC vs grpc.aio) and how they probe for recovery
(a thread vs a task).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Generic, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from . import _convert as conv
from ._local import LOCAL_PERMIT_PREFIX, LocalEngine, LocalPolicy, RouteMemory
from ._plan import CallSpec, defer_message, encode_payload, metadata_dict
from ._proto import admin_pb2, deferred_pb2
from ._reconcile import DEFAULT_LIMIT, Reconciler
from ._stream import stream_enabled
from ._transport import AddressArg, TLSConfig, parse_addresses
from .structured import Structured
from .types import (
    Admission,
    BreakerMode,
    BreakerState,
    Deferred,
    DeferredItem,
    OutcomeClass,
    OutcomeReport,
    FinishResult,
    OutcomeResult,
    PriorityArg,
    Reason,
    RequestResultArg,
    ReconcileStats,
    RouteDecision,
    Skip,
    StrategyArg,
)

log = logging.getLogger("backstop")

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"


def default_caller() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


RouteArg = Union[str, Sequence[str]]


def new_request_id() -> str:
    """A fresh id for one user request: 128 random bits as 32 hex digits."""
    return uuid.uuid4().hex

#: What a recording method returns: ``OutcomeResult`` for the sync client, an
#: awaitable of one for the asyncio client.
R = TypeVar("R")


class Core:
    """Settings and fail-safe state of one client (the constructor of both clients).

    :param address: ``host:port`` of the Backstop gRPC listener; or several
        replicas of a cluster, as a list or a comma-separated string
        (``"backstop-1:50051,backstop-2:50051"``); or one name that resolves
        to several servers (``"dns:///backstop-headless.ns.svc:50051"``).
        Decisions are balanced over the replicas and fail over between them;
        the local fail-safe takes over only when none answers.
    :param timeout: deadline of each decision call (CanProceed, RecordOutcome,
        Route), 50 ms by default: a control plane that cannot answer that fast
        is treated as down rather than slowing every agent call.
    :param caller: agent id sent with every call (default ``hostname:pid``).
    :param policy: what to do while Backstop is unreachable: ``"fail_open"``
        (default: decide locally with an in-process breaker and backoff) or
        ``"fail_closed"`` (refuse every call with :class:`BackstopUnreachable`).
    :param local_policy: settings of the local breaker and backoff (defaults:
        the server's defaults).
    :param local_routes: candidate lists for routes, used while Backstop is
        unreachable (routes seen in earlier Route answers are remembered too).
    :param token: bearer token sent as ``authorization: Bearer <token>`` on every
        call (a principal's token when the server has ``[auth]``). A wrong or
        missing one is refused with :class:`Unauthenticated`. Over plaintext it
        is visible on the network: use ``tls=`` outside loopback.
    :param tls: a :class:`TLSConfig` (roots to trust, and a client certificate
        and key for mutual TLS) to connect over TLS; ``True`` = TLS with the
        system roots. Default: plaintext.
    :param admin_token: bearer token for Admin calls when it differs from
        ``token`` (the server's ``[server] admin_token``).
    :param queue_timeout: deadline of deferred-queue and admin calls.
    :param connect_timeout: how long the first call may wait for the connection.
    :param reconnect_interval: how often the background probe retries Backstop
        while it is unreachable.
    :param reconcile_limit: how many outcomes decided locally (while Backstop
        was unreachable) are kept to be reported once it is back (oldest dropped
        first); 0 turns reconciliation off.
    :param stream: send every CanProceed / RecordOutcome / Route over one
        ``Decide`` stream per replica (default: on, unless the environment has
        ``BACKSTOP_STREAM=0``); ``False`` makes each decision a unary call.
        A server without ``Decide`` gets unary calls either way.
    :param channel_options: extra gRPC channel options.
    :param credentials: ready-made ``grpc.ChannelCredentials`` (instead of ``tls``).
    """

    def __init__(
        self,
        address: AddressArg = "127.0.0.1:50051",
        *,
        timeout: float = 0.05,
        caller: Optional[str] = None,
        policy: str = FAIL_OPEN,
        local_policy: Optional[LocalPolicy] = None,
        local_routes: Optional[Mapping[str, Sequence[str]]] = None,
        admin_token: Optional[str] = None,
        queue_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        reconnect_interval: float = 0.5,
        reconcile_limit: int = DEFAULT_LIMIT,
        channel_options: Sequence[Tuple[str, Any]] = (),
        credentials: Optional[grpc.ChannelCredentials] = None,
        stream: Optional[bool] = None,
        token: Optional[str] = None,
        tls: Union[TLSConfig, bool, None] = None,
    ) -> None:
        if policy not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(f"policy must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}, got {policy!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        #: The replicas' addresses, in the order given.
        self.addresses = parse_addresses(address)
        #: As given (a list is shown comma-separated), for messages.
        self.address = address if isinstance(address, str) else ",".join(self.addresses)
        self.timeout = float(timeout)
        self.caller = caller if caller is not None else default_caller()
        self.policy = policy
        self.queue_timeout = float(queue_timeout)
        self.connect_timeout = float(connect_timeout)
        self.reconnect_interval = float(reconnect_interval)
        if tls is not None and tls is not False:
            if credentials is not None:
                raise ValueError("pass tls= or credentials=, not both")
            tls_config = TLSConfig() if tls is True else tls
            if not isinstance(tls_config, TLSConfig):
                raise TypeError(f"tls must be a TLSConfig or True, got {tls!r}")
            credentials = tls_config.credentials()
            channel_options = [*tls_config.channel_options(), *channel_options]
        self.credentials = credentials
        #: Whether decisions go over the Decide stream (see :mod:`backstop._stream`).
        self.stream = stream_enabled(stream)
        self.local_engine = LocalEngine(local_policy or LocalPolicy())
        self.route_memory = RouteMemory(local_routes)
        self._reconciler = Reconciler(reconcile_limit)
        #: Sent with every call (the token), or None.
        self._call_metadata: Optional[Tuple[Tuple[str, str], ...]] = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self._admin_metadata: Optional[Tuple[Tuple[str, str], ...]] = (
            (("authorization", f"Bearer {admin_token}"),) if admin_token else self._call_metadata
        )
        self._mode_lock = threading.Lock()
        self._remote = True
        self._down_since = 0.0
        self._connected_once = False
        self._closed = False
        backoff_ms = max(50, int(self.reconnect_interval * 1000))
        self.channel_options: List[Tuple[str, Any]] = [
            # Reconnect quickly after an outage, so switching back is prompt.
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.min_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 2000)),
            *channel_options,
        ]
        self._setup()

    def _setup(self) -> None:
        """Creates the transport (the sync client's channel, the async client's locks)."""

    # --- the remote/local switch ------------------------------------------------

    @property
    def mode(self) -> str:
        """``"remote"`` while Backstop answers; ``"local"`` while the fail-safe decides."""
        return "remote" if self._remote else "local"

    @property
    def is_local(self) -> bool:
        return not self._remote

    def _went_down(self, method: str, err: BaseException) -> bool:
        """Switches to local decisions. True for the caller that made the switch
        (it starts the recovery probe); logged once per outage."""
        with self._mode_lock:
            if not self._remote or self._closed:
                return False
            self._remote = False
            self._down_since = time.monotonic()
        log.warning(
            "Backstop at %s is unreachable (%s); deciding locally (%s) and reconnecting in the background",
            self.address,
            err if str(err).startswith(method) else f"{method}: {err}",
            self.policy,
        )
        return True

    def _came_back(self) -> None:
        with self._mode_lock:
            if self._remote:
                return
            self._remote = True
            down = time.monotonic() - self._down_since
        log.warning("Backstop at %s is reachable again after %.1fs; using the fleet's decisions", self.address, down)

    # --- local decisions ----------------------------------------------------------

    def _local_admit(self, target: str, attempt: int) -> Admission:
        if self.policy == FAIL_CLOSED:
            return Admission(
                target,
                False,
                Reason.CONTROL_PLANE_UNAVAILABLE,
                BreakerState.UNSPECIFIED,
                retry_after=self.reconnect_interval,
                local=True,
            )
        return self.local_engine.admit(target, attempt)

    def _local_route(
        self,
        route: Optional[str],
        candidates: Sequence[str],
        exclude: Sequence[str],
        attempt: int,
        strategy: StrategyArg = None,
    ) -> RouteDecision:
        """The fail-safe's Route: candidates in order (there are no fleet
        budgets, latencies or prices locally, so a requested strategy is not
        applied; priority and max_output_tokens have nothing to draw on)."""
        cands = list(candidates) if candidates else self.route_memory.candidates(route or "")
        if self.policy == FAIL_CLOSED:
            skipped = tuple(Skip(c, Reason.CONTROL_PLANE_UNAVAILABLE, self.reconnect_interval) for c in cands)
            return RouteDecision(None, skipped=skipped, retry_after=self.reconnect_interval, local=True)
        return self.local_engine.route(cands, exclude, attempt, strategy=conv.strategy(strategy))

    def _local_record(self, report: OutcomeReport) -> OutcomeResult:
        """An outcome decided by the fail-safe: applied to the local breaker and
        kept to be reported to Backstop once it is reachable (reconciliation)."""
        result = self.local_engine.record(report)
        if self._reconciler.enabled and _sendable(report) and self._reconciler.add(report, result) and self._remote:
            # Reported with a local permit after Backstop came back: send it now.
            self._kick_reconcile()
        return result

    def _local_advice(self, report: OutcomeReport) -> OutcomeResult:
        """Local retry advice for a report the server refused (e.g. INVALID_ARGUMENT):
        the server saw it, so it is not kept for reconciliation."""
        return self.local_engine.record(report)

    def _kick_reconcile(self) -> None:
        """Starts sending the outcomes kept for reconciliation in the background
        (a thread or a task), unless a sender is running or Backstop is unreachable."""

    @property
    def reconcile_stats(self) -> ReconcileStats:
        """Outcomes decided locally while Backstop was unreachable: how many wait
        to be reported, and how many were reported, refused or dropped."""
        return self._reconciler.stats()

    @staticmethod
    def _is_local_permit(permit: str) -> bool:
        return permit.startswith(LOCAL_PERMIT_PREFIX)

    def _seen_admission(self, adm: Admission) -> Admission:
        # A fleet refusal is carried into local mode if the outage starts now.
        if not adm.allowed and adm.reason == Reason.CIRCUIT_OPEN and adm.retry_after:
            self.local_engine.seed_open(adm.target, adm.retry_after)
        return adm

    def _seen_route(self, route: Optional[str], decision: RouteDecision) -> RouteDecision:
        if route:
            self.route_memory.learn(route, decision)
        for s in decision.skipped:
            if s.reason == Reason.CIRCUIT_OPEN and s.retry_after:
                self.local_engine.seed_open(s.target, s.retry_after)
        return decision

    # --- request building ------------------------------------------------------------

    @staticmethod
    def _route_args(route: RouteArg) -> Tuple[Optional[str], List[str]]:
        if isinstance(route, str):
            if not route:
                raise ValueError("route is empty: name a configured route, or pass a list of targets")
            return route, []
        cands = list(route)
        if not cands:
            raise ValueError("the candidate list is empty")
        return None, cands

    def _call_spec(
        self,
        route: RouteArg,
        *,
        estimated_tokens: int,
        required_context_tokens: int,
        exclude: Sequence[str],
        defer_to: Optional[str],
        queue: Optional[str],
        payload: Any,
        metadata: Optional[Mapping[str, Any]],
        idempotency_key: str,
        max_attempts: int,
        deadline: Optional[float],
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        strategy: StrategyArg = None,
        expected_output_tokens: int = 0,
        request_id: Optional[str] = None,
    ) -> CallSpec:
        name, cands = self._route_args(route)
        if defer_to not in (None, "queue"):
            raise ValueError(f"defer_to must be None or 'queue', got {defer_to!r}")
        defer = defer_to == "queue"
        q = queue or name or ""
        if defer:
            if payload is None:
                raise ValueError("defer_to='queue' needs payload=: the request to save for later")
            if not q:
                raise ValueError("defer_to='queue' with a candidate list needs queue= (a route or target name)")
        return CallSpec(
            route=name,
            candidates=cands,
            caller=self.caller,
            estimated_tokens=estimated_tokens,
            required_context_tokens=required_context_tokens,
            exclude=list(exclude),
            defer=defer,
            queue=q,
            payload=encode_payload(payload) if defer else None,
            metadata=metadata_dict(metadata),
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            deadline=deadline,
            # Checked here, so a typo fails before anything is sent.
            priority=conv.priority(priority),
            max_output_tokens=conv.non_negative("max_output_tokens", max_output_tokens),
            strategy=conv.strategy(strategy),
            expected_output_tokens=conv.non_negative("expected_output_tokens", expected_output_tokens),
            request_id=request_id or new_request_id(),
        )


def _sendable(report: OutcomeReport) -> bool:
    """Whether a report converts to the wire (a local-permit report never went
    through the conversion; one that cannot be sent is not kept)."""
    try:
        conv.record_request(report)
    except (ValueError, TypeError) as e:
        log.debug("not keeping an outcome for reconciliation: %s", e)
        return False
    return True


def invoker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A fresh per-call callable: ``structured()`` wrappers get their own correction state."""
    if isinstance(fn, Structured):
        return fn.session()
    return fn


class Rpc:
    """One unary call, described: which stub method, the request, how to convert
    the answer, the deadline. Built once here; the sync and async clients only
    execute it."""

    __slots__ = ("service", "method", "request", "convert", "timeout", "admin")

    def __init__(
        self,
        service: str,
        method: str,
        request: Any,
        convert: Callable[[Any], Any],
        timeout: float,
        admin: bool = False,
    ) -> None:
        self.service = service
        self.method = method
        self.request = request
        self.convert = convert
        self.timeout = timeout
        self.admin = admin


class Requests(Core, Generic[R]):
    """Builds every RPC of the public API (shared by both clients), and the
    methods whose only difference between the clients is the transport.

    ``R`` is what recording an outcome returns: the sync client's
    :meth:`_record` returns the :class:`OutcomeResult`, the asyncio client's is
    a coroutine, so :meth:`record_outcome` is written once for both.
    """

    def _record(self, report: OutcomeReport) -> R:
        """Sends one report (or decides locally); the transport of each client."""
        raise NotImplementedError

    def record_outcome(
        self,
        target: str,
        *,
        permit: str = "",
        outcome: OutcomeClass = OutcomeClass.UNSPECIFIED,
        http_status: int = 0,
        error_type: str = "",
        headers: Optional[Mapping[str, str]] = None,
        latency: Optional[float] = None,
        retry_after: Optional[float] = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        attempt: int = 0,
        key_slot: str = "",
        request_id: str = "",
        finish: Optional[RequestResultArg] = None,
    ) -> R:
        """Reports what happened to a call (see :meth:`guard` for the automatic
        version). The parameters are the fields of :class:`OutcomeReport`, the
        one definition of a report; the asyncio client's result is awaited.
        ``request_id`` names the user request this call served; ``finish``
        (e.g. ``"completed"``) closes it in the same call."""
        return self._record(
            OutcomeReport(
                target=target,
                permit=permit,
                outcome=outcome,
                http_status=http_status,
                error_type=error_type,
                latency=latency,
                retry_after=retry_after,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                attempt=attempt,
                headers=dict(headers or {}),
                key_slot=key_slot,
                caller=self.caller,
                request_id=request_id,
                finish=conv.request_result(finish) if finish is not None else None,
            )
        )

    # Resilience -------------------------------------------------------------------

    def _rpc_can_proceed(
        self,
        target: str,
        estimated_tokens: int,
        attempt: int,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        request_id: str = "",
    ) -> Rpc:
        req = conv.can_proceed_request(
            target,
            caller=self.caller,
            estimated_tokens=estimated_tokens,
            attempt=attempt,
            priority=priority,
            max_output_tokens=max_output_tokens,
            request_id=request_id,
        )
        return Rpc(
            "resilience",
            "CanProceed",
            req,
            lambda r: self._seen_admission(conv.admission(target, r)),
            self.timeout,
        )

    def _rpc_record(self, report: OutcomeReport) -> Rpc:
        return Rpc(
            "resilience",
            "RecordOutcome",
            conv.record_request(report),
            lambda r: conv.outcome_result(report.target, r),
            self.timeout,
        )

    def _rpc_record_batch(self, reports: Sequence[OutcomeReport]) -> Rpc:
        """RecordOutcomeBatch for reconciliation; converts the answer to one
        error per item (None = accepted)."""
        return Rpc(
            "resilience",
            "RecordOutcomeBatch",
            conv.record_batch_request(reports),
            conv.batch_errors,
            self.queue_timeout,
        )

    def _rpc_route(
        self,
        route: Optional[str],
        candidates: Sequence[str],
        estimated_tokens: int,
        required_context_tokens: int,
        exclude: Sequence[str],
        attempt: int,
        priority: PriorityArg = None,
        max_output_tokens: int = 0,
        strategy: StrategyArg = None,
        expected_output_tokens: int = 0,
        request_id: str = "",
    ) -> Rpc:
        req = conv.route_request(
            route,
            candidates,
            estimated_tokens=estimated_tokens,
            required_context_tokens=required_context_tokens,
            exclude=exclude,
            caller=self.caller,
            attempt=attempt,
            priority=priority,
            max_output_tokens=max_output_tokens,
            strategy=strategy,
            expected_output_tokens=expected_output_tokens,
            request_id=request_id,
        )
        return Rpc(
            "resilience",
            "Route",
            req,
            lambda r: self._seen_route(route, conv.route_decision(r)),
            self.timeout,
        )

    def _rpc_finish(
        self,
        request_id: str,
        result: RequestResultArg,
        route: str = "",
        elapsed: Optional[float] = None,
        attempts: int = 0,
    ) -> Rpc:
        req = conv.finish_request_request(request_id, result, route=route, elapsed=elapsed, attempts=attempts)
        return Rpc("resilience", "FinishRequest", req, conv.finish_result, self.timeout)

    # Deferred ---------------------------------------------------------------------

    def _rpc_defer(
        self,
        queue: str,
        payload: Any,
        metadata: Optional[Mapping[str, Any]],
        idempotency_key: str,
        not_before: Any,
        max_attempts: int,
    ) -> Rpc:
        req = conv.defer_request(
            queue,
            encode_payload(payload),
            metadata=metadata_dict(metadata),
            idempotency_key=idempotency_key,
            not_before=not_before,
            max_attempts=max_attempts,
        )

        def convert(r: Any) -> Deferred:
            return Deferred(
                id=r.id,
                queue=queue,
                message=r.message or defer_message(r.depth),
                duplicate=r.duplicate,
                depth=r.depth,
            )

        return Rpc("deferred", "Defer", req, convert, self.queue_timeout)

    def _rpc_claim(
        self,
        queue: str,
        max_items: int,
        lease: Optional[float],
        wait: float,
        worker: str,
        priority: PriorityArg = None,
    ) -> Rpc:
        req = deferred_pb2.ClaimRequest(
            queue=queue,
            max_items=max_items,
            worker=worker or self.caller,
            priority=conv.priority_to_proto(priority),
        )
        if lease is not None:
            req.lease.CopyFrom(conv.duration(lease))
        if wait > 0:
            req.wait.CopyFrom(conv.duration(wait))
        return Rpc("deferred", "Claim", req, conv.claim_result, self.queue_timeout + max(0.0, wait))

    def _rpc_ack(self, item: Union[DeferredItem, str], lease_token: Optional[str]) -> Rpc:
        item_id, token = _item_ref(item, lease_token)
        return Rpc("deferred", "Ack", deferred_pb2.AckRequest(id=item_id, lease_token=token), lambda r: None, self.queue_timeout)

    def _rpc_nack(
        self, item: Union[DeferredItem, str], lease_token: Optional[str], delay: float, reason: str
    ) -> Rpc:
        item_id, token = _item_ref(item, lease_token)
        req = deferred_pb2.NackRequest(id=item_id, lease_token=token, reason=reason)
        if delay > 0:
            req.delay.CopyFrom(conv.duration(delay))
        return Rpc("deferred", "Nack", req, conv.nack_result, self.queue_timeout)

    def _rpc_queue_stats(self, queue: str) -> Rpc:
        return Rpc(
            "deferred",
            "QueueStats",
            deferred_pb2.QueueStatsRequest(queue=queue),
            lambda r: [conv.queue_stat(q) for q in r.queues],
            self.queue_timeout,
        )

    def _rpc_dead_letters(self, queue: str, page_token: str) -> Rpc:
        req = deferred_pb2.ListDeadLettersRequest(queue=queue, page_size=1000, page_token=page_token)
        return Rpc(
            "deferred",
            "ListDeadLetters",
            req,
            lambda r: ([conv.deferred_item(i) for i in r.items], r.next_page_token),
            self.queue_timeout,
        )

    def _rpc_requeue(self, item_id: str) -> Rpc:
        return Rpc("deferred", "Requeue", deferred_pb2.RequeueRequest(id=item_id), lambda r: None, self.queue_timeout)

    # Admin ------------------------------------------------------------------------

    def _rpc_get_target(self, target: str) -> Rpc:
        return Rpc(
            "admin", "GetTarget", admin_pb2.GetTargetRequest(target=target), conv.target_status, self.queue_timeout, True
        )

    def _rpc_list_targets(self, prefix: str, page_token: str) -> Rpc:
        req = admin_pb2.ListTargetsRequest(prefix=prefix, page_size=1000, page_token=page_token)
        return Rpc(
            "admin",
            "ListTargets",
            req,
            lambda r: ([conv.target_summary(t) for t in r.targets], r.next_page_token),
            self.queue_timeout,
            True,
        )

    def _rpc_set_breaker(self, target: str, mode: BreakerMode, reason: str) -> Rpc:
        req = admin_pb2.SetBreakerStateRequest(target=target, mode=conv.breaker_mode_to_proto(mode), reason=reason)
        return Rpc("admin", "SetBreakerState", req, conv.target_status, self.queue_timeout, True)

    def _rpc_reset_target(self, target: str) -> Rpc:
        return Rpc(
            "admin", "ResetTarget", admin_pb2.ResetTargetRequest(target=target), conv.target_status, self.queue_timeout, True
        )

    def _with_metadata(self, open_call: Callable[..., Any]) -> Callable[..., Any]:
        """A stream's opener that sends the token, if any."""
        md = self._call_metadata
        if md is None:
            return open_call
        return lambda *args, **kw: open_call(*args, metadata=md, **kw)

    def _metadata(self, rpc: Rpc) -> Optional[Tuple[Tuple[str, str], ...]]:
        return self._admin_metadata if rpc.admin else self._call_metadata


def _item_ref(item: Union[DeferredItem, str], lease_token: Optional[str]) -> Tuple[str, str]:
    if isinstance(item, DeferredItem):
        return item.id, lease_token if lease_token is not None else item.lease_token
    if lease_token is None:
        raise ValueError("pass the claimed DeferredItem, or its id and lease_token")
    return item, lease_token
