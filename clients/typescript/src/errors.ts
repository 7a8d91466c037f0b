/**
 * Typed errors. Everything this package throws on its own is a BackstopError;
 * errors of the provider call inside `guard()` / `call()` propagate unchanged.
 */
import type { AttemptError, BreakerState, Reason } from './types.js';

export class BackstopError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Backstop (or the local fail-safe) said no. `retryAfterMs`: when asking again can succeed. */
export class Refused extends BackstopError {
  readonly target: string;
  readonly reason: Reason;
  readonly state: BreakerState;
  readonly retryAfterMs: number | undefined;
  /** Decided by the local fail-safe while Backstop was unreachable. */
  readonly local: boolean;

  constructor(target: string, reason: Reason, state: BreakerState, retryAfterMs: number | undefined, local: boolean) {
    const after = retryAfterMs === undefined ? '' : `, retry in ${formatMs(retryAfterMs)}`;
    super(`${target}: refused: ${reason}${after}${local ? ' (local fail-safe)' : ''}`);
    this.target = target;
    this.reason = reason;
    this.state = state;
    this.retryAfterMs = retryAfterMs;
    this.local = local;
  }

  /** `retryAfterMs` in seconds (the unit of HTTP's Retry-After and of the Python client). */
  get retryAfter(): number | undefined {
    return this.retryAfterMs === undefined ? undefined : this.retryAfterMs / 1000;
  }
}

/** The breaker is open or forced open, every probe slot is taken, or every key slot is disabled. */
export class CircuitOpen extends Refused {}
/**
 * A budget is spent, the provider asked the fleet to pause, or the fleet's
 * retry budget is spent. PriorityReserved and SpendLimitExceeded are budget
 * refusals too, so `instanceof RateLimited` waits them out as well.
 */
export class RateLimited extends Refused {}
/**
 * The budget's remaining room is reserved for higher priorities (its
 * `reserve`): this priority fits again after `retryAfterMs`. Not the
 * provider's fault, and not counted against the breaker.
 */
export class PriorityReserved extends RateLimited {}
/**
 * A spend limit (money per window, on the target or a budget group it draws
 * on) would be exceeded by this call's reservation (estimated tokens at the
 * input price + `maxOutputTokens` at the output price); `retryAfterMs` says
 * when the window frees enough. Not the provider's fault, and not counted
 * against the breaker.
 */
export class SpendLimitExceeded extends RateLimited {}
/** `estimatedTokens` exceeds what the target's token budget can ever admit. */
export class RequestTooLarge extends Refused {}
/** Policy `fail_closed`: Backstop is unreachable, so the call is refused. */
export class BackstopUnreachable extends Refused {}

const CIRCUIT: ReadonlySet<Reason> = new Set(['circuit_open', 'probe_limit', 'forced_open', 'key_slots_unavailable']);
const RATE: ReadonlySet<Reason> = new Set(['rate_limited', 'concurrency_limit', 'retry_budget_exhausted']);

/** The most specific Refused subclass for `reason`. */
export function refusal(
  target: string,
  reason: Reason,
  state: BreakerState,
  retryAfterMs: number | undefined,
  local: boolean,
): Refused {
  const cls = CIRCUIT.has(reason)
    ? CircuitOpen
    : RATE.has(reason)
      ? RateLimited
      : reason === 'priority_reserved'
        ? PriorityReserved
        : reason === 'spend_limit'
          ? SpendLimitExceeded
          : reason === 'request_too_large'
            ? RequestTooLarge
            : reason === 'control_plane_unavailable'
              ? BackstopUnreachable
              : Refused;
  return new cls(target, reason, state, retryAfterMs, local);
}

export function formatMs(msValue: number): string {
  return msValue >= 1000 ? `${+(msValue / 1000).toPrecision(3)}s` : `${Math.round(msValue)}ms`;
}

export function describeAttempt(e: AttemptError): string {
  if (e.outcome !== undefined) {
    const what = e.httpStatus ? `${e.outcome} (http ${e.httpStatus})` : e.outcome;
    return e.message ? `${e.target}: ${what}: ${e.message}` : `${e.target}: ${what}`;
  }
  const tail = e.retryAfterMs === undefined ? '' : `, retry in ${formatMs(e.retryAfterMs)}`;
  return `${e.target}: ${e.reason ?? 'refused'}${tail}`;
}

/**
 * Every target of a route failed or was unavailable. `errors` lists every
 * attempt and every skipped target in route order, so the message reads like
 * a post-mortem; `retryAfterMs` is when the soonest target may be available.
 */
export class AllTargetsFailed extends BackstopError {
  readonly route: string;
  readonly errors: readonly AttemptError[];
  readonly retryAfterMs: number | undefined;
  /** Set when `defer` was asked for but the request could not be saved. */
  readonly deferError: unknown;

  constructor(
    route: string,
    errors: readonly AttemptError[],
    retryAfterMs: number | undefined,
    deferError?: unknown,
    note = '',
  ) {
    const targets = [...new Set(errors.map((e) => e.target))];
    const lines = [`all targets failed for ${route}${targets.length ? ` (${targets.length} tried or skipped)` : ''}:`];
    for (const e of errors) lines.push(`  - ${describeAttempt(e)}`);
    if (note) lines.push(`  (${note})`);
    if (retryAfterMs !== undefined) lines.push(`  soonest retry in ${formatMs(retryAfterMs)}`);
    if (deferError !== undefined) lines.push(`  and the request could not be deferred: ${String(deferError)}`);
    super(lines.join('\n'), deferError === undefined ? undefined : { cause: deferError });
    this.route = route;
    this.errors = errors;
    this.retryAfterMs = retryAfterMs;
    this.deferError = deferError;
  }

  get retryAfter(): number | undefined {
    return this.retryAfterMs === undefined ? undefined : this.retryAfterMs / 1000;
  }
}

/** The reply still did not match the schema after `maxCorrections` correction prompts. */
export class StructuredOutputError extends BackstopError {
  readonly reply: string;
  readonly errors: readonly string[];
  readonly corrections: number;

  constructor(reply: string, errors: readonly string[], corrections: number) {
    super(`structured output still invalid after ${corrections} correction(s): ${errors[errors.length - 1] ?? 'no reply'}`);
    this.reply = reply;
    this.errors = errors;
    this.corrections = corrections;
  }
}

/**
 * A reply that did not parse or validate. Thrown inside `guard()` / `call()`
 * it is reported as PARTIAL (the provider answered; the answer was unusable).
 */
export class MalformedOutput extends BackstopError {
  readonly reply: string;
  constructor(message: string, reply = '') {
    super(message);
    this.reply = reply;
  }
}

/**
 * The server rejected a request (INVALID_ARGUMENT, NOT_FOUND for an unknown
 * route, UNAUTHENTICATED...). `code` is the gRPC status code number.
 */
export class ControlPlaneError extends BackstopError {
  readonly code: number;
  readonly details: string;
  readonly method: string;
  constructor(method: string, code: number, details: string, codeName: string) {
    super(`${method}: ${codeName}: ${details}`);
    this.code = code;
    this.details = details;
    this.method = method;
  }
}

/** Backstop could not be reached (queue and admin calls; decisions never throw it, they go local). */
export class ControlPlaneUnavailable extends ControlPlaneError {}

/**
 * Backstop refused the call's credentials (UNAUTHENTICATED): no token, or one
 * it does not accept (see the `token` option).
 */
export class Unauthenticated extends ControlPlaneError {}

/** The caller's principal lacks the role the call needs (PERMISSION_DENIED; the message names the role). */
export class PermissionDenied extends ControlPlaneError {}
