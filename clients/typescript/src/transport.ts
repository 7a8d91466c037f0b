/**
 * The wire: one gRPC channel shared by the generated service clients, with
 * credentials (plaintext or TLS), bearer-token metadata and per-call deadlines.
 *
 * Decisions go through the `DecisionTransport` interface, implemented here
 * with unary calls and in `stream.ts` over one bidirectional `Decide` stream
 * (the default); nothing above these files needs to know which one is in use.
 */
import * as grpc from '@grpc/grpc-js';
import { AdminClient } from './gen/backstop/v1/admin.js';
import { DeferredClient } from './gen/backstop/v1/deferred.js';
import { EventsClient } from './gen/backstop/v1/events.js';
import {
  type CanProceedRequest,
  type CanProceedResponse,
  type RecordOutcomeBatchRequest,
  type RecordOutcomeBatchResponse,
  type RecordOutcomeRequest,
  type RecordOutcomeResponse,
  ResilienceClient,
  type RouteRequest,
  type RouteResponse,
} from './gen/backstop/v1/resilience.js';
import { ControlPlaneError, ControlPlaneUnavailable, PermissionDenied, Unauthenticated } from './errors.js';

/** TLS settings (PEM). Without them the channel is plaintext. */
export interface TlsOptions {
  /** CA certificates to trust (default: Node's root store). */
  rootCerts?: Buffer | string;
  /** Client certificate chain and key, for mutual TLS. */
  certChain?: Buffer | string;
  privateKey?: Buffer | string;
  /** Expected server name when it differs from the address's host (tests, IPs). */
  serverName?: string;
}

export interface TransportOptions {
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string | undefined;
  /** Admin calls send this one instead, when given (the server's `[server] admin_token`). */
  adminToken?: string | undefined;
  tls?: TlsOptions | undefined;
  /** Ready-made grpc-js credentials; wins over `tls`. */
  credentials?: grpc.ChannelCredentials | undefined;
  /** Extra grpc-js channel options. */
  channelOptions?: grpc.ChannelOptions | undefined;
  reconnectBackoffMs: number;
}

/** gRPC codes that mean "Backstop cannot answer right now", as opposed to "Backstop said no". */
export const OUTAGE_CODES: ReadonlySet<number> = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

export function controlPlaneError(method: string, err: unknown): ControlPlaneError {
  const e = err as Partial<grpc.ServiceError>;
  const code = typeof e.code === 'number' ? e.code : grpc.status.UNKNOWN;
  const details = typeof e.details === 'string' ? e.details : String(err);
  const name = grpc.status[code] ?? String(code);
  const Cls = OUTAGE_CODES.has(code)
    ? ControlPlaneUnavailable
    : code === grpc.status.UNAUTHENTICATED
      ? Unauthenticated
      : code === grpc.status.PERMISSION_DENIED
        ? PermissionDenied
        : ControlPlaneError;
  return new Cls(method, code, details, name);
}

/** Per-decision options: an AbortSignal rejects the decision with its reason. */
export interface DecisionCallOptions {
  signal?: AbortSignal | undefined;
}

/**
 * The decision calls: unary RPCs (`Transport`) or items on one Decide stream
 * (`StreamTransport`). Outages reject with ControlPlaneUnavailable, server
 * refusals (INVALID_ARGUMENT, NOT_FOUND...) with ControlPlaneError, either way.
 */
export interface DecisionTransport {
  canProceed(req: CanProceedRequest, timeoutMs: number, opts?: DecisionCallOptions): Promise<CanProceedResponse>;
  recordOutcome(req: RecordOutcomeRequest, timeoutMs: number, opts?: DecisionCallOptions): Promise<RecordOutcomeResponse>;
  route(req: RouteRequest, timeoutMs: number, opts?: DecisionCallOptions): Promise<RouteResponse>;
  recordOutcomeBatch(req: RecordOutcomeBatchRequest, timeoutMs: number): Promise<RecordOutcomeBatchResponse>;
}

type Callback<R> = (err: grpc.ServiceError | null, res: R) => void;
type UnaryMethod<Q, R> = (req: Q, md: grpc.Metadata, opts: Partial<grpc.CallOptions>, cb: Callback<R>) => grpc.ClientUnaryCall;

const HEALTH_METHOD = '/grpc.health.v1.Health/Check';
// grpc.health.v1.HealthCheckRequest{service: "backstop.v1.Resilience"}, hand-encoded
// (one length-delimited field) so the client needs no health-checking package.
const HEALTH_SERVICE = Buffer.from('backstop.v1.Resilience');
const HEALTH_REQUEST = Buffer.concat([Buffer.from([0x0a, HEALTH_SERVICE.length]), HEALTH_SERVICE]);
const HEALTH_SERVING = Buffer.from([0x08, 0x01]);

export class Transport implements DecisionTransport {
  readonly channel: grpc.Channel;
  readonly resilience: ResilienceClient;
  readonly admin: AdminClient;
  readonly deferred: DeferredClient;
  readonly events: EventsClient;
  private readonly raw: grpc.Client;
  private readonly token: string | undefined;
  private readonly adminToken: string | undefined;

  constructor(address: string, opts: TransportOptions) {
    const creds = opts.credentials ?? credentialsFor(opts.tls);
    const channelOptions: grpc.ChannelOptions = {
      // Reconnect quickly after an outage, so switching back is prompt.
      'grpc.initial_reconnect_backoff_ms': opts.reconnectBackoffMs,
      'grpc.min_reconnect_backoff_ms': opts.reconnectBackoffMs,
      'grpc.max_reconnect_backoff_ms': Math.max(opts.reconnectBackoffMs, 2000),
      ...(opts.tls?.serverName ? { 'grpc.ssl_target_name_override': opts.tls.serverName } : {}),
      ...opts.channelOptions,
    };
    this.channel = new grpc.Channel(address, creds, channelOptions);
    const shared = { channelOverride: this.channel };
    this.resilience = new ResilienceClient(address, creds, shared);
    this.admin = new AdminClient(address, creds, shared);
    this.deferred = new DeferredClient(address, creds, shared);
    this.events = new EventsClient(address, creds, shared);
    this.raw = new grpc.Client(address, creds, shared);
    this.token = opts.token;
    this.adminToken = opts.adminToken ?? opts.token;
  }

  metadata(admin = false): grpc.Metadata {
    const md = new grpc.Metadata();
    const token = admin ? this.adminToken : this.token;
    if (token) md.set('authorization', `Bearer ${token}`);
    return md;
  }

  /**
   * One unary call with a deadline; gRPC errors become ControlPlaneError (or
   * ControlPlaneUnavailable for UNAVAILABLE / DEADLINE_EXCEEDED). An AbortSignal
   * cancels the call.
   */
  unary<Q, R>(
    client: grpc.Client,
    method: UnaryMethod<Q, R>,
    name: string,
    req: Q,
    timeoutMs: number,
    opts: { admin?: boolean; signal?: AbortSignal | undefined } = {},
  ): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      const { signal } = opts;
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      let onAbort: (() => void) | undefined;
      const call = method.call(
        client,
        req,
        this.metadata(opts.admin),
        { deadline: new Date(Date.now() + timeoutMs) },
        (err, res) => {
          if (onAbort) signal?.removeEventListener('abort', onAbort);
          if (err) {
            if (signal?.aborted && err.code === grpc.status.CANCELLED) reject(signal.reason);
            else reject(controlPlaneError(name, err));
          } else resolve(res);
        },
      );
      if (signal) {
        onAbort = () => call.cancel();
        signal.addEventListener('abort', onAbort, { once: true });
      }
    });
  }

  canProceed(req: CanProceedRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<CanProceedResponse> {
    return this.unary(this.resilience, this.resilience.canProceed, 'CanProceed', req, timeoutMs, { signal: opts.signal });
  }

  recordOutcome(req: RecordOutcomeRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<RecordOutcomeResponse> {
    return this.unary(this.resilience, this.resilience.recordOutcome, 'RecordOutcome', req, timeoutMs, { signal: opts.signal });
  }

  route(req: RouteRequest, timeoutMs: number, opts: DecisionCallOptions = {}): Promise<RouteResponse> {
    return this.unary(this.resilience, this.resilience.route, 'Route', req, timeoutMs, { signal: opts.signal });
  }

  recordOutcomeBatch(req: RecordOutcomeBatchRequest, timeoutMs: number): Promise<RecordOutcomeBatchResponse> {
    return this.unary(this.resilience, this.resilience.recordOutcomeBatch, 'RecordOutcomeBatch', req, timeoutMs);
  }

  /** Waits until the channel is connected, or rejects after `timeoutMs`. */
  waitForReady(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.raw.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve()));
    });
  }

  /**
   * True when the health service says SERVING (or answers at all without
   * one); false while Backstop cannot be reached.
   */
  async health(timeoutMs: number): Promise<boolean> {
    try {
      await this.waitForReady(timeoutMs);
    } catch {
      return false;
    }
    return new Promise((resolve) => {
      this.raw.makeUnaryRequest<Buffer, Buffer>(
        HEALTH_METHOD,
        (b) => b,
        (b) => b,
        HEALTH_REQUEST,
        this.metadata(),
        { deadline: new Date(Date.now() + timeoutMs) },
        (err, res) => {
          // Any answer but an outage means reachable (e.g. a server without the health service).
          if (err) resolve(!OUTAGE_CODES.has(err.code) && err.code !== grpc.status.CANCELLED);
          else resolve(res !== undefined && Buffer.from(res).equals(HEALTH_SERVING));
        },
      );
    });
  }

  close(): void {
    for (const c of [this.resilience, this.admin, this.deferred, this.events, this.raw]) c.close();
    this.channel.close();
  }
}

export function credentialsFor(tls: TlsOptions | undefined): grpc.ChannelCredentials {
  if (!tls) return grpc.credentials.createInsecure();
  const buf = (v: Buffer | string | undefined): Buffer | null => (v === undefined ? null : Buffer.from(v));
  if ((tls.certChain === undefined) !== (tls.privateKey === undefined)) {
    throw new TypeError('tls.certChain and tls.privateKey go together (mutual TLS needs both)');
  }
  return grpc.credentials.createSsl(buf(tls.rootCerts), buf(tls.privateKey), buf(tls.certChain));
}
