"""Workers that drain a deferred queue.

A worker long-polls Claim; Backstop hands out items only while the queue's
route (or target) is admissible, each already admitted to a target with a
permit. The worker runs the handler on the item, reports the outcome with
that permit (classified like ``guard()``), then Acks on success or Nacks with
the server's retry delay on failure (after ``max_attempts`` deliveries the
server dead-letters the item). Delivery is at-least-once: a worker that dies
mid-item leaves it to be redelivered when its lease expires, so handlers
should be idempotent (``item.id`` is a stable key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import grpc

from . import _convert as conv
from ._classify import describe, observe_exception, observe_success
from ._transport import rpc_error
from .errors import ControlPlaneError
from .types import ClaimResult, DeferredItem, OutcomeReport, OutcomeResult, Priority, PriorityArg

if TYPE_CHECKING:
    from .aio import AsyncBackstop
    from .client import Backstop

log = logging.getLogger("backstop")


@dataclass
class WorkerStats:
    claimed: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    #: Claim/Ack/Nack calls that failed (e.g. while Backstop was unreachable).
    errors: int = 0


class _WorkerBase:
    def __init__(
        self,
        queue: str,
        *,
        max_items: int,
        lease: float,
        wait: float,
        worker_id: str,
        retry_delay: float,
        error_backoff: float,
        priority: PriorityArg = None,
    ) -> None:
        if not queue:
            raise ValueError("queue is empty: name the route or target whose queue to drain")
        #: The priority deliveries are admitted at (None = DEFAULT; BATCH leaves budgets' reserves alone).
        self.priority: Optional[Priority] = conv.priority(priority)
        self.queue = queue
        self.max_items = max_items
        self.lease = lease
        self.wait = wait
        self.worker_id = worker_id
        self.retry_delay = retry_delay
        self.error_backoff = error_backoff
        self.stats = WorkerStats()

    def _report(self, item: DeferredItem, exc: Optional[BaseException], value: Any, latency: float) -> OutcomeReport:
        obs = observe_success(value) if exc is None else observe_exception(exc)
        # Usage the handler set on the item wins over what the reply carries.
        obs = dataclasses.replace(
            obs,
            input_tokens=item.input_tokens or obs.input_tokens,
            output_tokens=item.output_tokens or obs.output_tokens,
        )
        return obs.report(
            target=item.target,
            permit=item.permit,
            key_slot=item.key_slot,
            attempt=max(0, item.attempt - 1),
            latency=latency,
            caller=self.worker_id,
        )

    def _nack_delay(self, result: Optional[OutcomeResult]) -> float:
        if result is not None and result.retry.retry:
            return max(result.retry.delay, 0.0)
        return self.retry_delay

    def _blocked_sleep(self, res: ClaimResult, elapsed: float) -> float:
        """How long to wait before the next Claim when none was returned."""
        # The server long-polls (also while blocked, re-checking at retry_after);
        # sleep only for whatever part of the wait it did not spend.
        if res.blocked_reason is not None:
            want = min(max(res.retry_after or self.error_backoff, 0.01), max(self.wait, 0.05))
        else:
            want = min(self.wait, 0.25)
        return max(0.0, want - elapsed)


class DeferredWorker(_WorkerBase):
    """Drains ``queue`` with ``handler(item)`` on the calling thread (:meth:`run`)
    or a background thread (:meth:`start` / :meth:`stop`).

    ``handler`` receives a :class:`DeferredItem` (``item.target`` is the model
    to call, ``item.json()`` the saved request); returning means done,
    raising means failed (classified like ``guard()``).
    """

    def __init__(
        self,
        client: Backstop,
        queue: str,
        handler: Callable[[DeferredItem], Any],
        *,
        max_items: int = 1,
        lease: float = 60.0,
        wait: float = 5.0,
        worker_id: Optional[str] = None,
        retry_delay: float = 1.0,
        error_backoff: float = 0.5,
        priority: PriorityArg = None,
    ) -> None:
        super().__init__(
            queue,
            max_items=max_items,
            lease=lease,
            wait=wait,
            worker_id=worker_id or client.caller,
            retry_delay=retry_delay,
            error_backoff=error_backoff,
            priority=priority,
        )
        self.client = client
        self.handler = handler
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: Any = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> DeferredWorker:
        """Runs :meth:`run` in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self.run, name=f"backstop-worker-{self.queue}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Stops after the item in hand (if any) is acked or nacked; an open long poll is cancelled."""
        self._stop.set()
        with self._lock:
            if self._pending is not None:
                self._pending.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _empty(self) -> bool:
        stats = self.client.queue_stats(self.queue)
        return all(q.depth == 0 and q.in_flight == 0 for q in stats if q.queue == self.queue)

    def _claim(self) -> Optional[ClaimResult]:
        rpc, future = self.client._claim_future(
            self.queue, self.max_items, self.lease, self.wait, self.worker_id, self.priority
        )
        with self._lock:
            self._pending = future
        try:
            if self._stop.is_set():
                future.cancel()
            response = future.result()
        except grpc.FutureCancelledError:
            return None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._stop.is_set():
                return None
            raise rpc_error(rpc.method, e) from e
        finally:
            with self._lock:
                self._pending = None
        result: ClaimResult = rpc.convert(response)
        return result

    def run(self, *, until_empty: bool = False, timeout: Optional[float] = None) -> WorkerStats:
        """Claims and processes items until :meth:`stop`, or with ``until_empty``
        until the queue has nothing waiting or in flight, or ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failing = False
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                if until_empty and self._empty():
                    break
                started = time.monotonic()
                res = self._claim()
                failing = False
            except ControlPlaneError as e:
                self.stats.errors += 1
                if not failing:
                    log.warning("deferred worker for %s: %s; retrying", self.queue, e)
                failing = True
                self._stop.wait(self.error_backoff)
                continue
            if res is None:
                break
            for item in res.items:
                self.stats.claimed += 1
                self._process(item)
            if not res.items:
                self._stop.wait(self._blocked_sleep(res, time.monotonic() - started))
        return self.stats

    def _process(self, item: DeferredItem) -> None:
        started = time.monotonic()
        value: Any = None
        error: Optional[BaseException] = None
        try:
            value = self.handler(item)
        except BaseException as e:  # reported and nacked; non-Exceptions re-raised below
            error = e
        report = self._report(item, error, value, time.monotonic() - started)
        result: Optional[OutcomeResult] = None
        if item.target:
            try:
                result = self.client._record(report)
            except ControlPlaneError as e:
                log.error("deferred item %s: could not report the outcome: %s", item.id, e)
        try:
            if error is None:
                self.client.ack(item)
                self.stats.acked += 1
            else:
                delay = 0.0 if not isinstance(error, Exception) else self._nack_delay(result)
                nack = self.client.nack(item, delay=delay, reason=describe(error)[:1024])
                self.stats.nacked += 1
                if nack.dead_lettered:
                    self.stats.dead_lettered += 1
        except ControlPlaneError as e:
            self.stats.errors += 1
            log.warning("deferred item %s: %s; it will be redelivered when its lease expires", item.id, e)
        if error is not None and not isinstance(error, Exception):
            raise error


class AsyncDeferredWorker(_WorkerBase):
    """The asyncio version of :class:`DeferredWorker`; ``handler`` may be a coroutine function."""

    def __init__(
        self,
        client: AsyncBackstop,
        queue: str,
        handler: Callable[[DeferredItem], Any],
        *,
        max_items: int = 1,
        lease: float = 60.0,
        wait: float = 5.0,
        worker_id: Optional[str] = None,
        retry_delay: float = 1.0,
        error_backoff: float = 0.5,
        priority: PriorityArg = None,
    ) -> None:
        super().__init__(
            queue,
            max_items=max_items,
            lease=lease,
            wait=wait,
            worker_id=worker_id or client.caller,
            retry_delay=retry_delay,
            error_backoff=error_backoff,
            priority=priority,
        )
        self.client = client
        self.handler = handler
        self._stop: Optional[asyncio.Event] = None
        self._claiming: Optional[asyncio.Task[ClaimResult]] = None

    def _event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    def stop(self) -> None:
        """Stops after the item in hand; an open long poll is cancelled."""
        self._event().set()
        if self._claiming is not None:
            self._claiming.cancel()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._event().wait(), timeout=max(seconds, 0.0))
        except asyncio.TimeoutError:
            pass

    async def _empty(self) -> bool:
        stats = await self.client.queue_stats(self.queue)
        return all(q.depth == 0 and q.in_flight == 0 for q in stats if q.queue == self.queue)

    async def run(self, *, until_empty: bool = False, timeout: Optional[float] = None) -> WorkerStats:
        stop = self._event()
        deadline = None if timeout is None else time.monotonic() + timeout
        failing = False
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                if until_empty and await self._empty():
                    break
                started = time.monotonic()
                self._claiming = asyncio.ensure_future(
                    self.client.claim(
                        self.queue,
                        max_items=self.max_items,
                        lease=self.lease,
                        wait=self.wait,
                        worker=self.worker_id,
                        priority=self.priority,
                    )
                )
                try:
                    res = await self._claiming
                except asyncio.CancelledError:
                    if stop.is_set():
                        break
                    raise
                finally:
                    self._claiming = None
                failing = False
            except ControlPlaneError as e:
                self.stats.errors += 1
                if not failing:
                    log.warning("deferred worker for %s: %s; retrying", self.queue, e)
                failing = True
                await self._sleep(self.error_backoff)
                continue
            for item in res.items:
                self.stats.claimed += 1
                await self._process(item)
            if not res.items:
                await self._sleep(self._blocked_sleep(res, time.monotonic() - started))
        return self.stats

    async def _process(self, item: DeferredItem) -> None:
        started = time.monotonic()
        value: Any = None
        error: Optional[BaseException] = None
        try:
            value = self.handler(item)
            if inspect.isawaitable(value):
                value = await value
        except BaseException as e:  # reported and nacked; non-Exceptions re-raised below
            error = e
        report = self._report(item, error, value, time.monotonic() - started)
        result: Optional[OutcomeResult] = None
        if item.target:
            try:
                result = await self.client._record(report)
            except ControlPlaneError as e:
                log.error("deferred item %s: could not report the outcome: %s", item.id, e)
        try:
            if error is None:
                await self.client.ack(item)
                self.stats.acked += 1
            else:
                delay = 0.0 if not isinstance(error, Exception) else self._nack_delay(result)
                nack = await self.client.nack(item, delay=delay, reason=describe(error)[:1024])
                self.stats.nacked += 1
                if nack.dead_lettered:
                    self.stats.dead_lettered += 1
        except ControlPlaneError as e:
            self.stats.errors += 1
            log.warning("deferred item %s: %s; it will be redelivered when its lease expires", item.id, e)
        if error is not None and not isinstance(error, Exception):
            raise error
