/**
 * TypeScript client for Backstop, the resilience control plane for fleets of
 * AI agents: one server owns the circuit breakers, rate-limit budgets, retry
 * budget and fallback order for a whole fleet; this package asks it before
 * every provider call and tells it what happened after.
 *
 * ```ts
 * import { Backstop } from '@backstop/client';
 * const bs = new Backstop('127.0.0.1:50051');
 * const reply = await bs.call('chat', ({ target, maxTokens }) => ask(target, prompt, maxTokens));
 * ```
 */
export { Backstop, GuardContext, newRequestId, sleep, structured } from './client.js';
export type {
  BackstopOptions,
  CallAttempt,
  CallFn,
  CallOptions,
  DeferOptions,
  GuardOptions,
  Logger,
  Policy,
} from './client.js';
export {
  AllTargetsFailed,
  BackstopError,
  BackstopUnreachable,
  CircuitOpen,
  ControlPlaneError,
  ControlPlaneUnavailable,
  MalformedOutput,
  PermissionDenied,
  PriorityReserved,
  RateLimited,
  Refused,
  RequestTooLarge,
  SpendLimitExceeded,
  StructuredOutputError,
  Unauthenticated,
} from './errors.js';
export {
  composeErrorType,
  contextTokensNeeded,
  httpStatusOf,
  normalizeHeaders,
  observeError,
  observeSuccess,
  usageOf,
} from './classify.js';
export type { Observed } from './classify.js';
export { DEFAULT_LOCAL_POLICY, LocalEngine, RouteMemory, classify, fullJitter, localPolicy, retryHintMs } from './local.js';
export type { LocalPolicy } from './local.js';
export { Structured, Validator, replyText } from './structured.js';
export type { Correction, JsonSchema, ReplyLike, Schema, StandardSchemaLike, StructuredOptions, ZodLike } from './structured.js';
export { ClaimedItem, DeferredWorker } from './worker.js';
export type { WorkerOptions, WorkerStats } from './worker.js';
export type { BackstopEvent, EventKindName, WatchOptions } from './events.js';
export type { DecisionCallOptions, DecisionTransport, TlsOptions } from './transport.js';
export type * from './types.js';
