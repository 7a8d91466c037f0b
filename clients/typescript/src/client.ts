/**
 * The Backstop client: decisions with a local fail-safe, `guard()`, the
 * `call()` loop, the deferred queue, admin calls and the event stream.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type * as grpc from '@grpc/grpc-js';
import { contextTokensNeeded, describe, normalizeHeaders, observeError, observeSuccess, type Observed } from './classify.js';
import * as conv from './convert.js';
import {
  AllTargetsFailed,
  BackstopError,
  ControlPlaneError,
  ControlPlaneUnavailable,
  StructuredOutputError,
  refusal,
} from './errors.js';
import { type BackstopEvent, type WatchOptions, watchEvents } from './events.js';
import { LOCAL_PERMIT_PREFIX, LocalEngine, type LocalPolicy, type PendingReport, RouteMemory, localPolicy } from './local.js';
import { type Correction, type ReplyLike, type Schema, Structured, type StructuredOptions, isStructured } from './structured.js';
import { StreamTransport } from './stream.js';
import { type TlsOptions, Transport, type DecisionTransport } from './transport.js';
import type {
  Admission,
  AttemptError,
  BreakerMode,
  ClaimResult,
  Deferred,
  DeferredItemData,
  FinishResult,
  NackResult,
  OutcomeClass,
  OutcomeReport,
  OutcomeResult,
  Priority,
  QueueStat,
  RequestResult,
  RouteDecision,
  RouteStrategy,
  TargetStatus,
  TargetSummary,
} from './types.js';
import { DeferredWorker, type WorkerOptions } from './worker.js';

export type Policy = 'fail_open' | 'fail_closed';

/** Something with `warn` and `error` (console by default). */
export interface Logger {
  warn(message: string): void;
  error(message: string): void;
  debug?(message: string): void;
}

export interface BackstopOptions {
  /** Deadline of each decision call (CanProceed, RecordOutcome, Route), default 50 ms: a control plane slower than that counts as down. */
  timeoutMs?: number;
  /** While Backstop is unreachable: decide locally (`fail_open`, default) or refuse every call (`fail_closed`). */
  policy?: Policy;
  /** Settings of the local breaker and backoff (default: the server's defaults). */
  localPolicy?: Partial<LocalPolicy>;
  /** Candidate lists per route for local mode (routes seen in Route answers are learned too). */
  localRoutes?: Readonly<Record<string, readonly string[]>>;
  /** Agent id sent with every call (shows in events, e.g. who tripped a breaker). Default `hostname:pid`. */
  caller?: string;
  /** Bearer token sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Token for Admin calls when it differs from `token` (`[server] admin_token`). */
  adminToken?: string;
  /** TLS (PEM roots, optional client certificate and key). Default: plaintext. */
  tls?: TlsOptions;
  /** Ready-made grpc-js channel credentials (wins over `tls`). */
  credentials?: grpc.ChannelCredentials;
  channelOptions?: grpc.ChannelOptions;
  /** Deadline of deferred-queue and admin calls, default 5000 ms. */
  queueTimeoutMs?: number;
  /** How long the first call may wait for the connection, default 1000 ms. */
  connectTimeoutMs?: number;
  /** How often the background probe retries an unreachable Backstop, default 500 ms. */
  reconnectIntervalMs?: number;
  /** Report outcomes decided locally to the server once it is back (default true). */
  reconcile?: boolean;
  /**
   * Send every decision over one bidirectional Decide stream (default true,
   * unless the environment says `BACKSTOP_STREAM=0`); `false`: one unary call
   * per decision. A server without Decide is detected and answered with unary
   * calls either way.
   */
  stream?: boolean;
  /** Half-close the Decide stream after this long without decisions, so an idle process can exit (default 1000 ms). */
  streamIdleMs?: number;
  logger?: Logger;
}

/** What the provider function of `call()` is given for one attempt. */
export interface CallAttempt {
  readonly target: string;
  /** The target's configured max_tokens (0 = not configured). */
  readonly maxTokens: number;
  /** Which API key to use ('' when the target declares none). */
  readonly keySlot: string;
  /** 0 for the first try on this target. */
  readonly attempt: number;
  /** Admitted by the local fail-safe (Backstop unreachable). */
  readonly local: boolean;
  /** Aborts when the call's signal does: pass it to the provider SDK. */
  readonly signal: AbortSignal | undefined;
}

export type CallFn<T> = ((attempt: CallAttempt) => T | Promise<T>) | Structured<T, CallAttempt>;

export interface DeferOptions {
  /** The request to save: bytes, a string, or anything JSON-serializable. */
  payload: unknown;
  /** Queue (a route or target name); default the route's name. */
  queue?: string;
  metadata?: Readonly<Record<string, string | number | boolean>>;
  idempotencyKey?: string;
  maxAttempts?: number;
  notBefore?: Date;
}

export interface CallOptions {
  estimatedTokens?: number;
  requiredContextTokens?: number;
  /**
   * How urgent the call is (default `'default'`): budgets with a `reserve`
   * refuse lower priorities first (`priority_reserved`). Sent with every Route
   * and retry CanProceed.
   */
  priority?: Priority;
  /** The most output tokens the call may produce: reserved at the output price against spend limits. */
  maxOutputTokens?: number;
  /** Overrides the route's strategy for every Route of this call. */
  strategy?: RouteStrategy;
  /** Output tokens the `lowest_cost` strategy prices (0: the route's own setting). */
  expectedOutputTokens?: number;
  /** Targets not to try. */
  exclude?: readonly string[];
  /** Cancels the loop (also between retries) and is passed to the provider function. */
  signal?: AbortSignal;
  /** No retry wait is begun that would end later than this many ms after the start. */
  deadlineMs?: number;
  /**
   * The id of this user request (default: a fresh random one), sent on every
   * Route / CanProceed / RecordOutcome of the call so the server measures the
   * request end to end (`backstop_requests_total`, duration, attempts).
   */
  requestId?: string;
}

export interface GuardOptions {
  estimatedTokens?: number;
  attempt?: number;
  /** How urgent the call is (default `'default'`); see CallOptions.priority. */
  priority?: Priority;
  /** The most output tokens the call may produce: reserved at the output price against spend limits. */
  maxOutputTokens?: number;
  signal?: AbortSignal;
  /**
   * The user request this call serves. Without one the guard is a request of
   * its own (a success completes it, a refusal or failure fails it). One you
   * pass may span several guards (your retries): a success completes it, a
   * failure leaves it open for your next attempt or your `finishRequest()`.
   */
  requestId?: string;
}

type RouteArg = string | readonly string[];

/** The user request one `call()` serves, and what its attempts did. */
interface CallRequest {
  readonly id: string;
  attempts: number;
  completed: boolean;
  deferred: boolean;
}

/** A fresh id for one user request: 128 random bits as 32 hex digits. */
export function newRequestId(): string {
  return randomBytes(16).toString('hex');
}

const isLocalPermit = (permit: string): boolean => permit.startsWith(LOCAL_PERMIT_PREFIX);

function positiveMs(name: string, v: number | undefined, dflt: number): number {
  const value = v ?? dflt;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new TypeError(`${name} must be a positive number of milliseconds, got ${String(v)}`);
  }
  return value;
}

function nonNegInt(name: string, v: number | undefined): number {
  const value = v ?? 0;
  if (!Number.isInteger(value) || value < 0) throw new TypeError(`${name} must be an integer >= 0, got ${String(v)}`);
  return value;
}

/** Waits `ms`, rejecting with the signal's reason if it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function encodePayload(payload: unknown): Uint8Array {
  if (payload instanceof Uint8Array) return payload;
  if (typeof payload === 'string') return new TextEncoder().encode(payload);
  if (payload === undefined) throw new TypeError('defer.payload is required: the request to save for later');
  return new TextEncoder().encode(JSON.stringify(payload));
}

function defaultMessage(depth: number): string {
  const ahead = depth ? ` (${depth} request(s) waiting)` : '';
  return `All models are busy right now; your request is saved and will be processed shortly${ahead}.`;
}

/** Headers whose meaning is tied to the moment of the call: stale by the time a local outcome is reconciled. */
const TIME_BOUND_HEADERS = /^(retry-after|x-ratelimit|anthropic-ratelimit|ratelimit|x-should-retry)/;

/** The context `guard()` gives its block; after the block, `outcome` holds the server's answer. */
export class GuardContext {
  readonly target: string;
  readonly attempt: number;
  readonly admission: Admission;
  readonly signal: AbortSignal | undefined;
  /** The user request this call serves (sent on its CanProceed and RecordOutcome). */
  readonly requestId: string;
  /** What Backstop made of the outcome (set once the block has finished). */
  outcome: OutcomeResult | undefined;
  /** The report that was sent (set once the block has finished). */
  report: OutcomeReport | undefined;
  /** @internal */ usageSet: [number, number] | undefined;
  /** @internal */ headersSet: Record<string, string> | undefined;
  /** @internal */ override: Partial<Pick<OutcomeReport, 'outcome' | 'httpStatus' | 'errorType' | 'headers'>> | undefined;

  constructor(target: string, attempt: number, admission: Admission, signal: AbortSignal | undefined, requestId = '') {
    this.target = target;
    this.requestId = requestId;
    this.attempt = attempt;
    this.admission = admission;
    this.signal = signal;
  }

  /** The permit, opaque: it is passed back verbatim with the outcome. */
  get permit(): string {
    return this.admission.permit;
  }

  /** Which API key to use ('' when the target declares none). */
  get keySlot(): string {
    return this.admission.keySlot;
  }

  /** True when admitted by the local fail-safe (Backstop unreachable). */
  get local(): boolean {
    return this.admission.local;
  }

  /** Token usage of the call (settles the token budget); read from the block's return value when not given. */
  usage(inputTokens: number, outputTokens: number): void {
    this.usageSet = [Math.max(0, Math.floor(inputTokens)), Math.max(0, Math.floor(outputTokens))];
  }

  /** Headers of a successful response: their rate-limit fields let the server pause the fleet before a 429. */
  responseHeaders(headers: unknown): void {
    this.headersSet = normalizeHeaders(headers);
  }

  /** Overrides the automatic classification, e.g. `reportAs('partial')` for a reply judged unusable without throwing. */
  reportAs(outcome: OutcomeClass, fields: { httpStatus?: number; errorType?: string; headers?: unknown } = {}): void {
    this.override = {
      outcome,
      ...(fields.httpStatus !== undefined ? { httpStatus: fields.httpStatus } : {}),
      ...(fields.errorType !== undefined ? { errorType: fields.errorType } : {}),
      ...(fields.headers !== undefined ? { headers: normalizeHeaders(fields.headers) } : {}),
    };
  }
}

/**
 * A Backstop client. One per process, shared by every agent in it.
 *
 * ```ts
 * const bs = new Backstop('127.0.0.1:50051');
 * const reply = await bs.call('chat', ({ target, maxTokens }) => ask(target, maxTokens));
 * ```
 */
export class Backstop {
  readonly address: string;
  readonly caller: string;
  readonly policy: Policy;
  readonly timeoutMs: number;
  readonly queueTimeoutMs: number;
  readonly connectTimeoutMs: number;
  readonly reconnectIntervalMs: number;
  readonly local: LocalEngine;
  readonly routeMemory: RouteMemory;
  /** The generated gRPC clients on this client's channel, for calls the wrapper does not cover. */
  readonly stubs: Pick<Transport, 'resilience' | 'admin' | 'deferred' | 'events'>;
  private readonly transport: Transport;
  /** Where decisions go: the Decide stream (default) or unary calls. */
  private readonly decisions: DecisionTransport;
  private readonly stream: StreamTransport | undefined;
  private readonly log: Logger;
  private readonly reconcileEnabled: boolean;
  private remote = true;
  private downSince = 0;
  private connecting: Promise<void> | undefined;
  private prober: Promise<void> | undefined;
  private proberWake: (() => void) | undefined;
  private closed = false;

  constructor(address = '127.0.0.1:50051', opts: BackstopOptions = {}) {
    if (typeof address !== 'string' || !address) throw new TypeError('address must be "host:port" of the Backstop gRPC listener');
    const policy = opts.policy ?? 'fail_open';
    if (policy !== 'fail_open' && policy !== 'fail_closed') {
      throw new TypeError(`policy must be 'fail_open' or 'fail_closed', got ${JSON.stringify(policy)}`);
    }
    this.address = address;
    this.policy = policy;
    this.caller = opts.caller ?? `${hostname()}:${process.pid}`;
    this.timeoutMs = positiveMs('timeoutMs', opts.timeoutMs, 50);
    this.queueTimeoutMs = positiveMs('queueTimeoutMs', opts.queueTimeoutMs, 5000);
    this.connectTimeoutMs = positiveMs('connectTimeoutMs', opts.connectTimeoutMs, 1000);
    this.reconnectIntervalMs = positiveMs('reconnectIntervalMs', opts.reconnectIntervalMs, 500);
    this.reconcileEnabled = opts.reconcile ?? true;
    this.local = new LocalEngine(localPolicy(opts.localPolicy));
    this.routeMemory = new RouteMemory(opts.localRoutes);
    this.log = opts.logger ?? console;
    const useStream = opts.stream ?? streamFromEnv();
    if (typeof useStream !== 'boolean') throw new TypeError(`stream must be true or false, got ${String(useStream)}`);
    const streamIdleMs = positiveMs('streamIdleMs', opts.streamIdleMs, 1000);
    this.transport = new Transport(address, {
      token: opts.token,
      adminToken: opts.adminToken,
      tls: opts.tls,
      credentials: opts.credentials,
      channelOptions: opts.channelOptions,
      reconnectBackoffMs: Math.max(50, this.reconnectIntervalMs),
    });
    this.stream = useStream
      ? new StreamTransport(this.transport, {
          idleMs: streamIdleMs,
          onUnimplemented: (details) =>
            this.log.warn(
              `Backstop at ${this.address} does not implement the Decide stream (an older server: ${details}); ` +
                'decisions use unary calls on this channel',
            ),
        })
      : undefined;
    this.decisions = this.stream ?? this.transport;
    this.stubs = this.transport;
  }

  /** `'remote'` while Backstop answers; `'local'` while the fail-safe decides. */
  get mode(): 'remote' | 'local' {
    return this.remote ? 'remote' : 'local';
  }

  /**
   * True while decisions go over the Decide stream; false with `stream: false`
   * (or `BACKSTOP_STREAM=0`) and after an older server answered UNIMPLEMENTED.
   */
  get streaming(): boolean {
    return this.stream?.streaming ?? false;
  }

  /** Stops the recovery probe and closes the Decide stream and the channel. */
  close(): void {
    this.closed = true;
    this.proberWake?.();
    this.stream?.close();
    this.transport.close();
  }

  // --- the remote/local switch ----------------------------------------------------------

  private async useRemote(): Promise<boolean> {
    if (!this.remote) {
      this.ensureProber();
      return false;
    }
    this.connecting ??= this.transport.waitForReady(this.connectTimeoutMs).catch(() => {
      this.wentDown('connect', `not connected within ${this.connectTimeoutMs}ms`);
    });
    await this.connecting;
    return this.remote;
  }

  private wentDown(method: string, err: unknown): void {
    if (!this.remote || this.closed) return;
    this.remote = false;
    this.downSince = performance.now();
    const what = err instanceof Error ? err.message : String(err);
    this.log.warn(
      `Backstop at ${this.address} is unreachable (${what.startsWith(method) ? what : `${method}: ${what}`}); ` +
        `deciding locally (${this.policy}) and reconnecting in the background`,
    );
    this.ensureProber();
  }

  private ensureProber(): void {
    if (this.prober || this.closed || this.remote) return;
    this.prober = this.probe().finally(() => {
      this.prober = undefined;
    });
  }

  /** Background recovery: health-checks Backstop until it serves again, then reconciles. */
  private async probe(): Promise<void> {
    const probeTimeout = Math.max(1000, this.timeoutMs);
    while (!this.closed && !this.remote) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, this.reconnectIntervalMs);
        t.unref();
        this.proberWake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      if (this.closed) return;
      if (await this.transport.health(probeTimeout)) {
        // The server may have been upgraded meanwhile: try the Decide stream again.
        this.stream?.retryStream();
        this.remote = true;
        const down = ((performance.now() - this.downSince) / 1000).toFixed(1);
        this.log.warn(`Backstop at ${this.address} is reachable again after ${down}s; using the fleet's decisions`);
        if (this.reconcileEnabled) await this.reconcile();
      }
    }
  }

  /**
   * Reports outcomes decided locally while Backstop was unreachable, so the
   * fleet's counters and breakers learn what happened during the outage.
   * They go without permits (only the server issues permits), in order, in
   * batches. Headers tied to the moment of the call (retry-after, rate-limit
   * state) are dropped as stale, and so is token usage (charging it now would
   * spend today's budget on past calls); a rate limit whose pause is still
   * running is sent with the remaining pause, one whose pause is over as an
   * explicit RATE_LIMITED with a token 1 ms pause (a hint-less 429 would count
   * as a breaker failure, which it was not).
   */
  async reconcile(): Promise<number> {
    const pending = this.local.takePending();
    let sent = 0;
    const now = this.local.now();
    const toReport = (p: PendingReport): OutcomeReport => {
      const r = p.report;
      const headers = Object.fromEntries(Object.entries(r.headers).filter(([k]) => !TIME_BOUND_HEADERS.test(k)));
      const base: OutcomeReport = { ...r, permit: '', headers, inputTokens: 0, outputTokens: 0, retryAfterMs: undefined };
      if (p.pausedUntil !== undefined) {
        return { ...base, outcome: 'rate_limited', retryAfterMs: Math.max(1, p.pausedUntil - now) };
      }
      return base;
    };
    for (let i = 0; i < pending.length; i += 1000) {
      const chunk = pending.slice(i, i + 1000);
      try {
        const res = await this.decisions.recordOutcomeBatch(
          { items: chunk.map((p) => conv.recordRequest(toReport(p), false)) },
          this.queueTimeoutMs,
        );
        const rejected = res.items.filter((it) => it.error !== undefined);
        if (rejected.length) {
          this.log.warn(`reconciliation: the server rejected ${rejected.length} local outcome(s): ${rejected[0]?.error?.message ?? ''}`);
        }
        sent += chunk.length - rejected.length;
      } catch (e) {
        this.local.restorePending(pending.slice(i));
        this.log.warn(`reconciliation of ${pending.length - i} local outcome(s) failed (${String(e)}); will retry after the next reconnect`);
        if (e instanceof ControlPlaneUnavailable) this.wentDown('RecordOutcomeBatch', e);
        return sent;
      }
    }
    if (this.local.droppedPending) {
      this.log.warn(`reconciliation: ${this.local.droppedPending} older local outcome(s) were dropped (too many to keep)`);
      this.local.droppedPending = 0;
    }
    return sent;
  }

  /** A decision with the fail-safe: remote when possible, local otherwise. */
  private async decide<R>(method: string, rpc: () => Promise<R>, local: () => R): Promise<R> {
    if (await this.useRemote()) {
      try {
        return await rpc();
      } catch (e) {
        if (!(e instanceof ControlPlaneUnavailable)) throw e;
        this.wentDown(method, e);
      }
    }
    return local();
  }

  private localAdmit(target: string): Admission {
    if (this.policy === 'fail_closed') {
      return {
        target,
        allowed: false,
        reason: 'control_plane_unavailable',
        state: 'unspecified',
        retryAfterMs: this.reconnectIntervalMs,
        permit: '',
        keySlot: '',
        shadowReason: undefined,
        local: true,
      };
    }
    return this.local.admit(target);
  }

  private localRoute(
    name: string | undefined,
    candidates: readonly string[],
    exclude: readonly string[],
    strategy: RouteStrategy | undefined,
  ): RouteDecision {
    const cands = candidates.length ? candidates : this.routeMemory.candidates(name ?? '');
    if (this.policy === 'fail_closed') {
      return {
        ...this.local.route([], []),
        skipped: cands.map((t) => ({ target: t, reason: 'control_plane_unavailable', retryAfterMs: this.reconnectIntervalMs })),
        retryAfterMs: this.reconnectIntervalMs,
      };
    }
    return this.local.route(cands, exclude, strategy);
  }

  // --- decisions ----------------------------------------------------------------------------

  /**
   * May a call go to `target` now? (Does not throw on refusal; see `guard()`.)
   *
   * `priority`: budgets with a `reserve` refuse lower priorities first, with
   * reason `priority_reserved`. `maxOutputTokens`: the most output the call
   * may produce, reserved at the output price against spend limits (a refusal
   * says `spend_limit`, with `retryAfterMs`). The local fail-safe accepts both
   * and has nothing to apply them to.
   */
  async canProceed(
    target: string,
    opts: {
      estimatedTokens?: number;
      attempt?: number;
      priority?: Priority | undefined;
      maxOutputTokens?: number | undefined;
      signal?: AbortSignal | undefined;
      /** The user request this call serves (see `finishRequest()`). */
      requestId?: string | undefined;
    } = {},
  ): Promise<Admission> {
    const estimatedTokens = nonNegInt('estimatedTokens', opts.estimatedTokens);
    const attempt = nonNegInt('attempt', opts.attempt);
    const priority = conv.priorityToProto(opts.priority);
    const maxOutputTokens = nonNegInt('maxOutputTokens', opts.maxOutputTokens);
    const { signal } = opts;
    signal?.throwIfAborted();
    return this.decide(
      'CanProceed',
      async () => {
        const r = await this.decisions.canProceed(
          { target, caller: this.caller, estimatedTokens, attempt, priority, maxOutputTokens, requestId: opts.requestId ?? '' },
          this.timeoutMs,
          { signal },
        );
        const adm = conv.admission(target, r);
        // A fleet refusal is carried into local mode if the outage starts now.
        if (!adm.allowed && adm.reason === 'circuit_open' && adm.retryAfterMs) this.local.seedOpen(target, adm.retryAfterMs);
        return adm;
      },
      () => this.localAdmit(target),
    );
  }

  /**
   * Which target of `route` (a configured route name, or a list of targets)
   * should serve now. `strategy` overrides the route's own for this request
   * (`expectedOutputTokens` is what `lowest_cost` prices the output at);
   * `priority` and `maxOutputTokens` as in `canProceed()`. The decision's
   * `strategy` and `reason` say how and why the target was chosen.
   */
  async route(
    route: RouteArg,
    opts: {
      estimatedTokens?: number;
      requiredContextTokens?: number;
      exclude?: readonly string[];
      attempt?: number;
      priority?: Priority | undefined;
      maxOutputTokens?: number | undefined;
      strategy?: RouteStrategy | undefined;
      expectedOutputTokens?: number | undefined;
      signal?: AbortSignal | undefined;
      /** The user request this call serves (see `finishRequest()`). */
      requestId?: string | undefined;
    } = {},
  ): Promise<RouteDecision> {
    const [name, candidates] = routeArgs(route);
    const { signal } = opts;
    signal?.throwIfAborted();
    const exclude = [...(opts.exclude ?? [])];
    const req = {
      route: name ?? '',
      candidates,
      estimatedTokens: nonNegInt('estimatedTokens', opts.estimatedTokens),
      requiredContextTokens: nonNegInt('requiredContextTokens', opts.requiredContextTokens),
      exclude,
      caller: this.caller,
      attempt: nonNegInt('attempt', opts.attempt),
      strategy: conv.strategyToProto(opts.strategy),
      expectedOutputTokens: nonNegInt('expectedOutputTokens', opts.expectedOutputTokens),
      priority: conv.priorityToProto(opts.priority),
      maxOutputTokens: nonNegInt('maxOutputTokens', opts.maxOutputTokens),
      requestId: opts.requestId ?? '',
    };
    return this.decide(
      'Route',
      async () => {
        const d = conv.routeDecision(await this.decisions.route(req, this.timeoutMs, { signal }));
        if (name) this.routeMemory.learn(name, d);
        for (const s of d.skipped) if (s.reason === 'circuit_open' && s.retryAfterMs) this.local.seedOpen(s.target, s.retryAfterMs);
        return d;
      },
      () => this.localRoute(name, candidates, exclude, opts.strategy),
    );
  }

  /**
   * Reports what happened to a call (see `guard()` for the automatic version).
   * `requestId` names the user request it served; `finish` (e.g. `'completed'`)
   * closes that request in the same call.
   */
  async recordOutcome(
    target: string,
    fields: Partial<Omit<OutcomeReport, 'target' | 'caller'>> = {},
  ): Promise<OutcomeResult> {
    return this.record({
      target,
      permit: fields.permit ?? '',
      outcome: fields.outcome ?? 'unspecified',
      httpStatus: fields.httpStatus ?? 0,
      errorType: fields.errorType ?? '',
      headers: normalizeHeaders(fields.headers ?? {}),
      latencyMs: fields.latencyMs,
      retryAfterMs: fields.retryAfterMs,
      inputTokens: fields.inputTokens ?? 0,
      outputTokens: fields.outputTokens ?? 0,
      attempt: fields.attempt ?? 0,
      keySlot: fields.keySlot ?? '',
      caller: this.caller,
      requestId: fields.requestId,
      finish: fields.finish,
    });
  }

  /**
   * Closes the user request `requestId` (the id sent on its CanProceed / Route /
   * RecordOutcome calls) as `result`: the server counts it in
   * `backstop_requests_total` and measures its duration and attempts. `route`,
   * `elapsedMs` and `attempts` are the client's own measure, used only by a
   * server that never saw the request (another replica, or expired). Finishing
   * twice is harmless (`duplicate`). `call()` and `guard()` do this on their own.
   */
  async finishRequest(
    requestId: string,
    result: RequestResult,
    opts: { route?: string; elapsedMs?: number; attempts?: number } = {},
  ): Promise<FinishResult> {
    if (!requestId) throw new TypeError('finishRequest needs the requestId of the request it closes');
    const req = {
      requestId,
      result: conv.requestResultToProto(result),
      route: opts.route ?? '',
      elapsed: opts.elapsedMs === undefined ? undefined : conv.duration(opts.elapsedMs),
      attempts: nonNegInt('attempts', opts.attempts),
    };
    const t = this.transport;
    return conv.finishResult(await t.unary(t.resilience, t.resilience.finishRequest, 'FinishRequest', req, this.timeoutMs));
  }

  /**
   * FinishRequest for the helpers: skipped while the fail-safe decides, and never
   * an error for the caller (the request then expires on the server).
   */
  private async finishQuietly(requestId: string, result: RequestResult, opts: { route?: string; elapsedMs?: number; attempts?: number } = {}): Promise<void> {
    if (!this.remote || this.closed || !requestId) return;
    try {
      await this.finishRequest(requestId, result, opts);
    } catch (e) {
      this.log.debug?.(`could not finish request ${requestId} on Backstop: ${String(e)}`);
    }
  }

  private async record(report: OutcomeReport): Promise<OutcomeResult> {
    if (isLocalPermit(report.permit)) return this.local.record(report);
    return this.decide(
      'RecordOutcome',
      async () => conv.outcomeResult(report.target, await this.decisions.recordOutcome(conv.recordRequest(report), this.timeoutMs)),
      () => this.local.record(report),
    );
  }

  /** `record` for the call loop: a rejected report (e.g. INVALID_ARGUMENT) is logged and advised locally. */
  private async recordSafe(report: OutcomeReport): Promise<OutcomeResult> {
    try {
      return await this.record(report);
    } catch (e) {
      if (!(e instanceof ControlPlaneError)) throw e;
      this.log.error(`could not report an outcome to Backstop (${e.message}); using local advice`);
      return this.local.record(report);
    }
  }

  private report(
    target: string,
    permit: string,
    keySlot: string,
    attempt: number,
    obs: Observed,
    latencyMs: number,
    requestId = '',
    finish: RequestResult | undefined = undefined,
  ): OutcomeReport {
    return {
      requestId,
      finish,
      target,
      permit,
      outcome: obs.outcome,
      httpStatus: obs.httpStatus,
      errorType: obs.errorType,
      headers: obs.headers,
      latencyMs,
      inputTokens: obs.inputTokens,
      outputTokens: obs.outputTokens,
      attempt,
      keySlot,
      caller: this.caller,
    };
  }

  // --- guard ------------------------------------------------------------------------------

  /**
   * One provider call between CanProceed and RecordOutcome. Throws CircuitOpen /
   * RateLimited / RequestTooLarge / BackstopUnreachable (with `retryAfterMs`)
   * when refused, without running `fn`; a budget's priority reserve throws
   * PriorityReserved and a spend limit SpendLimitExceeded (both RateLimited). Otherwise runs `fn(g)`, reports the
   * outcome (classified from what `fn` threw, or a success with the usage read
   * from its return value) and returns `fn`'s result; `fn`'s error propagates
   * unchanged. `g.outcome` then holds the server's answer, retry advice included.
   */
  async guard<T>(target: string, fn: (g: GuardContext) => T | Promise<T>, opts: GuardOptions = {}): Promise<T> {
    const attempt = nonNegInt('attempt', opts.attempt);
    opts.signal?.throwIfAborted();
    const ownRequest = !opts.requestId;
    const requestId = opts.requestId || newRequestId();
    const adm = await this.canProceed(target, {
      estimatedTokens: opts.estimatedTokens ?? 0,
      attempt,
      priority: opts.priority,
      maxOutputTokens: opts.maxOutputTokens,
      signal: opts.signal,
      requestId,
    });
    if (!adm.allowed) {
      if (ownRequest) await this.finishQuietly(requestId, 'failed');
      throw refusal(target, adm.reason, adm.state, adm.retryAfterMs, adm.local);
    }
    const g = new GuardContext(target, attempt, adm, opts.signal, requestId);
    const started = performance.now();
    let value: T | undefined;
    let error: unknown;
    let failed = false;
    try {
      value = await fn(g);
    } catch (e) {
      error = e;
      failed = true;
    }
    const latencyMs = performance.now() - started;
    const obs = failed ? observeErrorWithSignal(error, opts.signal) : observeSuccess(value);
    if (!failed && g.usageSet) [obs.inputTokens, obs.outputTokens] = g.usageSet;
    if (!failed && g.headersSet) obs.headers = g.headersSet;
    if (g.override) {
      const o = g.override;
      obs.outcome = o.outcome ?? obs.outcome;
      obs.httpStatus = o.httpStatus || obs.httpStatus;
      obs.errorType = o.errorType || obs.errorType;
      obs.headers = o.headers ?? obs.headers;
    }
    const completed = !failed && (obs.outcome === 'success' || obs.outcome === 'unspecified');
    g.report = this.report(target, adm.permit, adm.keySlot, attempt, obs, latencyMs, requestId, completed ? 'completed' : undefined);
    try {
      g.outcome = await this.record(g.report);
    } catch (e) {
      if (!failed) throw e;
      // The block's own error matters more; do not replace it.
      this.log.error(`could not report the outcome of a call to ${target}: ${String(e)}`);
    } finally {
      if (ownRequest && !completed) await this.finishQuietly(requestId, 'failed');
    }
    if (failed) throw error;
    return value as T;
  }

  // --- call -------------------------------------------------------------------------------

  /**
   * Runs `fn` on the best available target of `route` (a configured route
   * name, or a list of targets), retrying per Backstop's advice and falling
   * back along the route:
   *
   * 1. Route admits a target; `fn({target, maxTokens, keySlot, attempt, signal})` calls it.
   * 2. The outcome is reported with the permit, status, error type, headers, latency and usage.
   * 3. Advice says retry: wait at least the advised delay (it includes the provider's hint)
   *    and ask CanProceed for the same target with attempt + 1 (the fleet's retry budget).
   * 4. A PERSISTENT failure on one key slot: Route again without excluding the target
   *    (another key may serve). A context-length error that states the prompt size:
   *    Route again requiring that many tokens of context window.
   * 5. Otherwise exclude the target and Route again.
   * 6. Nothing left: with `defer`, save the request and return a Deferred; else throw
   *    AllTargetsFailed listing every attempt and skip.
   */
  async call<T>(route: RouteArg, fn: CallFn<T>, opts?: CallOptions): Promise<T>;
  async call<T>(route: RouteArg, fn: CallFn<T>, opts: CallOptions & { defer: DeferOptions }): Promise<T | Deferred>;
  async call<T>(route: RouteArg, fn: CallFn<T>, opts: CallOptions & { defer?: DeferOptions } = {}): Promise<T | Deferred> {
    // One user request: the success report closes it as completed; giving up
    // finishes it as failed, deferring as deferred, with the client's own
    // elapsed time and attempts (used by a server that never saw it).
    const req: CallRequest = { id: opts.requestId || newRequestId(), attempts: 0, completed: false, deferred: false };
    const started = performance.now();
    const finish = (result: RequestResult) =>
      this.finishQuietly(req.id, result, {
        route: typeof route === 'string' ? route : '',
        elapsedMs: performance.now() - started,
        attempts: req.attempts,
      });
    let value: T | Deferred;
    try {
      value = await this.callAttempts(route, fn, opts, req);
    } catch (e) {
      if (!req.completed) await finish('failed');
      throw e;
    }
    if (req.deferred) await finish('deferred');
    return value;
  }

  private async callAttempts<T>(
    route: RouteArg,
    fn: CallFn<T>,
    opts: CallOptions & { defer?: DeferOptions },
    req: CallRequest,
  ): Promise<T | Deferred> {
    const requestId = req.id;
    const [name, candidates] = routeArgs(route);
    const estimatedTokens = nonNegInt('estimatedTokens', opts.estimatedTokens);
    let requiredContext = nonNegInt('requiredContextTokens', opts.requiredContextTokens);
    const { priority, maxOutputTokens, strategy, expectedOutputTokens } = opts;
    // Checked up front, so a typo fails before anything is sent.
    conv.priorityToProto(priority);
    conv.strategyToProto(strategy);
    const { signal, defer } = opts;
    const queue = defer ? (defer.queue ?? name) : undefined;
    if (defer && !queue) throw new TypeError('defer with a list of targets needs defer.queue (a route or target name)');
    const payload = defer ? encodePayload(defer.payload) : undefined;
    const invoke: (a: CallAttempt) => T | Promise<T> = isStructured(fn)
      ? (fn as Structured<T, CallAttempt>).session()
      : (fn as (a: CallAttempt) => T | Promise<T>);
    const started = performance.now();
    let errors: AttemptError[] = [];
    const exclude = [...(opts.exclude ?? [])];
    const tried: string[] = [];
    const failedSlots = new Set<string>();
    let last: RouteDecision | undefined;

    for (;;) {
      signal?.throwIfAborted();
      const decision = await this.route(route, {
        estimatedTokens,
        requiredContextTokens: requiredContext,
        exclude,
        priority,
        maxOutputTokens,
        strategy,
        expectedOutputTokens,
        signal,
        requestId,
      });
      last = decision;
      if (decision.target === null) {
        errors = postMortem(errors, decision, tried);
        break;
      }
      const target = decision.target;
      if (decision.keySlot && failedSlots.has(`${target}\u0000${decision.keySlot}`)) {
        exclude.push(target);
        continue;
      }
      tried.push(target);
      let { permit, keySlot } = decision;
      let attempt = 0;
      let slotFailed = false;
      for (;;) {
        const t0 = performance.now();
        let value: T | undefined;
        let error: unknown;
        let failed = false;
        try {
          value = await invoke({ target, maxTokens: decision.maxTokens, keySlot, attempt, local: decision.local, signal });
        } catch (e) {
          error = e;
          failed = true;
        }
        const latencyMs = performance.now() - t0;
        req.attempts += 1;
        if (!failed) {
          req.completed = true; // closed by the report, even if that report is lost
          await this.recordSafe(this.report(target, permit, keySlot, attempt, observeSuccess(value), latencyMs, requestId, 'completed'));
          return value as T;
        }
        const obs = observeErrorWithSignal(error, signal);
        const result = await this.recordSafe(this.report(target, permit, keySlot, attempt, obs, latencyMs, requestId));
        errors.push({
          target,
          outcome: result.classifiedAs,
          message: obs.message || describe(error),
          httpStatus: obs.httpStatus,
          reason: undefined,
          retryAfterMs: undefined,
          attempt,
          error,
        });
        // The corrections are used up: falling back would only repeat them.
        if (error instanceof StructuredOutputError) throw error;
        if (signal?.aborted) throw error;
        if (result.classifiedAs === 'bad_input') {
          requiredContext = Math.max(requiredContext, contextTokensNeeded(`${obs.errorType} ${obs.message}`));
        }
        if (!result.retry.retry) {
          if (result.classifiedAs === 'persistent' && keySlot) {
            failedSlots.add(`${target}\u0000${keySlot}`);
            slotFailed = true;
          }
          break;
        }
        if (opts.deadlineMs !== undefined && performance.now() - started + result.retry.delayMs > opts.deadlineMs) break;
        if (result.retry.delayMs > 0) await sleep(result.retry.delayMs, signal);
        attempt += 1;
        const adm = await this.canProceed(target, { estimatedTokens, attempt, priority, maxOutputTokens, signal, requestId });
        if (!adm.allowed) {
          errors.push({
            target,
            outcome: undefined,
            message: 'refused',
            httpStatus: 0,
            reason: adm.reason,
            retryAfterMs: adm.retryAfterMs,
            attempt,
          });
          break;
        }
        permit = adm.permit;
        keySlot = adm.keySlot;
      }
      if (slotFailed) continue; // only that key is disabled: another key of the same target may serve
      exclude.push(target);
    }

    const retryAfterMs = last?.retryAfterMs;
    const routeName = name ? `route '${name}'` : `candidates [${candidates.join(', ')}]`;
    const note =
      last?.local && last.skipped.length === 0 && tried.length === 0
        ? 'Backstop is unreachable and this client knows no targets for it; pass localRoutes: {...} to keep routing while the control plane is down'
        : '';
    if (defer && queue && payload) {
      let d: Deferred;
      try {
        d = await this.deferRaw(queue, payload, defer);
      } catch (e) {
        if (!(e instanceof BackstopError)) throw e;
        throw new AllTargetsFailed(routeName, errors, retryAfterMs, e, note);
      }
      req.deferred = true;
      return { ...d, errors };
    }
    throw new AllTargetsFailed(routeName, errors, retryAfterMs, undefined, note);
  }

  // --- deferred queue -----------------------------------------------------------------------

  private async deferRaw(queue: string, payload: Uint8Array, o: Omit<DeferOptions, 'payload'>): Promise<Deferred> {
    const metadata = Object.fromEntries(Object.entries(o.metadata ?? {}).map(([k, v]) => [k, String(v)]));
    const r = await this.transport.unary(
      this.transport.deferred,
      this.transport.deferred.defer,
      'Defer',
      {
        queue,
        payload: Buffer.from(payload),
        metadata,
        idempotencyKey: o.idempotencyKey ?? '',
        notBefore: o.notBefore,
        maxAttempts: nonNegInt('maxAttempts', o.maxAttempts),
        estimatedTokens: 0,
        requiredContextTokens: 0,
      },
      this.queueTimeoutMs,
    );
    return {
      deferred: true,
      id: r.id,
      queue,
      message: r.message || defaultMessage(r.depth),
      duplicate: r.duplicate,
      depth: r.depth,
      errors: [],
    };
  }

  /** Saves a request to `queue` (a route or target name) for a DeferredWorker. */
  async defer(queue: string, payload: unknown, opts: Omit<DeferOptions, 'payload' | 'queue'> = {}): Promise<Deferred> {
    if (!queue) throw new TypeError('queue is empty: name the route or target whose queue to use');
    return this.deferRaw(queue, encodePayload(payload), opts);
  }

  /**
   * Takes up to `maxItems` ready items, long-polling up to `waitMs`. Each item
   * is admitted at `priority` (default `'default'`): a background drain that
   * claims as `'batch'` never uses what budgets reserve for interactive calls.
   */
  async claim(
    queue: string,
    opts: {
      maxItems?: number;
      leaseMs?: number;
      waitMs?: number;
      worker?: string;
      priority?: Priority | undefined;
      signal?: AbortSignal;
    } = {},
  ): Promise<ClaimResult> {
    const waitMs = opts.waitMs ?? 0;
    const priority = conv.priorityToProto(opts.priority);
    const r = await this.transport.unary(
      this.transport.deferred,
      this.transport.deferred.claim,
      'Claim',
      {
        queue,
        maxItems: opts.maxItems ?? 1,
        lease: opts.leaseMs === undefined ? undefined : conv.duration(opts.leaseMs),
        wait: waitMs > 0 ? conv.duration(waitMs) : undefined,
        worker: opts.worker ?? this.caller,
        priority,
      },
      this.queueTimeoutMs + Math.max(0, waitMs),
      { signal: opts.signal },
    );
    return conv.claimResult(r);
  }

  async ack(item: DeferredItemData | string, leaseToken?: string): Promise<void> {
    const [id, token] = itemRef(item, leaseToken);
    await this.transport.unary(this.transport.deferred, this.transport.deferred.ack, 'Ack', { id, leaseToken: token }, this.queueTimeoutMs);
  }

  async nack(
    item: DeferredItemData | string,
    opts: { leaseToken?: string; delayMs?: number; reason?: string } = {},
  ): Promise<NackResult> {
    const [id, token] = itemRef(item, opts.leaseToken);
    const r = await this.transport.unary(
      this.transport.deferred,
      this.transport.deferred.nack,
      'Nack',
      {
        id,
        leaseToken: token,
        delay: opts.delayMs ? conv.duration(opts.delayMs) : undefined,
        reason: (opts.reason ?? '').slice(0, 1024),
      },
      this.queueTimeoutMs,
    );
    return { deadLettered: r.deadLettered, attempt: r.attempt };
  }

  async queueStats(queue = ''): Promise<QueueStat[]> {
    const r = await this.transport.unary(this.transport.deferred, this.transport.deferred.queueStats, 'QueueStats', { queue }, this.queueTimeoutMs);
    return r.queues.map(conv.queueStat);
  }

  async deadLetters(queue = ''): Promise<DeferredItemData[]> {
    const out: DeferredItemData[] = [];
    let pageToken = '';
    do {
      const r = await this.transport.unary(
        this.transport.deferred,
        this.transport.deferred.listDeadLetters,
        'ListDeadLetters',
        { queue, pageSize: 1000, pageToken },
        this.queueTimeoutMs,
      );
      out.push(...r.items.map(conv.deferredItem));
      pageToken = r.nextPageToken;
    } while (pageToken);
    return out;
  }

  async requeue(id: string): Promise<void> {
    await this.transport.unary(this.transport.deferred, this.transport.deferred.requeue, 'Requeue', { id }, this.queueTimeoutMs);
  }

  /** A worker draining `queue`: iterate it for claimed items, or `run(handler)`. */
  worker(queue: string, opts: WorkerOptions = {}): DeferredWorker {
    return new DeferredWorker(this, queue, opts);
  }

  // --- admin ----------------------------------------------------------------------------------

  async getTarget(target: string): Promise<TargetStatus> {
    const r = await this.transport.unary(this.transport.admin, this.transport.admin.getTarget, 'GetTarget', { target }, this.queueTimeoutMs, {
      admin: true,
    });
    return conv.targetStatus(r);
  }

  async listTargets(prefix = ''): Promise<TargetSummary[]> {
    const out: TargetSummary[] = [];
    let pageToken = '';
    do {
      const r = await this.transport.unary(
        this.transport.admin,
        this.transport.admin.listTargets,
        'ListTargets',
        { prefix, pageSize: 1000, pageToken },
        this.queueTimeoutMs,
        { admin: true },
      );
      out.push(...r.targets.map(conv.targetSummary));
      pageToken = r.nextPageToken;
    } while (pageToken);
    return out;
  }

  async setBreakerState(target: string, mode: BreakerMode, reason = ''): Promise<TargetStatus> {
    const r = await this.transport.unary(
      this.transport.admin,
      this.transport.admin.setBreakerState,
      'SetBreakerState',
      { target, mode: conv.breakerModeToProto(mode), reason },
      this.queueTimeoutMs,
      { admin: true },
    );
    return conv.targetStatus(r);
  }

  async resetTarget(target: string): Promise<TargetStatus> {
    const r = await this.transport.unary(this.transport.admin, this.transport.admin.resetTarget, 'ResetTarget', { target }, this.queueTimeoutMs, {
      admin: true,
    });
    return conv.targetStatus(r);
  }

  // --- events -----------------------------------------------------------------------------------

  /**
   * The live event stream (breaker transitions, pauses, fallbacks, queue
   * activity) as an async iterator: a snapshot first, then events. It resumes
   * after the last seen `seq` when the connection drops; end it with `break`
   * or the signal.
   */
  watch(opts: WatchOptions = {}): AsyncGenerator<BackstopEvent, void, undefined> {
    return watchEvents(this.transport, opts, this.reconnectIntervalMs);
  }
}

/** `BACKSTOP_STREAM=0` (or false / no / off) turns the Decide stream off by default. */
function streamFromEnv(): boolean {
  const v = process.env.BACKSTOP_STREAM?.trim().toLowerCase();
  return !(v === '0' || v === 'false' || v === 'no' || v === 'off');
}

function observeErrorWithSignal(error: unknown, signal: AbortSignal | undefined): Observed {
  if (signal?.aborted) {
    const o = observeError(error);
    return { ...o, outcome: 'bad_input', httpStatus: 0, errorType: 'cancelled', headers: {}, message: 'cancelled' };
  }
  return observeError(error);
}

function routeArgs(route: RouteArg): [string | undefined, string[]] {
  if (typeof route === 'string') {
    if (!route) throw new TypeError('route is empty: name a configured route, or pass a list of targets');
    return [route, []];
  }
  if (!Array.isArray(route) || route.length === 0 || route.some((t) => typeof t !== 'string' || !t)) {
    throw new TypeError('route must be a route name or a non-empty list of target names');
  }
  return [undefined, [...route]];
}

function itemRef(item: DeferredItemData | string, leaseToken: string | undefined): [string, string] {
  if (typeof item !== 'string') return [item.id, leaseToken ?? item.leaseToken];
  if (leaseToken === undefined) throw new TypeError('pass the claimed item, or its id and leaseToken');
  return [item, leaseToken];
}

/**
 * Every error in route order: each tried target's attempts, and for the others
 * why the last Route passed them over (e.g. circuit_open, retry in 41s).
 */
function postMortem(errors: AttemptError[], final: RouteDecision, tried: string[]): AttemptError[] {
  const byTarget = new Map<string, AttemptError[]>();
  for (const e of errors) byTarget.set(e.target, [...(byTarget.get(e.target) ?? []), e]);
  const ordered: AttemptError[] = [];
  for (const s of final.skipped) {
    const mine = byTarget.get(s.target);
    if (mine) {
      ordered.push(...mine);
      byTarget.delete(s.target);
    } else if (s.reason !== 'excluded' && !tried.includes(s.target)) {
      ordered.push({
        target: s.target,
        outcome: undefined,
        message: 'skipped',
        httpStatus: 0,
        reason: s.reason,
        retryAfterMs: s.retryAfterMs,
        attempt: 0,
      });
    }
  }
  for (const rest of byTarget.values()) ordered.push(...rest);
  return ordered;
}

/**
 * Wraps `fn` for `call()` so its reply is parsed as JSON and validated against
 * `schema` (zod, a Standard Schema, or a JSON Schema object), with up to
 * `maxCorrections` correction prompts on the same model. `fn` receives the
 * attempt plus `correction` (undefined on a first try).
 */
export function structured<T>(
  schema: Schema<T>,
  fn: (attempt: CallAttempt & { correction: Correction | undefined }) => ReplyLike | Promise<ReplyLike>,
  opts: StructuredOptions = {},
): Structured<T, CallAttempt> {
  return new Structured<T, CallAttempt>(schema, fn, opts);
}
