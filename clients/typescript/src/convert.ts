/**
 * Conversions between the generated wire types and the client's types.
 *
 * Enum numbers become lower-case names through the generated enums' reverse
 * mappings, so a value added to the proto later (and not yet in this
 * client's generated code) reads as 'unspecified' instead of throwing.
 */
import * as pbAdmin from './gen/backstop/v1/admin.js';
import * as pbDeferred from './gen/backstop/v1/deferred.js';
import * as pb from './gen/backstop/v1/resilience.js';
import type { Duration } from './gen/google/protobuf/duration.js';
import type {
  Admission,
  BreakerMode,
  BreakerState,
  BudgetStatus,
  ClaimResult,
  DeferredItemData,
  KeySlotStatus,
  OutcomeClass,
  OutcomeCounters,
  FinishResult,
  OutcomeReport,
  RequestResult,
  OutcomeResult,
  Priority,
  QueueStat,
  Reason,
  RetryReason,
  RouteDecision,
  RouteStrategy,
  TargetStatus,
  TargetSummary,
} from './types.js';

function nameOf<T extends string>(table: Record<number, string>, prefix: string, value: number): T {
  const name = table[value];
  if (typeof name !== 'string' || !name.startsWith(prefix) || value < 0) return 'unspecified' as T;
  return name.slice(prefix.length).toLowerCase() as T;
}

function valueOf(table: Record<string, string | number>, prefix: string, name: string): number {
  const v = table[prefix + name.toUpperCase()];
  if (typeof v !== 'number') throw new TypeError(`unknown value '${name}' for ${prefix.slice(0, -1)}`);
  return v;
}

export const breakerState = (v: number): BreakerState => nameOf(pb.BreakerState, 'BREAKER_STATE_', v);
export const reason = (v: number): Reason => nameOf(pb.Reason, 'REASON_', v);
export const outcomeClass = (v: number): OutcomeClass => nameOf(pb.OutcomeClass, 'OUTCOME_CLASS_', v);
export const retryReason = (v: number): RetryReason => nameOf(pb.RetryReason, 'RETRY_REASON_', v);
export const outcomeClassToProto = (c: OutcomeClass): pb.OutcomeClass =>
  valueOf(pb.OutcomeClass, 'OUTCOME_CLASS_', c) as pb.OutcomeClass;
export const breakerModeToProto = (m: BreakerMode): pbAdmin.BreakerMode =>
  valueOf(pbAdmin.BreakerMode, 'BREAKER_MODE_', m) as pbAdmin.BreakerMode;
export const routeStrategy = (v: number): RouteStrategy => nameOf(pb.RouteStrategy, 'ROUTE_STRATEGY_', v);

const PRIORITIES: readonly Priority[] = ['interactive', 'default', 'batch'];
const STRATEGIES: readonly RouteStrategy[] = [
  'unspecified',
  'ordered',
  'weighted',
  'least_busy',
  'lowest_latency',
  'lowest_cost',
  'most_headroom',
];

/** A `priority` option on the wire (unset: UNSPECIFIED, which the server treats as DEFAULT). Throws on an unknown name. */
export function priorityToProto(p: Priority | undefined): pb.Priority {
  if (p === undefined) return pb.Priority.PRIORITY_UNSPECIFIED;
  if (!PRIORITIES.includes(p)) {
    throw new TypeError(`priority must be one of ${PRIORITIES.map((v) => `'${v}'`).join(', ')}, got ${JSON.stringify(p)}`);
  }
  return valueOf(pb.Priority, 'PRIORITY_', p) as pb.Priority;
}

/** A `strategy` option on the wire (unset: UNSPECIFIED, the route's own). Throws on an unknown name. */
export function strategyToProto(s: RouteStrategy | undefined): pb.RouteStrategy {
  if (s === undefined) return pb.RouteStrategy.ROUTE_STRATEGY_UNSPECIFIED;
  if (!STRATEGIES.includes(s)) {
    throw new TypeError(`strategy must be one of ${STRATEGIES.map((v) => `'${v}'`).join(', ')}, got ${JSON.stringify(s)}`);
  }
  return valueOf(pb.RouteStrategy, 'ROUTE_STRATEGY_', s) as pb.RouteStrategy;
}

/** Milliseconds of a Duration (undefined when unset). */
export function ms(d: Duration | undefined): number | undefined {
  if (d === undefined) return undefined;
  return d.seconds * 1000 + d.nanos / 1e6;
}

/** A Duration of `milliseconds` (rounded to whole nanoseconds, never negative). */
export function duration(milliseconds: number): Duration {
  const totalNanos = Math.max(0, Math.round(milliseconds * 1e6));
  const seconds = Math.floor(totalNanos / 1e9);
  return { seconds, nanos: totalNanos - seconds * 1e9 };
}

export function admission(target: string, r: pb.CanProceedResponse, local = false): Admission {
  return {
    target,
    allowed: r.allowed,
    reason: reason(r.reason),
    state: breakerState(r.state),
    retryAfterMs: r.allowed ? undefined : ms(r.retryAfter),
    permit: r.permit,
    keySlot: r.keySlot,
    shadowReason: r.shadowReason ? reason(r.shadowReason) : undefined,
    local,
  };
}

export function outcomeResult(target: string, r: pb.RecordOutcomeResponse): OutcomeResult {
  return {
    target,
    classifiedAs: outcomeClass(r.classifiedAs),
    state: breakerState(r.state),
    retry: {
      retry: r.retry?.retry ?? false,
      delayMs: ms(r.retry?.delay) ?? 0,
      reason: retryReason(r.retry?.reason ?? 0),
    },
    stalePermit: r.stalePermit,
    duplicate: r.duplicate,
    cost: r.cost,
    local: false,
  };
}

export function routeDecision(r: pb.RouteResponse): RouteDecision {
  return {
    target: r.target === '' ? null : r.target,
    permit: r.permit,
    keySlot: r.keySlot,
    fallbackDepth: r.fallbackDepth,
    skipped: r.skipped.map((s) => ({ target: s.target, reason: reason(s.reason), retryAfterMs: ms(s.retryAfter) })),
    maxTokens: r.maxTokens,
    costPerMtokInput: r.costPerMtokInput,
    costPerMtokOutput: r.costPerMtokOutput,
    retryAfterMs: r.target === '' ? ms(r.retryAfter) : undefined,
    state: breakerState(r.state),
    local: false,
    strategy: routeStrategy(r.strategy),
    reason: r.reason,
  };
}

/** A `RequestResult` on the wire. Throws on an unknown name. */
export function requestResultToProto(r: RequestResult): pb.RequestResult {
  if (!REQUEST_RESULTS.includes(r)) {
    throw new TypeError(`result must be one of ${REQUEST_RESULTS.map((v) => `'${v}'`).join(', ')}, got ${JSON.stringify(r)}`);
  }
  return valueOf(pb.RequestResult, 'REQUEST_RESULT_', r) as pb.RequestResult;
}

const REQUEST_RESULTS: readonly RequestResult[] = ['completed', 'deferred', 'failed'];

export function finishResult(r: pb.FinishRequestResponse): FinishResult {
  return { tracked: r.tracked, duplicate: r.duplicate, durationMs: ms(r.duration) ?? 0, attempts: r.attempts, route: r.route };
}

/**
 * `withRequest: false` leaves out requestId / finish (outcomes reconciled
 * after an outage: the server never saw those requests).
 */
export function recordRequest(rep: OutcomeReport, withRequest = true): pb.RecordOutcomeRequest {
  return {
    requestId: withRequest ? (rep.requestId ?? '') : '',
    finish: withRequest && rep.finish ? requestResultToProto(rep.finish) : pb.RequestResult.REQUEST_RESULT_UNSPECIFIED,
    target: rep.target,
    permit: rep.permit,
    outcome: outcomeClassToProto(rep.outcome),
    httpStatus: rep.httpStatus,
    errorType: rep.errorType,
    latency: rep.latencyMs === undefined ? undefined : duration(rep.latencyMs),
    retryAfter: rep.retryAfterMs === undefined ? undefined : duration(rep.retryAfterMs),
    inputTokens: rep.inputTokens,
    outputTokens: rep.outputTokens,
    attempt: rep.attempt,
    headers: { ...rep.headers },
    keySlot: rep.keySlot,
    caller: rep.caller,
  };
}

export function deferredItem(i: pbDeferred.DeferredItem): DeferredItemData {
  return {
    id: i.id,
    queue: i.queue,
    payload: i.payload,
    metadata: { ...i.metadata },
    leaseToken: i.leaseToken,
    attempt: i.attempt,
    maxAttempts: i.maxAttempts,
    target: i.target,
    permit: i.permit,
    keySlot: i.keySlot,
    lastError: i.lastError,
    enqueuedAt: i.enqueuedAt,
    leaseExpiresAt: i.leaseExpiresAt,
    deadLetteredAt: i.deadLetteredAt,
  };
}

export function claimResult(r: pbDeferred.ClaimResponse): ClaimResult {
  return {
    items: r.items.map(deferredItem),
    blockedReason: r.blockedReason ? reason(r.blockedReason) : undefined,
    retryAfterMs: ms(r.retryAfter),
  };
}

export function queueStat(q: pbDeferred.QueueStat): QueueStat {
  return {
    queue: q.queue,
    depth: q.depth,
    inFlight: q.inFlight,
    deadLetters: q.deadLetters,
    oldestAgeMs: ms(q.oldestAge),
    bytes: q.bytes,
  };
}

function counters(c: pbAdmin.OutcomeCounters | undefined): OutcomeCounters {
  return {
    admitted: c?.admitted ?? 0,
    refused: c?.refused ?? 0,
    success: c?.success ?? 0,
    transient: c?.transient ?? 0,
    rateLimited: c?.rateLimited ?? 0,
    persistent: c?.persistent ?? 0,
    badInput: c?.badInput ?? 0,
    partial: c?.partial ?? 0,
    timeout: c?.timeout ?? 0,
    stale: c?.stale ?? 0,
  };
}

function budget(b: pbAdmin.BudgetStatus): BudgetStatus {
  return { kind: b.kind, limit: b.limit, windowMs: ms(b.window), available: b.available, group: b.group };
}

function keySlot(k: pbAdmin.KeySlotStatus): KeySlotStatus {
  return {
    name: k.name,
    disabled: k.disabled,
    disabledUntil: k.disabledUntil,
    disabledReason: k.disabledReason,
    pausedUntil: k.pausedUntil,
    inFlight: k.inFlight,
    budgets: k.budgets.map(budget),
  };
}

export function targetStatus(t: pbAdmin.TargetStatus): TargetStatus {
  return {
    target: t.target,
    state: breakerState(t.state),
    configured: t.configured,
    consecutiveFailures: t.consecutiveFailures,
    counters: counters(t.counters),
    openUntil: t.openUntil,
    lastCause: t.lastCause,
    generation: t.generation,
    inFlight: t.inFlight,
    keySlots: t.keySlots.map(keySlot),
    raw: t,
  };
}

export function targetSummary(t: pbAdmin.TargetSummary): TargetSummary {
  return {
    target: t.target,
    state: breakerState(t.state),
    configured: t.configured,
    consecutiveFailures: t.consecutiveFailures,
    openUntil: t.openUntil,
  };
}
