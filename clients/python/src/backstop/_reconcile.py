"""Reconciliation: what the fail-safe decided, reported once Backstop is back.

While Backstop is unreachable the client decides alone, and the fleet's
counters, failure-rate windows and dashboards miss those calls. So every
outcome decided locally is remembered here (bounded) and sent with
RecordOutcomeBatch once the server answers again, oldest first.

What is sent is what is still true when it arrives:

* **Permits.** A local permit means nothing to the server and is removed
  (the report is then a permitless one: counted, never imposing a pause or an
  immediate open on its own). A server permit issued before the outage is
  passed back verbatim: the server settles each permit once, so a report whose
  RecordOutcome did arrive before its deadline ran out is answered as a
  duplicate instead of being counted twice, and a live one still releases the
  slot and the reservation it holds.
* **Headers.** Every header the server reads (``retry-after``, the rate-limit
  headers) describes the moment of the call; replayed later it would pause the
  fleet for a limit that has passed. None are sent.
* **Rate limits.** A 429 with a retry hint paused the target locally instead of
  counting as a failure. It is sent with the part of the pause still to run
  (at least 1 ms), so a server that trusts permitless reports treats it the same
  way rather than as a breaker failure.
* **Token usage** is sent only with a server permit (which settles its own
  reservation); without one it would be charged to today's budget for calls
  made during the outage.

This module is the bookkeeping only (thread-safe, no I/O): the clients send
the batches it hands out, from a background thread or task, so no caller ever
waits for reconciliation.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional, Sequence

from ._local import LOCAL_PERMIT_PREFIX, retry_hint
from .types import OutcomeClass, OutcomeReport, OutcomeResult, ReconcileStats

log = logging.getLogger("backstop")

#: The server's bound on RecordOutcomeBatch items.
MAX_BATCH = 1000
#: How many locally decided outcomes are kept by default (oldest dropped first).
DEFAULT_LIMIT = 1000
#: Failed attempts to send an outcome (Backstop unreachable again) before it is dropped.
MAX_ATTEMPTS = 5
#: The smallest pause sent for a rate limit whose local pause is already over.
_MIN_PAUSE = 0.001


@dataclasses.dataclass
class _Pending:
    report: OutcomeReport
    #: Clock time the local pause of a hinted 429 ends (None: not a paused rate limit).
    paused_until: Optional[float]
    attempts: int = 0


def reconciled(report: OutcomeReport, paused_until: Optional[float], now: float) -> OutcomeReport:
    """The report as it is sent after the outage (see the module docs)."""
    permit = "" if report.permit.startswith(LOCAL_PERMIT_PREFIX) else report.permit
    retry_after = max(paused_until - now, _MIN_PAUSE) if paused_until is not None else None
    return dataclasses.replace(
        report,
        permit=permit,
        headers={},
        retry_after=retry_after,
        input_tokens=report.input_tokens if permit else 0,
        output_tokens=report.output_tokens if permit else 0,
    )


class Reconciler:
    """Locally decided outcomes waiting for Backstop, and the state of sending them.

    One sender at a time holds the *flushing* role (:meth:`begin`), takes
    batches from the head (:meth:`next_batch`) and settles each
    (:meth:`delivered`, :meth:`refused`, :meth:`failed`); :meth:`next_batch`
    gives the role up atomically when nothing is left, so an outcome added at
    any moment is either picked up by the running sender or starts a new one
    (:meth:`add` returns True).

    :param limit: how many outcomes are kept; beyond it the oldest are dropped
        (and counted). 0 turns reconciliation off.
    :param max_attempts: failed sends after which an outcome is dropped.
    """

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 0:
            raise ValueError("reconcile_limit must be >= 0 (0 turns reconciliation off)")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.limit = limit
        self.max_attempts = max_attempts
        self._clock = clock
        self._lock = threading.Lock()
        self._items: Deque[_Pending] = deque()
        self._flushing = False
        #: Length of the head of _items that the current batch covers.
        self._inflight = 0
        #: Items of the current batch evicted by the bound while it was on the wire.
        self._evicted_inflight = 0
        self._warned_full = False
        self._reported = 0
        self._rejected = 0
        self._dropped = 0
        # Since the last summary line.
        self._round_reported = 0
        self._round_rejected = 0
        self._round_dropped = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def stats(self) -> ReconcileStats:
        with self._lock:
            return ReconcileStats(
                pending=len(self._items), reported=self._reported, rejected=self._rejected, dropped=self._dropped
            )

    # --- recording ---------------------------------------------------------------

    def add(self, report: OutcomeReport, result: OutcomeResult) -> bool:
        """Remembers an outcome the fail-safe decided. True when no sender is
        running, i.e. the caller should start one if Backstop is reachable."""
        if not self.enabled:
            return False
        now = self._clock()
        paused_until = None
        if result.classified_as == OutcomeClass.RATE_LIMITED:
            hint = retry_hint(report.headers, report.retry_after)
            if hint is not None:
                paused_until = now + hint
        with self._lock:
            self._items.append(_Pending(report, paused_until))
            evicted = 0
            while len(self._items) > self.limit:
                self._items.popleft()
                if self._inflight:
                    # On the wire right now: counted when its batch is settled.
                    self._inflight -= 1
                    self._evicted_inflight += 1
                else:
                    evicted += 1
            self._count_dropped(evicted)
            warn = evicted > 0 and not self._warned_full
            if warn:
                self._warned_full = True
            start = not self._flushing
        if warn:
            log.warning(
                "more than %d outcomes decided locally are waiting for Backstop; dropping the oldest "
                "(they will not be reported)",
                self.limit,
            )
        return start

    def _count_dropped(self, n: int) -> None:
        self._dropped += n
        self._round_dropped += n

    # --- sending -------------------------------------------------------------------

    def wants_flush(self) -> bool:
        """Outcomes are waiting and nobody is sending them."""
        with self._lock:
            return bool(self._items) and not self._flushing

    def begin(self) -> bool:
        """Takes the sender role; False when another sender has it or nothing waits."""
        with self._lock:
            if self._flushing or not self._items:
                return False
            self._flushing = True
            return True

    def next_batch(self) -> Optional[List[OutcomeReport]]:
        """The oldest outcomes (at most :data:`MAX_BATCH`), as they are to be sent;
        None when none are left, which also gives up the sender role."""
        with self._lock:
            if not self._items:
                self._flushing = False
                self._warned_full = False
                summary = (self._round_reported, self._round_rejected, self._round_dropped)
                self._round_reported = self._round_rejected = self._round_dropped = 0
                batch = None
            else:
                now = self._clock()
                pending = list(itertools.islice(self._items, MAX_BATCH))
                self._inflight = len(pending)
                self._evicted_inflight = 0
                return [reconciled(p.report, p.paused_until, now) for p in pending]
        reported, rejected, dropped = summary
        if rejected or dropped:
            log.warning(
                "reconciliation: reported %d outcome(s) decided locally during the outage; "
                "%d rejected by the server, %d dropped",
                reported,
                rejected,
                dropped,
            )
        elif reported:
            log.info("reconciliation: reported %d outcome(s) decided locally during the outage", reported)
        return batch

    def delivered(self, errors: Sequence[Optional[str]]) -> None:
        """The server answered the batch: ``errors`` has one entry per item
        (None = accepted, else the server's reason for refusing it)."""
        refused = [e for e in errors if e is not None]
        with self._lock:
            for _ in range(self._inflight):
                self._items.popleft()
            self._inflight = self._evicted_inflight = 0
            self._reported += len(errors) - len(refused)
            self._round_reported += len(errors) - len(refused)
            self._rejected += len(refused)
            self._round_rejected += len(refused)
        if refused:
            log.warning("Backstop refused %d locally decided outcome(s): %s", len(refused), refused[0])

    def refused(self, size: int, error: BaseException) -> None:
        """The server refused the whole batch (not an outage: it would refuse it again)."""
        self.delivered([str(error)] * size)

    def failed(self) -> None:
        """Backstop was unreachable: the batch stays, one attempt spent; outcomes
        out of attempts are dropped."""
        with self._lock:
            n = self._inflight
            lost = self._evicted_inflight
            for i in range(n):
                self._items[i].attempts += 1
            while n and self._items[0].attempts >= self.max_attempts:
                self._items.popleft()
                n -= 1
                lost += 1
            self._inflight = self._evicted_inflight = 0
            self._count_dropped(lost)
        if lost:
            log.warning(
                "dropped %d locally decided outcome(s) after %d failed attempts to report them",
                lost,
                self.max_attempts,
            )

    def end(self) -> None:
        """Gives up the sender role (a sender stopped early: closed or cancelled).
        The unsent batch stays at the head for the next sender."""
        with self._lock:
            self._flushing = False
            self._count_dropped(self._evicted_inflight)
            self._inflight = self._evicted_inflight = 0
