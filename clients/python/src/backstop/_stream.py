"""Every decision of a client over one ``Decide`` stream per replica.

CanProceed, RecordOutcome and Route are the same requests as the unary calls,
sent as items of one long-lived bidirectional stream (``Resilience/Decide``):
each item carries an id the client allocates, each answer echoes it, and
answers may come out of order. Far cheaper for the server than a new HTTP/2
stream per decision.

What a caller sees is what the unary call would give:

* the answer, or the item's error (INVALID_ARGUMENT, NOT_FOUND...) as the
  same :class:`ControlPlaneError` the unary call raises;
* no answer within the item's deadline (the client's ``timeout``):
  :class:`ControlPlaneUnavailable` DEADLINE_EXCEEDED, so the client moves on
  to the next replica or its fail-safe exactly as after a unary timeout;
* the stream broke (the server was killed, or drains): the items in flight
  fail UNAVAILABLE, like a unary call to a server that went away, and the next
  decision opens a new stream. Resent on a new stream, within the item's
  deadline, are only: an item the stream never took (the server cannot have
  seen it); a RecordOutcome (the server settles a permit once); and, on an
  address that is a name for several servers, any item, as gRPC's own retry
  of the unary call on such a channel does (see ``_transport._SERVICE_CONFIG``).
  CanProceed and Route to one server are never asked twice.
* a server without ``Decide`` (an older one: UNIMPLEMENTED): the items are sent
  as unary calls, and so is every later decision on that replica.

A stream that answers nothing for a whole item deadline is replaced (a wedged
stream must not hold every later decision); on a name for several servers a
stream is also replaced every :data:`ROTATE_AFTER` items, so decisions still
spread over them. At most
:data:`MAX_OUTSTANDING` items are outstanding per stream (the server's limit);
past that a decision is sent as a unary call.

:class:`DecideStream` is the blocking client's (a reader thread per stream;
callers wait on a lock per item), :class:`AsyncDecideStream` the asyncio
client's (a reader and a writer task; callers await a future).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import grpc

from . import _convert as conv
from ._proto import resilience_pb2
from ._transport import OUTAGE_CODES
from .errors import ControlPlaneError, ControlPlaneUnavailable, control_plane_error

log = logging.getLogger("backstop")

#: The decisions that go over the stream: unary method name -> DecideRequest field.
DECIDE_FIELDS: Dict[str, str] = {
    "CanProceed": "can_proceed",
    "RecordOutcome": "record_outcome",
    "Route": "route",
}

#: Most items one stream may have outstanding (the server's MAX_OUTSTANDING).
MAX_OUTSTANDING = 1024

#: On an address that names several servers (``dns:///...``), a stream is
#: replaced (half-closed once its answers are in) after this many items, so
#: that gRPC's round_robin spreads one client's decisions over the servers
#: as it does unary calls, rather than pinning them all to one.
ROTATE_AFTER = 64

#: Returned instead of an answer: send this decision as a unary call instead
#: (the server has no Decide, the stream is full, or the client is closing).
USE_UNARY = object()

_CODES: Dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

_OFF = frozenset({"0", "false", "no", "off"})


def stream_enabled(flag: Optional[bool]) -> bool:
    """Whether decisions go over the Decide stream: the ``stream`` argument when
    given, else the environment (``BACKSTOP_STREAM=0`` turns it off), else on."""
    if flag is not None:
        return bool(flag)
    return os.environ.get("BACKSTOP_STREAM", "").strip().lower() not in _OFF


def resends_allowed(method: str, several_servers: bool) -> int:
    """How often an item that the stream had taken may be sent again on a new
    stream after the stream broke (see the module docstring)."""
    if several_servers:
        return 2  # gRPC's retryPolicy on such channels: maxAttempts 3
    return 1 if method == "RecordOutcome" else 0


class _Broken:
    """Why a stream failed an item it had not answered."""

    __slots__ = ("code", "details", "sent", "unsupported")

    def __init__(self, code: grpc.StatusCode, details: str, sent: bool, unsupported: bool) -> None:
        self.code = code
        self.details = details
        self.sent = sent
        self.unsupported = unsupported


#: Stream-level statuses that mean "the stream broke" for the items in flight.
#: The server answers an item's own failure as an item; the stream itself ends
#: OK (drained), or the connection breaks: UNAVAILABLE, or INTERNAL / UNKNOWN
#: (grpc.aio reports a write that raced the connection's end as INTERNAL
#: "Internal error from Core"); CANCELLED is the client replacing or closing it.
_BROKEN_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def _failure(err: Optional[BaseException]) -> Tuple[grpc.StatusCode, str]:
    """The status a broken stream gives its items: UNAVAILABLE for a stream that
    ended or broke, the stream's own status otherwise (e.g. UNIMPLEMENTED from
    an older server, UNAUTHENTICATED from a proxy)."""
    if err is None:
        return grpc.StatusCode.UNAVAILABLE, "the Decide stream ended"
    code, details = _status(err)
    if code is None or code in _BROKEN_CODES:
        return grpc.StatusCode.UNAVAILABLE, f"the Decide stream broke ({getattr(code, 'name', code)}: {details})"
    return code, details or ""


def _status(err: BaseException) -> Tuple[Any, str]:
    """(code, details) of an RPC error; (UNKNOWN, repr) of anything else."""
    code: Any = getattr(err, "code", None)
    details: Any = getattr(err, "details", None)
    return (
        code() if callable(code) else grpc.StatusCode.UNKNOWN,
        str(details() or "") if callable(details) else repr(err),
    )


def _masked(err: Optional[BaseException]) -> bool:
    """grpc.aio's INTERNAL for a write that raced the call's end (see
    :meth:`AsyncDecideStream._probe`)."""
    return err is not None and _status(err) == (grpc.StatusCode.INTERNAL, "Internal error from Core")


def _answer(method: str, response: Any) -> Any:
    """The unary-shaped answer of an item, or its error raised as the unary
    call would raise it. USE_UNARY when the server turned the item away only
    because the stream was full."""
    kind = response.WhichOneof("response")
    if kind == "error":
        code = _CODES.get(response.error.code, grpc.StatusCode.UNKNOWN)
        details = response.error.message
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "outstanding" in details:
            return USE_UNARY
        raise control_plane_error(code, details, method, OUTAGE_CODES)
    if kind is None:
        raise ControlPlaneError(grpc.StatusCode.INTERNAL, "a Decide answer without a response", method)
    return getattr(response, kind)


def _broken_error(method: str, b: _Broken) -> ControlPlaneError:
    return control_plane_error(b.code, b.details, method, OUTAGE_CODES)


def _timed_out(method: str, timeout: float) -> ControlPlaneUnavailable:
    return ControlPlaneUnavailable(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer on the Decide stream within {timeout:.3g}s", method
    )


class _Base:
    """What both streams share: the request building and the resend rules."""

    def __init__(self, target: str, several_servers: bool, timeout: float) -> None:
        self.target = target
        self.several_servers = several_servers
        #: Set once the server answered the stream UNIMPLEMENTED: unary calls from then on.
        self.unsupported = False
        self._closed = False
        self._ids = 0
        self._deadline = conv.duration(timeout)

    def _request(self, rpc: Any) -> Any:
        req = resilience_pb2.DecideRequest(deadline=self._deadline)
        getattr(req, DECIDE_FIELDS[rpc.method]).CopyFrom(rpc.request)
        return req

    def _note_unsupported(self) -> None:
        if not self.unsupported:
            self.unsupported = True
            log.info("Backstop at %s has no Decide stream (an older server); sending decisions as unary calls", self.target)

    def _after_break(self, rpc: Any, b: _Broken, fresh: int, resent: int) -> Tuple[int, int]:
        """The resend counters after a broken stream failed an item; raises when
        the item is not to be sent again."""
        if b.unsupported:
            return fresh, resent  # the caller sees USE_UNARY on its next turn
        if b.code == grpc.StatusCode.UNAVAILABLE:
            if not b.sent and fresh < 1:
                return fresh + 1, resent
            if b.sent and resent < resends_allowed(rpc.method, self.several_servers):
                return fresh, resent + 1
        raise _broken_error(rpc.method, b)


# --- the blocking client's stream -----------------------------------------------------


class _Item:
    __slots__ = ("request", "done", "response", "broken", "sent", "queued_at")

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done = threading.Lock()
        self.done.acquire()
        self.response: Any = None
        self.broken: Optional[_Broken] = None
        self.sent = False
        self.queued_at = 0.0


class _Generation:
    """One Decide call: its send queue, the items waiting for an answer, its reader."""

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[Optional[_Item]]" = queue.SimpleQueue()
        self.pending: Dict[int, _Item] = {}
        self.call: Any = None
        self.answered_at = time.monotonic()
        self.reader: Optional[threading.Thread] = None
        self.items = 0

    def requests(self) -> Iterator[Any]:
        """The request iterator gRPC's sender thread consumes; ends (half-closing
        the stream) on None."""
        while True:
            item = self.queue.get()
            if item is None:
                return
            item.sent = True
            yield item.request


class DecideStream(_Base):
    """The blocking client's Decide stream to one replica (opened on first use,
    reopened after it breaks). Thread-safe."""

    def __init__(self, open_call: Callable[[Iterator[Any]], Any], target: str, several_servers: bool, timeout: float) -> None:
        super().__init__(target, several_servers, timeout)
        self._open_call = open_call
        self._lock = threading.Lock()
        self._gen: Optional[_Generation] = None

    def call(self, rpc: Any) -> Any:
        """The answer to ``rpc`` (CanProceed, RecordOutcome or Route) over the
        stream, within ``rpc.timeout``; USE_UNARY to send it as a unary call."""
        deadline = time.monotonic() + rpc.timeout
        fresh = resent = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(rpc.method, rpc.timeout)
            got = self._once(rpc, remaining)
            if not isinstance(got, _Broken):
                return got
            fresh, resent = self._after_break(rpc, got, fresh, resent)

    def _once(self, rpc: Any, timeout: float) -> Any:
        item = _Item(self._request(rpc))
        with self._lock:
            if self._closed or self.unsupported:
                return USE_UNARY
            gen = self._gen
            if gen is None:
                gen = self._start()
            if len(gen.pending) >= MAX_OUTSTANDING:
                return USE_UNARY
            self._ids += 1
            item.request.id = self._ids
            item.queued_at = time.monotonic()
            gen.pending[self._ids] = item
            gen.queue.put(item)
            gen.items += 1
            if self.several_servers and gen.items >= ROTATE_AFTER:
                self._gen = None
                gen.queue.put(None)  # half-close: the server answers what it has, then ends it
        if not item.done.acquire(timeout=timeout):
            # Left in gen.pending: the server still counts it until it answers
            # (at the latest with DEADLINE_EXCEEDED, from the item's own deadline).
            self._expired(gen, item)
            raise _timed_out(rpc.method, rpc.timeout)
        if item.broken is not None:
            return USE_UNARY if item.broken.unsupported else item.broken
        return _answer(rpc.method, item.response)

    def _start(self) -> _Generation:
        """Opens a new Decide call (under the lock)."""
        gen = _Generation()
        gen.call = self._open_call(gen.requests())
        gen.reader = threading.Thread(target=self._read, args=(gen,), name="backstop-decide", daemon=True)
        self._gen = gen
        gen.reader.start()
        return gen

    def _read(self, gen: _Generation) -> None:
        err: Optional[BaseException] = None
        try:
            for response in gen.call:
                gen.answered_at = time.monotonic()
                with self._lock:
                    item = gen.pending.pop(response.id, None)
                if item is not None:
                    item.response = response
                    item.done.release()
        except grpc.RpcError as e:
            err = e
        except Exception as e:  # e.g. an answer that does not parse: the stream is unusable
            log.debug("Backstop Decide stream to %s failed: %r", self.target, e)
            err = e
        self._died(gen, err)

    def _died(self, gen: _Generation, err: Optional[BaseException]) -> None:
        code, details = _failure(err)
        unsupported = code == grpc.StatusCode.UNIMPLEMENTED
        if unsupported:
            self._note_unsupported()
        with self._lock:
            if self._gen is gen:
                self._gen = None
            items = list(gen.pending.values())
            gen.pending.clear()
        gen.queue.put(None)  # ends gRPC's sender thread, which may wait on the queue
        if items:
            log.debug("Backstop Decide stream to %s ended with %d item(s) in flight: %s %s", self.target, len(items), code, details)
        for item in items:
            item.broken = _Broken(code, details, item.sent, unsupported)
            item.done.release()

    def _expired(self, gen: _Generation, item: _Item) -> None:
        """An item went unanswered for its whole deadline; if the stream answered
        nothing meanwhile it is presumed wedged and replaced."""
        if gen.answered_at < item.queued_at and self._gen is gen:
            log.debug("Backstop Decide stream to %s answered nothing for a whole item deadline; opening a new one", self.target)
            with self._lock:
                if self._gen is gen:
                    self._gen = None
            gen.call.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            gen, self._gen = self._gen, None
        if gen is not None:
            gen.queue.put(None)
            gen.call.cancel()
            if gen.reader is not None and gen.reader is not threading.current_thread():
                gen.reader.join(timeout=2)


# --- the asyncio client's stream ---------------------------------------------------------

_EXPIRED = object()


class _AsyncItem:
    __slots__ = ("request", "future", "sent", "queued_at")

    def __init__(self, request: Any, future: "asyncio.Future[Any]") -> None:
        self.request = request
        self.future = future
        self.sent = False
        self.queued_at = 0.0


class _AsyncGeneration:
    def __init__(self) -> None:
        self.queue: "asyncio.Queue[Optional[_AsyncItem]]" = asyncio.Queue()
        self.pending: Dict[int, _AsyncItem] = {}
        self.call: Any = None
        self.answered_at = time.monotonic()
        self.tasks: Tuple["asyncio.Task[None]", ...] = ()
        self.items = 0


def _settle(future: "asyncio.Future[Any]", value: Any) -> None:
    if not future.done():
        future.set_result(value)


class AsyncDecideStream(_Base):
    """The asyncio client's Decide stream to one replica; used from one event loop."""

    def __init__(self, open_call: Callable[[], Any], target: str, several_servers: bool, timeout: float) -> None:
        super().__init__(target, several_servers, timeout)
        self._open_call = open_call
        self._gen: Optional[_AsyncGeneration] = None
        #: Every generation whose tasks still run (a replaced one finishes its answers).
        self._live: Set[_AsyncGeneration] = set()
        self._timeout = timeout
        #: Set once the server answered an item: it has Decide.
        self._confirmed = False

    async def call(self, rpc: Any) -> Any:
        """See :meth:`DecideStream.call`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rpc.timeout
        fresh = resent = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _timed_out(rpc.method, rpc.timeout)
            got = await self._once(loop, rpc, remaining)
            if not isinstance(got, _Broken):
                return got
            fresh, resent = self._after_break(rpc, got, fresh, resent)

    async def _once(self, loop: asyncio.AbstractEventLoop, rpc: Any, timeout: float) -> Any:
        if self._closed or self.unsupported:
            return USE_UNARY
        gen = self._gen
        if gen is None:
            gen = self._start(loop)
        if len(gen.pending) >= MAX_OUTSTANDING:
            return USE_UNARY
        self._ids += 1
        item = _AsyncItem(self._request(rpc), loop.create_future())
        item.request.id = self._ids
        item.queued_at = time.monotonic()
        gen.pending[self._ids] = item
        gen.queue.put_nowait(item)
        gen.items += 1
        if self.several_servers and gen.items >= ROTATE_AFTER:
            self._gen = None
            gen.queue.put_nowait(None)  # half-close (see DecideStream._once)
        timer = loop.call_later(timeout, _settle, item.future, _EXPIRED)
        try:
            got = await item.future
        finally:
            timer.cancel()
        if got is _EXPIRED:
            self._expired(gen, item)
            raise _timed_out(rpc.method, rpc.timeout)
        if isinstance(got, _Broken):
            return USE_UNARY if got.unsupported else got
        return _answer(rpc.method, got)

    def _start(self, loop: asyncio.AbstractEventLoop) -> _AsyncGeneration:
        gen = _AsyncGeneration()
        gen.call = self._open_call()
        gen.tasks = (loop.create_task(self._write(gen)), loop.create_task(self._read(gen)))
        self._gen = gen
        self._live.add(gen)
        return gen

    async def _write(self, gen: _AsyncGeneration) -> None:
        try:
            while True:
                item = await gen.queue.get()
                if item is None:
                    await gen.call.done_writing()
                    return
                item.sent = True
                await gen.call.write(item.request)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the call ended; the reader fails what is in flight
            log.debug("Backstop Decide stream to %s: write failed: %r", self.target, e)

    async def _read(self, gen: _AsyncGeneration) -> None:
        err: Optional[BaseException] = None
        try:
            while True:
                response = await gen.call.read()
                if response is grpc.aio.EOF:
                    break
                gen.answered_at = time.monotonic()
                self._confirmed = True
                item = gen.pending.pop(response.id, None)
                if item is not None:
                    _settle(item.future, response)
        except asyncio.CancelledError:
            self._died(gen, asyncio.CancelledError())
            raise
        except grpc.RpcError as e:
            err = e
        except Exception as e:
            log.debug("Backstop Decide stream to %s failed: %r", self.target, e)
            err = e
        if err is not None and not self._confirmed and _masked(err):
            err = await self._probe(err)
        self._died(gen, err)

    async def _probe(self, err: BaseException) -> BaseException:
        """The status an INTERNAL "Internal error from Core" hides. grpc.aio reports
        a write that raced the end of the call that way and drops the call's real
        status, so an older server's UNIMPLEMENTED would pass for a broken stream
        (and every decision for an outage). A stream with no items cannot race:
        open one, half-close it at once, and read how it ends."""
        try:
            probe = self._open_call()
            try:
                await asyncio.wait_for(self._drain(probe), self._timeout)
            finally:
                probe.cancel()
        except grpc.RpcError as e:
            if _status(e)[0] == grpc.StatusCode.UNIMPLEMENTED:
                unimplemented: BaseException = e
                return unimplemented
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. the probe timed out: the stream just broke
            log.debug("Backstop Decide probe of %s: %r", self.target, e)
        return err

    @staticmethod
    async def _drain(call: Any) -> None:
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    def _died(self, gen: _AsyncGeneration, err: Optional[BaseException]) -> None:
        code, details = _failure(err)
        unsupported = code == grpc.StatusCode.UNIMPLEMENTED
        if unsupported:
            self._note_unsupported()
        if self._gen is gen:
            self._gen = None
        self._live.discard(gen)
        items = list(gen.pending.values())
        gen.pending.clear()
        gen.queue.put_nowait(None)
        if items:
            log.debug("Backstop Decide stream to %s ended with %d item(s) in flight: %s %s", self.target, len(items), code, details)
        for item in items:
            _settle(item.future, _Broken(code, details, item.sent, unsupported))
        if not gen.call.done():
            gen.call.cancel()

    def _expired(self, gen: _AsyncGeneration, item: _AsyncItem) -> None:
        if gen.answered_at < item.queued_at and self._gen is gen:
            log.debug("Backstop Decide stream to %s answered nothing for a whole item deadline; opening a new one", self.target)
            self._gen = None
            gen.call.cancel()

    async def close(self) -> None:
        self._closed = True
        self._gen = None
        gens, self._live = list(self._live), set()
        tasks = [t for gen in gens for t in gen.tasks]
        for gen in gens:
            gen.call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
