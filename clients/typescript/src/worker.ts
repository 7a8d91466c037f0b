/**
 * Workers that drain a deferred queue.
 *
 * Backstop hands out items only while the queue's route (or target) admits a
 * call, each already admitted to a target with a permit. Iterate a worker for
 * items and finish each with `ack(reply)` (reports a success with the item's
 * permit, then Acks) or `nack(error)` (reports the failure, classified like
 * `guard()`, then Nacks with the server's retry delay; after `max_attempts`
 * deliveries the server dead-letters it) — or let `run(handler)` do that.
 * Delivery is at-least-once: a worker that dies mid-item leaves it to be
 * redelivered when its lease runs out, so handlers should be idempotent
 * (`item.id` is a stable key).
 */
import { describe, observeError, observeSuccess } from './classify.js';
import type { Backstop } from './client.js';
import { priorityToProto } from './convert.js';
import { ControlPlaneError } from './errors.js';
import type { DeferredItemData, NackResult, OutcomeResult, Priority, Reason } from './types.js';

export interface WorkerOptions {
  /** Items per Claim (default 1). */
  maxItems?: number;
  /** How long an item may be held before it is redelivered (default 60 s). */
  leaseMs?: number;
  /** Long-poll wait of each Claim (default 5 s). */
  waitMs?: number;
  /** Recorded as the caller of the admissions (default the client's caller). */
  workerId?: string;
  /** The priority deliveries are admitted at (default `'default'`; `'batch'` leaves budgets' reserves alone). */
  priority?: Priority;
  /** Nack delay when the server gave no retry advice (default 1 s). */
  retryDelayMs?: number;
  /** Wait after a failed Claim (Backstop unreachable), default 500 ms. */
  errorBackoffMs?: number;
  signal?: AbortSignal;
}

export interface WorkerStats {
  claimed: number;
  acked: number;
  nacked: number;
  deadLettered: number;
  /** Claim / Ack / Nack calls that failed (e.g. while Backstop was unreachable). */
  errors: number;
}

/** A claimed deferred request: call `target` (already admitted) with the saved request, then ack or nack. */
export class ClaimedItem implements DeferredItemData {
  readonly id: string;
  readonly queue: string;
  readonly payload: Uint8Array;
  readonly metadata: Readonly<Record<string, string>>;
  readonly leaseToken: string;
  readonly attempt: number;
  readonly maxAttempts: number;
  readonly target: string;
  readonly permit: string;
  readonly keySlot: string;
  readonly lastError: string;
  readonly enqueuedAt: Date | undefined;
  readonly leaseExpiresAt: Date | undefined;
  readonly deadLetteredAt: Date | undefined;
  private readonly worker: DeferredWorker;
  private readonly claimedAt = performance.now();
  private done = false;

  constructor(worker: DeferredWorker, d: DeferredItemData) {
    this.worker = worker;
    this.id = d.id;
    this.queue = d.queue;
    this.payload = d.payload;
    this.metadata = d.metadata;
    this.leaseToken = d.leaseToken;
    this.attempt = d.attempt;
    this.maxAttempts = d.maxAttempts;
    this.target = d.target;
    this.permit = d.permit;
    this.keySlot = d.keySlot;
    this.lastError = d.lastError;
    this.enqueuedAt = d.enqueuedAt;
    this.leaseExpiresAt = d.leaseExpiresAt;
    this.deadLetteredAt = d.deadLetteredAt;
  }

  text(): string {
    return new TextDecoder().decode(this.payload);
  }

  /** The payload as JSON (what `call()` stores for object payloads). */
  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }

  private async report(error: unknown, value: unknown, failed: boolean): Promise<OutcomeResult | undefined> {
    if (!this.target) return undefined;
    const obs = failed ? observeError(error) : observeSuccess(value);
    try {
      return await this.worker.client.recordOutcome(this.target, {
        permit: this.permit,
        outcome: obs.outcome,
        httpStatus: obs.httpStatus,
        errorType: obs.errorType,
        headers: obs.headers,
        latencyMs: performance.now() - this.claimedAt,
        inputTokens: obs.inputTokens,
        outputTokens: obs.outputTokens,
        attempt: Math.max(0, this.attempt - 1),
        keySlot: this.keySlot,
      });
    } catch (e) {
      this.worker.logError(`deferred item ${this.id}: could not report the outcome: ${String(e)}`);
      return undefined;
    }
  }

  private claimOnce(): void {
    if (this.done) throw new Error(`deferred item ${this.id} was already acked or nacked`);
    this.done = true;
  }

  /** Done: reports a success (usage read from `reply`) with the item's permit, then deletes the item. */
  async ack(reply?: unknown): Promise<void> {
    this.claimOnce();
    await this.report(undefined, reply, false);
    await this.worker.client.ack(this, this.leaseToken);
    this.worker.stats.acked += 1;
  }

  /**
   * Failed: reports `error` (classified like guard()) with the item's permit,
   * then returns the item to the queue after the server's advised delay
   * (or `delayMs`). Dead-lettered after its last attempt.
   */
  async nack(error: unknown, opts: { delayMs?: number } = {}): Promise<NackResult> {
    this.claimOnce();
    const result = await this.report(error, undefined, true);
    const delayMs = opts.delayMs ?? (result?.retry.retry ? result.retry.delayMs : this.worker.retryDelayMs);
    const r = await this.worker.client.nack(this, { delayMs, reason: describe(error) });
    this.worker.stats.nacked += 1;
    if (r.deadLettered) this.worker.stats.deadLettered += 1;
    return r;
  }
}

export class DeferredWorker implements AsyncIterable<ClaimedItem> {
  readonly client: Backstop;
  readonly queue: string;
  readonly stats: WorkerStats = { claimed: 0, acked: 0, nacked: 0, deadLettered: 0, errors: 0 };
  readonly retryDelayMs: number;
  private readonly maxItems: number;
  private readonly leaseMs: number;
  private readonly waitMs: number;
  private readonly workerId: string;
  private readonly priority: Priority | undefined;
  private readonly errorBackoffMs: number;
  private readonly stopper = new AbortController();

  constructor(client: Backstop, queue: string, opts: WorkerOptions = {}) {
    if (!queue) throw new TypeError('queue is empty: name the route or target whose queue to drain');
    this.client = client;
    this.queue = queue;
    this.maxItems = opts.maxItems ?? 1;
    this.leaseMs = opts.leaseMs ?? 60_000;
    this.waitMs = opts.waitMs ?? 5000;
    this.workerId = opts.workerId ?? client.caller;
    priorityToProto(opts.priority); // a typo fails here, not on the first Claim
    this.priority = opts.priority;
    this.retryDelayMs = opts.retryDelayMs ?? 1000;
    this.errorBackoffMs = opts.errorBackoffMs ?? 500;
    opts.signal?.addEventListener('abort', () => this.stop(), { once: true });
  }

  /** Stops after the item in hand; an open long poll is cancelled. */
  stop(): void {
    this.stopper.abort();
  }

  get stopped(): boolean {
    return this.stopper.signal.aborted;
  }

  /** @internal */
  logError(message: string): void {
    console.error(message);
  }

  private async pause(ms: number): Promise<void> {
    if (this.stopped || ms <= 0) return;
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, ms);
      function done(): void {
        clearTimeout(t);
        resolve();
      }
      this.stopper.signal.addEventListener('abort', done, { once: true });
    });
  }

  /** True when the queue has nothing waiting or in flight. */
  async empty(): Promise<boolean> {
    const stats = await this.client.queueStats(this.queue);
    return stats.filter((q) => q.queue === this.queue).every((q) => q.depth === 0 && q.inFlight === 0);
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<ClaimedItem, void, undefined> {
    yield* this.items();
  }

  /** Claimed items until stopped; with `untilEmpty`, until the queue has nothing waiting or in flight. */
  async *items(opts: { untilEmpty?: boolean } = {}): AsyncGenerator<ClaimedItem, void, undefined> {
    let failing = false;
    while (!this.stopped) {
      let items: readonly DeferredItemData[];
      let blocked: Reason | undefined;
      let retryAfterMs: number | undefined;
      const started = performance.now();
      try {
        if (opts.untilEmpty && (await this.empty())) return;
        const res = await this.client.claim(this.queue, {
          maxItems: this.maxItems,
          leaseMs: this.leaseMs,
          waitMs: this.waitMs,
          worker: this.workerId,
          priority: this.priority,
          signal: this.stopper.signal,
        });
        ({ items, blockedReason: blocked, retryAfterMs } = res);
        failing = false;
      } catch (e) {
        if (this.stopped) return;
        if (!(e instanceof ControlPlaneError)) throw e;
        this.stats.errors += 1;
        if (!failing) console.warn(`deferred worker for ${this.queue}: ${e.message}; retrying`);
        failing = true;
        await this.pause(this.errorBackoffMs);
        continue;
      }
      for (const d of items) {
        this.stats.claimed += 1;
        yield new ClaimedItem(this, d);
      }
      if (!items.length) {
        // The server long-polls (also while blocked); wait only for what it did not.
        const want = blocked !== undefined ? Math.min(Math.max(retryAfterMs ?? this.errorBackoffMs, 10), Math.max(this.waitMs, 50)) : Math.min(this.waitMs, 250);
        await this.pause(want - (performance.now() - started));
      }
    }
  }

  /**
   * Runs `handler(item)` on each claimed item: returning acks (a success
   * report with the usage of the returned reply), throwing nacks. Stops on
   * `stop()`, the signal, `untilEmpty` (nothing waiting or in flight) or
   * after `timeoutMs`.
   */
  async run(
    handler: (item: ClaimedItem) => unknown,
    opts: { untilEmpty?: boolean; timeoutMs?: number } = {},
  ): Promise<WorkerStats> {
    const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => this.stop(), opts.timeoutMs);
    try {
      for await (const item of this.items({ untilEmpty: opts.untilEmpty ?? false })) {
        let value: unknown;
        try {
          value = await handler(item);
        } catch (e) {
          await this.finish(() => item.nack(e));
          continue;
        }
        await this.finish(() => item.ack(value));
      }
    } finally {
      if (timer) clearTimeout(timer);
    }
    return this.stats;
  }

  private async finish(step: () => Promise<unknown>): Promise<void> {
    try {
      await step();
    } catch (e) {
      if (!(e instanceof ControlPlaneError)) throw e;
      this.stats.errors += 1;
      console.warn(`deferred worker for ${this.queue}: ${e.message}; the item will be redelivered when its lease expires`);
    }
  }
}
