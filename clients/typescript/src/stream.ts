/**
 * Decisions over one bidirectional `Decide` stream per channel: every
 * CanProceed, RecordOutcome and Route of the process is an item with an id
 * this client allocates; answers (possibly out of order) settle the promise
 * waiting on that id. Far cheaper per decision than a unary call.
 *
 * - Each item has the caller's deadline locally (a missed one rejects with
 *   ControlPlaneUnavailable, exactly like a unary timeout, so the client's
 *   fail-safe takes over) and sends it as the item's server-side deadline.
 * - Item errors become the same ControlPlaneError / ControlPlaneUnavailable as
 *   the unary call's status would.
 * - The stream is opened on first use and reopened transparently: when it
 *   breaks, the items in flight on it reject with ControlPlaneUnavailable (like
 *   a unary UNAVAILABLE); when the server ends it cleanly (a drain) the items it
 *   never read are sent once more on a new stream. A stream that missed a
 *   deadline is retired (half-closed) and the next item opens a fresh one.
 * - A server without Decide (UNIMPLEMENTED) switches this channel to unary
 *   calls (the items in flight are re-sent as unary calls); `retryStream()`
 *   tries the stream again (the client calls it after a reconnect: the server
 *   may have been upgraded).
 * - An idle stream is half-closed after `idleMs`, so an idle process can exit.
 * - At most MAX_OUTSTANDING items per stream (the server's limit); more go as
 *   unary calls, and so does an item the server refuses with RESOURCE_EXHAUSTED.
 */
import * as grpc from '@grpc/grpc-js';
import { duration } from './convert.js';
import { ControlPlaneError, ControlPlaneUnavailable } from './errors.js';
import type {
  CanProceedRequest,
  CanProceedResponse,
  DecideRequest,
  DecideResponse,
  RecordOutcomeBatchRequest,
  RecordOutcomeBatchResponse,
  RecordOutcomeRequest,
  RecordOutcomeResponse,
  RouteRequest,
  RouteResponse,
} from './gen/backstop/v1/resilience.js';
import { type DecisionCallOptions, type DecisionTransport, type Transport, controlPlaneError } from './transport.js';

/** Most items one stream carries at once (the server's limit per stream). */
export const MAX_OUTSTANDING = 1024;

interface Requests {
  canProceed: CanProceedRequest;
  recordOutcome: RecordOutcomeRequest;
  route: RouteRequest;
}
interface Responses {
  canProceed: CanProceedResponse;
  recordOutcome: RecordOutcomeResponse;
  route: RouteResponse;
}
type Kind = keyof Requests;

const METHOD: Readonly<Record<Kind, string>> = { canProceed: 'CanProceed', recordOutcome: 'RecordOutcome', route: 'Route' };

/**
 * Stream-level statuses that mean "the server refused this call" rather than
 * "the stream broke": the items get the same error a unary call would.
 */
const REFUSALS: ReadonlySet<number> = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.NOT_FOUND,
  grpc.status.OUT_OF_RANGE,
]);

interface Item {
  readonly id: number;
  readonly kind: Kind;
  readonly req: Requests[Kind];
  /** performance.now() at which the local deadline passes. */
  readonly deadlineAt: number;
  readonly timeoutMs: number;
  readonly signal: AbortSignal | undefined;
  resolve(value: Responses[Kind]): void;
  reject(err: unknown): void;
  /** Sent once more after a clean end of its stream (never twice). */
  resent: boolean;
  stream: Stream | undefined;
  timer: NodeJS.Timeout | undefined;
  onAbort: (() => void) | undefined;
}

interface Stream {
  readonly call: grpc.ClientDuplexStream<DecideRequest, DecideResponse>;
  readonly pending: Map<number, Item>;
  /** No new items: half-closed (idle, or it missed a deadline). */
  retired: boolean;
  /** The status arrived. */
  ended: boolean;
  idleTimer: NodeJS.Timeout | undefined;
  killTimer: NodeJS.Timeout | undefined;
}

export interface StreamTransportOptions {
  /** Half-close a stream after this long without items (ms). */
  idleMs: number;
  /** Told once when the server has no Decide (an older server). */
  onUnimplemented?: ((details: string) => void) | undefined;
}

export class StreamTransport implements DecisionTransport {
  private readonly unary: Transport;
  private readonly idleMs: number;
  private readonly onUnimplemented: ((details: string) => void) | undefined;
  private current: Stream | undefined;
  private readonly live = new Set<Stream>();
  private nextId = 1;
  private fallback = false;
  private closed = false;

  constructor(unary: Transport, opts: StreamTransportOptions) {
    this.unary = unary;
    this.idleMs = opts.idleMs;
    this.onUnimplemented = opts.onUnimplemented;
  }

  /** True while decisions go over the stream; false after the server answered UNIMPLEMENTED. */
  get streaming(): boolean {
    return !this.fallback;
  }

  /** Forget an UNIMPLEMENTED answer: the next decision tries the stream again. */
  retryStream(): void {
    this.fallback = false;
  }

  canProceed(req: CanProceedRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<CanProceedResponse> {
    return this.decide('canProceed', req, timeoutMs, opts.signal);
  }

  recordOutcome(req: RecordOutcomeRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<RecordOutcomeResponse> {
    return this.decide('recordOutcome', req, timeoutMs, opts.signal);
  }

  route(req: RouteRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<RouteResponse> {
    return this.decide('route', req, timeoutMs, opts.signal);
  }

  /** Batches are unary (the stream has no batch item). */
  recordOutcomeBatch(req: RecordOutcomeBatchRequest, timeoutMs: number): Promise<RecordOutcomeBatchResponse> {
    return this.unary.recordOutcomeBatch(req, timeoutMs);
  }

  /** Cancels every stream; items in flight reject with ControlPlaneUnavailable. */
  close(): void {
    this.closed = true;
    this.current = undefined;
    for (const s of this.live) {
      s.retired = true;
      s.call.cancel();
    }
  }

  // --- items ------------------------------------------------------------------------------

  private decide<K extends Kind>(kind: K, req: Requests[K], timeoutMs: number, signal: AbortSignal | undefined): Promise<Responses[K]> {
    if (this.fallback || this.closed) return this.viaUnary(kind, req, timeoutMs, signal);
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<Responses[K]>((resolve, reject) => {
      const item: Item = {
        id: this.nextId++,
        kind,
        req,
        deadlineAt: performance.now() + timeoutMs,
        timeoutMs,
        signal,
        resolve: resolve as (v: Responses[Kind]) => void,
        reject,
        resent: false,
        stream: undefined,
        timer: undefined,
        onAbort: undefined,
      };
      this.enqueue(item);
    });
  }

  private viaUnary<K extends Kind>(kind: K, req: Requests[K], timeoutMs: number, signal: AbortSignal | undefined): Promise<Responses[K]> {
    const opts = { signal };
    switch (kind) {
      case 'canProceed':
        return this.unary.canProceed(req as CanProceedRequest, timeoutMs, opts) as Promise<Responses[K]>;
      case 'recordOutcome':
        return this.unary.recordOutcome(req as RecordOutcomeRequest, timeoutMs, opts) as Promise<Responses[K]>;
      default:
        return this.unary.route(req as RouteRequest, timeoutMs, opts) as Promise<Responses[K]>;
    }
  }

  /** Re-issues an item as a unary call within what is left of its deadline. */
  private redoUnary(item: Item): void {
    const left = item.deadlineAt - performance.now();
    if (left <= 0) {
      item.reject(missedDeadline(item));
      return;
    }
    this.viaUnary(item.kind, item.req, left, item.signal).then(item.resolve, item.reject);
  }

  /** Puts the item on the current stream (opening one if needed), with its timer and abort listener. */
  private enqueue(item: Item): void {
    const left = item.deadlineAt - performance.now();
    if (left <= 0) {
      item.reject(missedDeadline(item));
      return;
    }
    if (item.signal?.aborted) {
      item.reject(item.signal.reason);
      return;
    }
    if (this.fallback || this.closed) {
      this.redoUnary(item);
      return;
    }
    let s = this.current;
    if (s === undefined || s.retired || s.ended) s = this.open();
    if (s.pending.size >= MAX_OUTSTANDING) {
      this.redoUnary(item);
      return;
    }
    if (s.idleTimer) {
      clearTimeout(s.idleTimer);
      s.idleTimer = undefined;
    }
    item.stream = s;
    s.pending.set(item.id, item);
    item.timer = setTimeout(() => this.timedOut(item), left);
    if (item.signal) {
      const signal = item.signal;
      item.onAbort = () => {
        this.settle(item);
        item.reject(signal.reason);
      };
      signal.addEventListener('abort', item.onAbort, { once: true });
    }
    const msg: DecideRequest = {
      id: item.id,
      [item.kind]: item.req,
      // The server gives up on the item when the client has (whole milliseconds, at least 1).
      deadline: duration(Math.max(1, Math.ceil(left))),
      // Unset: the item's server span joins the stream's trace, if any.
      traceparent: '',
    } as DecideRequest;
    s.call.write(msg);
  }

  /** Takes the item off its stream (timer, abort listener); idles or finishes the stream if it was the last. */
  private settle(item: Item): void {
    if (item.timer) clearTimeout(item.timer);
    item.timer = undefined;
    if (item.onAbort) item.signal?.removeEventListener('abort', item.onAbort);
    item.onAbort = undefined;
    const s = item.stream;
    item.stream = undefined;
    if (!s || !s.pending.delete(item.id) || s.pending.size > 0 || s.ended) return;
    if (s.retired) this.armKill(s);
    else if (s === this.current) {
      s.idleTimer = setTimeout(() => this.retire(s), this.idleMs);
      s.idleTimer.unref();
    }
  }

  private timedOut(item: Item): void {
    const s = item.stream;
    item.timer = undefined;
    this.settle(item);
    item.reject(missedDeadline(item));
    // A stream that missed a deadline is suspect (a hung server, a dead
    // connection not yet noticed): new items go on a fresh one.
    if (s && !s.retired && !s.ended) this.retire(s);
  }

  // --- streams ----------------------------------------------------------------------------

  private open(): Stream {
    const call = this.unary.resilience.decide(this.unary.metadata());
    const s: Stream = { call, pending: new Map(), retired: false, ended: false, idleTimer: undefined, killTimer: undefined };
    this.current = s;
    this.live.add(s);
    call.on('data', (res: DecideResponse) => this.answer(s, res));
    // The status event carries the same information; without a listener an 'error' would throw.
    call.on('error', () => {});
    call.on('status', (st: grpc.StatusObject) => {
      s.ended = true;
      if (this.current === s) this.current = undefined;
      if (s.idleTimer) clearTimeout(s.idleTimer);
      if (s.killTimer) clearTimeout(s.killTimer);
      s.idleTimer = s.killTimer = undefined;
      // Answers already received but not yet delivered as 'data' come first.
      setImmediate(() => this.ended(s, st));
    });
    return s;
  }

  /** No new items on `s`: half-close it; the server answers what it read, then ends it. */
  private retire(s: Stream): void {
    if (s.retired || s.ended) return;
    s.retired = true;
    if (this.current === s) this.current = undefined;
    if (s.idleTimer) clearTimeout(s.idleTimer);
    s.idleTimer = undefined;
    s.call.end();
    if (s.pending.size === 0) this.armKill(s);
  }

  /** A retired stream with nothing pending that the server does not end within a second is cancelled. */
  private armKill(s: Stream): void {
    if (s.killTimer || s.ended) return;
    s.killTimer = setTimeout(() => s.call.cancel(), 1000);
    s.killTimer.unref();
  }

  private answer(s: Stream, res: DecideResponse): void {
    const item = s.pending.get(res.id);
    if (!item) return; // timed out or aborted meanwhile: nobody waits for it
    this.settle(item);
    const method = METHOD[item.kind];
    if (res.error !== undefined) {
      const { code, message } = res.error;
      // The stream is full (the server's limit is lower than ours): a unary call has no such limit.
      if (code === grpc.status.RESOURCE_EXHAUSTED) this.redoUnary(item);
      else item.reject(controlPlaneError(method, { code, details: message }));
      return;
    }
    const value = res[item.kind];
    if (value === undefined) {
      item.reject(new ControlPlaneError(method, grpc.status.INTERNAL, `the Decide answer to item ${res.id} carries no ${method} response`, 'INTERNAL'));
      return;
    }
    item.resolve(value);
  }

  private ended(s: Stream, st: grpc.StatusObject): void {
    this.live.delete(s);
    const items = [...s.pending.values()];
    for (const item of items) this.settle(item);
    if (st.code === grpc.status.UNIMPLEMENTED) {
      // An older server: unary calls on this channel from now on; the items in flight go that way too.
      if (!this.fallback && !this.closed) {
        this.fallback = true;
        this.onUnimplemented?.(st.details);
      }
      for (const item of items) this.redoUnary(item);
      return;
    }
    for (const item of items) {
      if (st.code === grpc.status.OK && !item.resent && !this.closed) {
        // A clean end (a drain, or after our half-close) before the server read
        // these: they were never decided, so a new stream may carry them.
        item.resent = true;
        this.enqueue(item);
      } else if (REFUSALS.has(st.code)) {
        item.reject(controlPlaneError(METHOD[item.kind], { code: st.code, details: st.details }));
      } else {
        const why = st.code === grpc.status.OK ? 'ended before answering' : `broke: ${grpc.status[st.code] ?? st.code}: ${st.details}`;
        item.reject(new ControlPlaneUnavailable(METHOD[item.kind], grpc.status.UNAVAILABLE, `the Decide stream ${why}`, 'UNAVAILABLE'));
      }
    }
  }
}

function missedDeadline(item: Item): ControlPlaneUnavailable {
  return new ControlPlaneUnavailable(
    METHOD[item.kind],
    grpc.status.DEADLINE_EXCEEDED,
    `no answer on the Decide stream within ${item.timeoutMs}ms`,
    'DEADLINE_EXCEEDED',
  );
}
