/**
 * Typed results of Backstop calls.
 *
 * The wire types (`./gen`) use numeric protobuf enums and Duration messages;
 * these are plain values: enums as lower-case string names without their
 * prefix (`'circuit_open'`, the same names the Python client and the
 * conformance scenarios use) and durations as milliseconds. A value this
 * client does not know yet (a newer server) reads as `'unspecified'`, so an
 * old client keeps working against a new server.
 *
 * Every decision says whether it came from the server or from the client's
 * local fail-safe (`local`), so an agent can tell a fleet decision from one
 * taken alone while Backstop was unreachable.
 */

export type BreakerState = 'unspecified' | 'closed' | 'open' | 'half_open' | 'forced_open' | 'forced_closed';

/**
 * Why a call was admitted or refused. `control_plane_unavailable` is
 * client-side only: the refusal of the `fail_closed` policy.
 */
export type Reason =
  | 'unspecified'
  | 'allowed'
  | 'circuit_open'
  | 'probe_limit'
  | 'forced_open'
  | 'rate_limited'
  | 'concurrency_limit'
  | 'retry_budget_exhausted'
  | 'key_slots_unavailable'
  | 'request_too_large'
  | 'excluded'
  | 'context_too_small'
  | 'priority_reserved'
  | 'spend_limit'
  | 'control_plane_unavailable';

/**
 * The failure taxonomy. `unspecified` in a report lets the server classify
 * from the HTTP status, error type and headers, which is what the client does
 * whenever the provider answered with a status.
 */
export type OutcomeClass =
  | 'unspecified'
  | 'success'
  | 'transient'
  | 'rate_limited'
  | 'persistent'
  | 'bad_input'
  | 'partial'
  | 'timeout';

export type RetryReason =
  | 'unspecified'
  | 'succeeded'
  | 'retryable'
  | 'persistent'
  | 'bad_input'
  | 'max_retries'
  | 'retry_budget_exhausted'
  | 'correct_and_retry'
  /** The target's breaker is open (perhaps opened by this outcome): fall back or defer; `delayMs` is when it admits again. */
  | 'circuit_open';

export type BreakerMode = 'automatic' | 'force_open' | 'force_closed';

/**
 * How urgent a call is. A budget may reserve headroom for higher priorities
 * (`reserve = { interactive = 0.2 }`): when it runs low, `batch` and `default`
 * calls are refused with `priority_reserved` while `interactive` ones keep
 * flowing. Unset means `default`.
 */
export type Priority = 'interactive' | 'default' | 'batch';

/**
 * How Route orders a route's candidates. In a request, unset (or
 * `unspecified`) means the route's own strategy (`ordered` for a list of targets).
 */
export type RouteStrategy =
  | 'unspecified'
  /** First admissible in list order: a fallback list. */
  | 'ordered'
  /** Random by the route's weights among admissible candidates. */
  | 'weighted'
  /** Fewest outstanding permits. */
  | 'least_busy'
  /** Lowest recent latency, with a small exploration share. */
  | 'lowest_latency'
  /** Lowest expected price: estimated tokens at the input price + expectedOutputTokens at the output price. */
  | 'lowest_cost'
  /** Largest remaining budget fraction. */
  | 'most_headroom';

/** The answer to "may I call `target` now?" (CanProceed). */
export interface Admission {
  readonly target: string;
  readonly allowed: boolean;
  readonly reason: Reason;
  readonly state: BreakerState;
  /** When refused: milliseconds until asking again can succeed (undefined if unknown). */
  readonly retryAfterMs: number | undefined;
  /** Opaque: pass it back verbatim with the outcome (it releases reserved budget and makes a probe count). */
  readonly permit: string;
  /** Which of the target's API keys to use ('' when the target declares none). */
  readonly keySlot: string;
  /** Shadow mode: the refusal that would have been answered. */
  readonly shadowReason: Reason | undefined;
  /** Decided by the local fail-safe because Backstop was unreachable. */
  readonly local: boolean;
}

/** Whether and when to retry the call just reported. */
export interface RetryAdvice {
  readonly retry: boolean;
  /** Milliseconds to wait first: max(provider hint, jittered backoff). */
  readonly delayMs: number;
  readonly reason: RetryReason;
}

/** What Backstop (or the fail-safe) made of a reported outcome. */
export interface OutcomeResult {
  readonly target: string;
  readonly classifiedAs: OutcomeClass;
  readonly state: BreakerState;
  readonly retry: RetryAdvice;
  /** The permit was from an older breaker generation: counted, but did not move the breaker. */
  readonly stalePermit: boolean;
  /** This permit had been reported already: nothing changed, the answer repeats the first one. */
  readonly duplicate: boolean;
  /**
   * What the call cost at the target's prices (its usage times
   * cost_per_mtok_input / cost_per_mtok_output); 0 when the target is
   * unpriced, no usage was reported, or the fail-safe decided.
   */
  readonly cost: number;
  readonly local: boolean;
}

/** A route candidate passed over, and why. */
export interface Skip {
  readonly target: string;
  readonly reason: Reason;
  readonly retryAfterMs: number | undefined;
}

/** Which target of a route should serve now (Route). `target` is null when none can. */
export interface RouteDecision {
  readonly target: string | null;
  readonly permit: string;
  readonly keySlot: string;
  readonly fallbackDepth: number;
  readonly skipped: readonly Skip[];
  /** The chosen target's configured max_tokens (0 = not configured). */
  readonly maxTokens: number;
  readonly costPerMtokInput: number;
  readonly costPerMtokOutput: number;
  /** When no target is available: the soonest any may be tried. */
  readonly retryAfterMs: number | undefined;
  readonly state: BreakerState;
  readonly local: boolean;
  /** The strategy that ordered the candidates (the route's own, or the one the request asked for). */
  readonly strategy: RouteStrategy;
  /** Why this target, in words, e.g. "least_busy: b has the fewest permits outstanding (1)". */
  readonly reason: string;
}

/** One provider call's outcome, as sent to RecordOutcome. */
export interface OutcomeReport {
  target: string;
  permit: string;
  outcome: OutcomeClass;
  httpStatus: number;
  errorType: string;
  headers: Record<string, string>;
  latencyMs?: number | undefined;
  retryAfterMs?: number | undefined;
  inputTokens: number;
  outputTokens: number;
  attempt: number;
  keySlot: string;
  caller: string;
  /** The user request this call served (the same on all its retries and fallbacks); '' or unset: none. */
  requestId?: string | undefined;
  /** Set on a request's last outcome to close it in the same call (needs `requestId`). */
  finish?: RequestResult | undefined;
}

/** How a user request ended, after all its retries and fallbacks. */
export type RequestResult = 'completed' | 'deferred' | 'failed';

/** What `finishRequest()` got back. */
export interface FinishResult {
  /** True when this server saw the request start and measured it itself. */
  readonly tracked: boolean;
  /** True when the request had already been finished (nothing counted again). */
  readonly duplicate: boolean;
  /** From first admission to finish (or the client's `elapsedMs` when not tracked). */
  readonly durationMs: number;
  /** Outcomes reported for the request (or the client's `attempts` when not tracked). */
  readonly attempts: number;
  /** The route label it was counted under ('direct' when no configured route served it). */
  readonly route: string;
}

/** One failed attempt (or refusal, or skip) inside `call()`, for `AllTargetsFailed`. */
export interface AttemptError {
  readonly target: string;
  /** How the failure was classified (undefined for a refusal or a skip). */
  readonly outcome: OutcomeClass | undefined;
  readonly message: string;
  readonly httpStatus: number;
  /** For refusals and skips: why the target was not called. */
  readonly reason: Reason | undefined;
  readonly retryAfterMs: number | undefined;
  readonly attempt: number;
  readonly error?: unknown;
}

/** A request saved to the deferred queue because every target was unavailable. */
export interface Deferred {
  readonly deferred: true;
  readonly id: string;
  readonly queue: string;
  /** Meant for the end user ("your request has been saved..."). */
  readonly message: string;
  readonly duplicate: boolean;
  readonly depth: number;
  /** Why it was deferred: every attempt that failed first. */
  readonly errors: readonly AttemptError[];
}

/** A deferred item as the queue holds it. */
export interface DeferredItemData {
  readonly id: string;
  readonly queue: string;
  readonly payload: Uint8Array;
  readonly metadata: Readonly<Record<string, string>>;
  readonly leaseToken: string;
  /** 1 on the first delivery. */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** The target this delivery is admitted to, its permit and key slot. */
  readonly target: string;
  readonly permit: string;
  readonly keySlot: string;
  readonly lastError: string;
  readonly enqueuedAt: Date | undefined;
  readonly leaseExpiresAt: Date | undefined;
  readonly deadLetteredAt: Date | undefined;
}

export interface ClaimResult {
  readonly items: readonly DeferredItemData[];
  /** Why nothing was handed out (the queue's route is not admissible), and when to ask again. */
  readonly blockedReason: Reason | undefined;
  readonly retryAfterMs: number | undefined;
}

export interface NackResult {
  readonly deadLettered: boolean;
  readonly attempt: number;
}

export interface QueueStat {
  readonly queue: string;
  readonly depth: number;
  readonly inFlight: number;
  readonly deadLetters: number;
  /** Age of the oldest waiting or in-flight item (undefined when empty). */
  readonly oldestAgeMs: number | undefined;
  readonly bytes: number;
}

export interface OutcomeCounters {
  readonly admitted: number;
  readonly refused: number;
  readonly success: number;
  readonly transient: number;
  readonly rateLimited: number;
  readonly persistent: number;
  readonly badInput: number;
  readonly partial: number;
  readonly timeout: number;
  readonly stale: number;
}

export interface BudgetStatus {
  readonly kind: string;
  readonly limit: number;
  readonly windowMs: number | undefined;
  readonly available: number;
  readonly group: string;
}

export interface KeySlotStatus {
  readonly name: string;
  readonly disabled: boolean;
  readonly disabledUntil: Date | undefined;
  readonly disabledReason: string;
  /** The provider asked the fleet to pause until then. */
  readonly pausedUntil: Date | undefined;
  readonly inFlight: number;
  readonly budgets: readonly BudgetStatus[];
}

/** Everything Backstop knows about one target (Admin GetTarget). `raw` is the full wire message. */
export interface TargetStatus {
  readonly target: string;
  readonly state: BreakerState;
  readonly configured: boolean;
  readonly consecutiveFailures: number;
  readonly counters: OutcomeCounters;
  readonly openUntil: Date | undefined;
  readonly lastCause: string;
  readonly generation: number;
  readonly inFlight: number;
  readonly keySlots: readonly KeySlotStatus[];
  readonly raw: unknown;
}

export interface TargetSummary {
  readonly target: string;
  readonly state: BreakerState;
  readonly configured: boolean;
  readonly consecutiveFailures: number;
  readonly openUntil: Date | undefined;
}
