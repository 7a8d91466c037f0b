/**
 * The event stream (`Events.Watch`) as an async iterator that survives
 * reconnects: it resumes after the last seen `seq` (the server replays what
 * was missed, or answers a Gap and a fresh Snapshot when it cannot).
 */
import * as grpc from '@grpc/grpc-js';
import { breakerState } from './convert.js';
import { type Event, EventKind } from './gen/backstop/v1/events.js';
import type { Transport } from './transport.js';
import type { BreakerState } from './types.js';

/** Names of the event kinds, lower-case without prefix (`'breaker_transition'`, ...). Unknown kinds read as `'unspecified'`. */
export type EventKindName =
  | 'unspecified'
  | 'snapshot'
  | 'breaker_transition'
  | 'probe_expired'
  | 'target_forced'
  | 'rate_limited'
  | 'budget_restored'
  | 'fallback_activated'
  | 'route_exhausted'
  | 'gap'
  | 'key_slot_disabled'
  | 'target_reset'
  | 'deferred'
  | 'drained'
  | 'dead_lettered'
  | 'redis_unavailable'
  | 'redis_restored'
  | 'config_mismatch'
  | 'config_reloaded'
  | 'target_removed'
  | 'spend_limit_reached'
  | 'limit_adapted'
  | 'operator_action';

export interface BackstopEvent {
  readonly seq: number;
  readonly at: Date | undefined;
  /** The target, or the route / queue for route and queue events. */
  readonly kind: EventKindName;
  readonly target: string;
  /** For breaker transitions: the states, as names. */
  readonly from?: BreakerState;
  readonly to?: BreakerState;
  /** The wire message, for every detail of every kind. */
  readonly raw: Event;
}

export interface WatchOptions {
  /** Resume after this seq (0 = a fresh snapshot, then live events). */
  sinceSeq?: number;
  /** Only these targets / routes / queues. */
  targets?: readonly string[];
  /** Only these kinds (Snapshot and Gap always come). */
  kinds?: readonly EventKindName[];
  signal?: AbortSignal;
  /** Reconnect and resume when the stream drops (default true). */
  resume?: boolean;
}

const FIELDS: ReadonlyArray<[keyof Event, EventKindName]> = [
  ['snapshot', 'snapshot'],
  ['breakerTransition', 'breaker_transition'],
  ['probeExpired', 'probe_expired'],
  ['targetForced', 'target_forced'],
  ['rateLimited', 'rate_limited'],
  ['budgetRestored', 'budget_restored'],
  ['fallbackActivated', 'fallback_activated'],
  ['routeExhausted', 'route_exhausted'],
  ['gap', 'gap'],
  ['keySlotDisabled', 'key_slot_disabled'],
  ['targetReset', 'target_reset'],
  ['deferred', 'deferred'],
  ['drained', 'drained'],
  ['deadLettered', 'dead_lettered'],
  // Cluster mode (a replica lost / regained Redis; replicas run different configs).
  ['redisUnavailable', 'redis_unavailable'],
  ['redisRestored', 'redis_restored'],
  ['configMismatch', 'config_mismatch'],
  // A config reload (SIGHUP or Admin/ReloadConfig), and a target it dropped.
  ['configReloaded', 'config_reloaded'],
  ['targetRemoved', 'target_removed'],
  // A spend limit started refusing; an adaptive concurrency limit moved.
  ['spendLimitReached', 'spend_limit_reached'],
  ['limitAdapted', 'limit_adapted'],
  // The audit of an operator action (who, of which tenant, what, why).
  ['operatorAction', 'operator_action'],
];

export function toEvent(e: Event): BackstopEvent {
  const kind = FIELDS.find(([field]) => e[field] !== undefined)?.[1] ?? 'unspecified';
  const t = e.breakerTransition;
  return {
    seq: e.seq,
    at: e.at,
    kind,
    target: e.target,
    ...(t ? { from: breakerState(t.from), to: breakerState(t.to) } : {}),
    raw: e,
  };
}

function kindValue(name: EventKindName): EventKind {
  const v = (EventKind as unknown as Record<string, number>)[`EVENT_KIND_${name.toUpperCase()}`];
  if (v === undefined) throw new TypeError(`unknown event kind '${name}'`);
  return v as EventKind;
}

export async function* watchEvents(
  transport: Transport,
  opts: WatchOptions,
  reconnectMs: number,
): AsyncGenerator<BackstopEvent, void, undefined> {
  const kinds = (opts.kinds ?? []).map(kindValue);
  let since = opts.sinceSeq ?? 0;
  const { signal } = opts;
  while (!signal?.aborted) {
    const call = transport.events.watch({ sinceSeq: since, targets: [...(opts.targets ?? [])], kinds }, transport.metadata());
    const onAbort = (): void => call.cancel();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const raw of call as AsyncIterable<Event>) {
        const ev = toEvent(raw);
        if (ev.seq > 0) since = ev.seq;
        yield ev;
      }
      if (opts.resume === false) return;
    } catch (e) {
      const code = (e as { code?: number }).code;
      if (signal?.aborted || code === grpc.status.CANCELLED) return;
      if (opts.resume === false || (code !== grpc.status.UNAVAILABLE && code !== grpc.status.INTERNAL)) throw e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      call.cancel();
    }
    await new Promise((r) => setTimeout(r, reconnectMs));
  }
}
