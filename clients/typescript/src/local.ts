/**
 * The local fail-safe: what the client decides alone while Backstop is unreachable.
 *
 * A small in-process copy of the server's rules with the server's defaults:
 * one circuit breaker per target (open after `failureThreshold` consecutive
 * failures, half-open with one probe after `openDurationMs`, closed after
 * `successThreshold` probe successes), the same failure taxonomy, a pause on
 * 429s that carry a retry hint, and full-jitter backoff. It is per-process on
 * purpose: it exists so an agent keeps working (and keeps backing off) when
 * its control plane is gone, not to replace the fleet's shared view. What it
 * decided is kept (bounded) so it can be reported to the server once it is
 * back (reconciliation).
 */
import type {
  Admission,
  BreakerState,
  OutcomeClass,
  OutcomeReport,
  OutcomeResult,
  Reason,
  RetryAdvice,
  RouteDecision,
  RouteStrategy,
  Skip,
} from './types.js';

export const LOCAL_PERMIT_PREFIX = 'local:';

/** Settings of the local fail-safe. The defaults are the server's defaults. */
export interface LocalPolicy {
  failureThreshold: number;
  successThreshold: number;
  openDurationMs: number;
  persistentOpenDurationMs: number;
  /** How long a half-open probe may stay unreported before its slot is reclaimed. */
  probeLeaseMs: number;
  maxRetries: number;
  baseDelayMs: number;
  maxDelayMs: number;
  /** Clamp on a pause a provider's retry hint can impose. */
  maxPauseMs: number;
}

export const DEFAULT_LOCAL_POLICY: Readonly<LocalPolicy> = Object.freeze({
  failureThreshold: 5,
  successThreshold: 2,
  openDurationMs: 60_000,
  persistentOpenDurationMs: 600_000,
  probeLeaseMs: 30_000,
  maxRetries: 3,
  baseDelayMs: 1000,
  maxDelayMs: 60_000,
  maxPauseMs: 3_600_000,
});

/** Validates a partial policy and fills in the defaults; throws a TypeError naming a bad field. */
export function localPolicy(p: Partial<LocalPolicy> = {}): LocalPolicy {
  const out: LocalPolicy = { ...DEFAULT_LOCAL_POLICY, ...p };
  for (const [k, v] of Object.entries(out)) {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new TypeError(`localPolicy.${k} must be a finite number >= 0, got ${String(v)}`);
    }
  }
  if (out.failureThreshold < 1 || out.successThreshold < 1) {
    throw new TypeError('localPolicy.failureThreshold and successThreshold must be at least 1');
  }
  return out;
}

/**
 * Full-jitter backoff: uniform(0, min(max, base * 2^attempt)). Spreads a
 * fleet's retries over the whole window instead of synchronising them.
 */
export function fullJitter(attempt: number, baseMs: number, maxMs: number, rand: () => number = Math.random): number {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 62));
  return cap * rand();
}

// The server's taxonomy markers (src/domain/taxonomy.rs), matched the same way.
const QUOTA = [
  'insufficient_quota',
  'credit balance',
  'credit_balance',
  'billing',
  'quota_exceeded',
  'perday',
  'per_day',
  'per day',
  'limit: 0',
];
const AUTH = [
  'authentication_error',
  'permission_error',
  'invalid_api_key',
  'incorrect api key',
  'permission_denied',
  'unauthenticated',
  'account_deactivated',
];
const BAD_INPUT = [
  'context_length_exceeded',
  'prompt is too long',
  'request_too_large',
  'invalid_request_error',
  'invalid_argument',
  'content_policy',
  'content_filter',
  'not_found_error',
];
const RATE = ['rate_limit', 'resource_exhausted', 'too_many_requests'];
const TIMEOUT = ['timeout', 'timed_out', 'deadline_exceeded'];

/** The server's classification rules, for use while it is unreachable. */
export function classify(explicit: OutcomeClass, httpStatus: number, errorType: string): OutcomeClass {
  if (explicit !== 'unspecified') return explicit;
  const et = errorType.toLowerCase();
  const has = (markers: string[]): boolean => markers.some((m) => et.includes(m));
  if (!(httpStatus >= 200 && httpStatus < 300) && has(QUOTA)) return 'persistent';
  if (httpStatus) {
    if (httpStatus >= 200 && httpStatus < 300) return 'success';
    if (httpStatus === 408) return 'timeout';
    if (httpStatus === 429) return 'rate_limited';
    if (httpStatus === 401 || httpStatus === 403) return 'persistent';
    if (httpStatus === 409 || httpStatus === 425 || (httpStatus >= 500 && httpStatus <= 599)) return 'transient';
    return 'bad_input';
  }
  if (has(TIMEOUT)) return 'timeout';
  if (has(AUTH)) return 'persistent';
  if (has(RATE)) return 'rate_limited';
  if (has(BAD_INPUT)) return 'bad_input';
  return 'transient';
}

/**
 * The provider's retry hint in milliseconds: `retry-after-ms`, `retry-after`
 * (seconds or an HTTP date) or the explicit value, whichever is longest.
 * Nonsense (negative, unparseable) is ignored.
 */
export function retryHintMs(
  headers: Readonly<Record<string, string>>,
  explicitMs?: number,
  now: () => number = Date.now,
): number | undefined {
  const hints: number[] = [];
  if (explicitMs !== undefined && explicitMs > 0) hints.push(explicitMs);
  const lower = new Map(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v.trim()]));
  const raw = lower.get('retry-after-ms');
  if (raw !== undefined && /^\d+(\.\d+)?$/.test(raw)) hints.push(Number(raw));
  const ra = lower.get('retry-after');
  if (ra !== undefined) {
    if (/^\d+(\.\d+)?$/.test(ra)) hints.push(Number(ra) * 1000);
    else {
      const when = Date.parse(ra);
      if (!Number.isNaN(when)) hints.push(when - now());
    }
  }
  const good = hints.filter((h) => h > 0 && Number.isFinite(h));
  return good.length ? Math.max(...good) : undefined;
}

interface Breaker {
  state: BreakerState;
  failures: number;
  openUntil: number;
  halfOpenSuccesses: number;
  probes: Map<string, number>;
  pausedUntil: number;
}

/** A locally decided outcome waiting to be reported to the server. */
export interface PendingReport {
  report: OutcomeReport;
  /** What the fail-safe classified it as. */
  classifiedAs: OutcomeClass;
  /** When it happened (clock ms) and, for a rate limit with a hint, when its pause ends. */
  at: number;
  pausedUntil: number | undefined;
}

export interface LocalEngineOptions {
  clock?: () => number;
  rand?: () => number;
  /** How many local outcomes are kept for reconciliation (oldest dropped first). */
  maxPending?: number;
}

/** Per-process breakers, pauses and retry advice. */
export class LocalEngine {
  readonly policy: LocalPolicy;
  private readonly clock: () => number;
  private readonly rand: () => number;
  private readonly breakers = new Map<string, Breaker>();
  private nextId = 1;
  private readonly maxPending: number;
  private pending: PendingReport[] = [];
  /** Local outcomes dropped because more than maxPending piled up. */
  droppedPending = 0;

  constructor(policy: LocalPolicy = DEFAULT_LOCAL_POLICY, opts: LocalEngineOptions = {}) {
    this.policy = policy;
    this.clock = opts.clock ?? (() => performance.now());
    this.rand = opts.rand ?? Math.random;
    this.maxPending = opts.maxPending ?? 10_000;
  }

  private breaker(target: string): Breaker {
    let b = this.breakers.get(target);
    if (!b) {
      b = { state: 'closed', failures: 0, openUntil: 0, halfOpenSuccesses: 0, probes: new Map(), pausedUntil: 0 };
      this.breakers.set(target, b);
    }
    const now = this.clock();
    if (b.state === 'open' && now >= b.openUntil) {
      b.state = 'half_open';
      b.halfOpenSuccesses = 0;
      b.probes.clear();
    }
    if (b.state === 'half_open') for (const [p, until] of b.probes) if (until <= now) b.probes.delete(p);
    return b;
  }

  private open(b: Breaker, forMs: number): void {
    b.state = 'open';
    b.openUntil = Math.max(b.openUntil, this.clock() + forMs);
    b.failures = 0;
    b.halfOpenSuccesses = 0;
    b.probes.clear();
  }

  stateOf(target: string): BreakerState {
    return this.breaker(target).state;
  }

  /**
   * Carries a fleet-wide refusal seen just before an outage into local mode,
   * so a target the fleet had opened is not hammered the moment Backstop goes away.
   */
  seedOpen(target: string, retryAfterMs: number): void {
    const b = this.breaker(target);
    if (retryAfterMs > 0 && b.state === 'closed') {
      b.state = 'open';
      b.openUntil = this.clock() + Math.min(retryAfterMs, this.policy.maxPauseMs);
    }
  }

  admit(target: string): Admission {
    const b = this.breaker(target);
    const now = this.clock();
    const refuse = (reason: Reason, after: number): Admission => ({
      target,
      allowed: false,
      reason,
      state: b.state,
      retryAfterMs: Math.max(0, after),
      permit: '',
      keySlot: '',
      shadowReason: undefined,
      local: true,
    });
    if (b.state === 'open') return refuse('circuit_open', b.openUntil - now);
    if (b.pausedUntil > now) return refuse('rate_limited', b.pausedUntil - now);
    const permit = `${LOCAL_PERMIT_PREFIX}${this.nextId++}`;
    if (b.state === 'half_open') {
      if (b.probes.size > 0) return refuse('probe_limit', Math.min(...b.probes.values()) - now);
      b.probes.set(permit, now + this.policy.probeLeaseMs);
    }
    return {
      target,
      allowed: true,
      reason: 'allowed',
      state: b.state,
      retryAfterMs: undefined,
      permit,
      keySlot: '',
      shadowReason: undefined,
      local: true,
    };
  }

  private advise(cls: OutcomeClass, attempt: number, hintMs: number | undefined): RetryAdvice {
    const p = this.policy;
    if (cls === 'success') return { retry: false, delayMs: 0, reason: 'succeeded' };
    if (cls === 'persistent') return { retry: false, delayMs: 0, reason: 'persistent' };
    if (cls === 'bad_input') return { retry: false, delayMs: 0, reason: 'bad_input' };
    if (attempt >= p.maxRetries) return { retry: false, delayMs: 0, reason: 'max_retries' };
    if (cls === 'partial') return { retry: true, delayMs: 0, reason: 'correct_and_retry' };
    const delayMs = Math.max(fullJitter(attempt, p.baseDelayMs, p.maxDelayMs, this.rand), hintMs ?? 0);
    return { retry: true, delayMs, reason: 'retryable' };
  }

  record(report: OutcomeReport): OutcomeResult {
    const cls = classify(report.outcome, report.httpStatus, report.errorType);
    let hint = retryHintMs(report.headers, report.retryAfterMs);
    if (hint !== undefined) hint = Math.min(hint, this.policy.maxPauseMs);
    const b = this.breaker(report.target);
    const now = this.clock();
    const wasProbe = b.probes.delete(report.permit);
    let effect: 'success' | 'failure' | 'persistent' | 'ignore';
    if (cls === 'rate_limited' && hint) {
      b.pausedUntil = Math.max(b.pausedUntil, now + hint);
      effect = 'ignore';
    } else if (cls === 'success' || cls === 'partial') effect = 'success';
    else if (cls === 'persistent') effect = 'persistent';
    else if (cls === 'bad_input') effect = 'ignore';
    else effect = 'failure';
    const p = this.policy;
    if (effect === 'persistent') this.open(b, p.persistentOpenDurationMs);
    else if (b.state === 'half_open' && wasProbe) {
      if (effect === 'success') {
        b.halfOpenSuccesses += 1;
        if (b.halfOpenSuccesses >= p.successThreshold) {
          b.state = 'closed';
          b.failures = 0;
          b.probes.clear();
        }
      } else if (effect === 'failure') this.open(b, p.openDurationMs);
    } else if (b.state === 'closed') {
      if (effect === 'success') b.failures = 0;
      else if (effect === 'failure') {
        b.failures += 1;
        if (b.failures >= p.failureThreshold) this.open(b, p.openDurationMs);
      }
    }
    this.pending.push({
      report: { ...report, headers: { ...report.headers } },
      classifiedAs: cls,
      at: now,
      pausedUntil: cls === 'rate_limited' && hint ? now + hint : undefined,
    });
    if (this.pending.length > this.maxPending) {
      const drop = this.pending.length - this.maxPending;
      this.pending.splice(0, drop);
      this.droppedPending += drop;
    }
    return {
      target: report.target,
      classifiedAs: cls,
      state: b.state,
      retry: this.advise(cls, report.attempt, hint),
      stalePermit: false,
      duplicate: false,
      cost: 0,
      local: true,
    };
  }

  /**
   * The first admissible candidate in list order. A requested `strategy`
   * cannot be applied locally (latencies, load and prices are the fleet's, on
   * the server): the decision says `ordered`, and why.
   */
  route(candidates: readonly string[], exclude: readonly string[], strategy?: RouteStrategy): RouteDecision {
    const skipped: Skip[] = [];
    const excluded = new Set(exclude);
    let why = 'local fail-safe (Backstop unreachable): first admissible in list order';
    if (strategy !== undefined && strategy !== 'unspecified' && strategy !== 'ordered') why += `; ${strategy} needs the server`;
    for (const [depth, cand] of candidates.entries()) {
      if (excluded.has(cand)) {
        skipped.push({ target: cand, reason: 'excluded', retryAfterMs: undefined });
        continue;
      }
      const adm = this.admit(cand);
      if (adm.allowed) {
        return {
          target: cand,
          permit: adm.permit,
          keySlot: '',
          fallbackDepth: depth,
          skipped,
          maxTokens: 0,
          costPerMtokInput: 0,
          costPerMtokOutput: 0,
          retryAfterMs: undefined,
          state: adm.state,
          local: true,
          strategy: 'ordered',
          reason: why,
        };
      }
      skipped.push({ target: cand, reason: adm.reason, retryAfterMs: adm.retryAfterMs });
    }
    const afters = skipped.map((s) => s.retryAfterMs).filter((v): v is number => v !== undefined);
    return {
      target: null,
      permit: '',
      keySlot: '',
      fallbackDepth: 0,
      skipped,
      maxTokens: 0,
      costPerMtokInput: 0,
      costPerMtokOutput: 0,
      retryAfterMs: afters.length ? Math.min(...afters) : undefined,
      state: 'unspecified',
      local: true,
      strategy: 'ordered',
      reason: '',
    };
  }

  /** Takes the local outcomes waiting for reconciliation (oldest first). */
  takePending(): PendingReport[] {
    const out = this.pending;
    this.pending = [];
    return out;
  }

  /** Puts back reports a failed reconciliation could not deliver (ahead of newer ones). */
  restorePending(reports: PendingReport[]): void {
    this.pending = [...reports, ...this.pending].slice(-this.maxPending);
  }

  get pendingCount(): number {
    return this.pending.length;
  }

  now(): number {
    return this.clock();
  }
}

/**
 * Candidate lists of routes, as configured locally and as learned from Route
 * answers (the chosen target and every skipped one, in order), so the
 * fail-safe falls back along the same order the server uses.
 */
export class RouteMemory {
  private readonly routes = new Map<string, string[]>();

  constructor(configured: Readonly<Record<string, readonly string[]>> = {}) {
    for (const [k, v] of Object.entries(configured)) this.routes.set(k, [...v]);
  }

  learn(route: string, decision: RouteDecision): void {
    const observed = decision.skipped.map((s) => s.target);
    if (decision.target) observed.push(decision.target);
    if (!observed.length) return;
    let known = this.routes.get(route);
    if (!known) {
      known = [];
      this.routes.set(route, known);
    }
    observed.forEach((t, i) => {
      if (known.includes(t)) return;
      if (i === 0) known.unshift(t);
      else known.splice(known.indexOf(observed[i - 1] as string) + 1, 0, t);
    });
  }

  candidates(route: string): string[] {
    return [...(this.routes.get(route) ?? [])];
  }
}
