/**
 * Test helpers (`@backstop/client/testing`): the real Backstop server in a
 * child process on a free port, and provider errors shaped exactly like the
 * ones the `openai` and `@anthropic-ai/sdk` packages throw, so an agent's
 * resilience can be tested against the real control plane without network
 * access, API keys or the SDKs themselves.
 *
 * ```ts
 * const server = await BackstopServer.start(CONFIG_TOML);
 * const bs = new Backstop(server.address);
 * await assert.rejects(bs.guard('anthropic/sonnet', () => { throw overloaded(); }));
 * await server.kill(); await server.restart();   // same port
 * ```
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

/** The `backstop` binary: `explicit`, else `$BACKSTOP_BIN`. */
export function findBinary(explicit?: string): string {
  for (const candidate of [explicit, process.env.BACKSTOP_BIN]) {
    if (!candidate) continue;
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // try the next one
    }
  }
  throw new Error(
    'cannot find the backstop binary: set BACKSTOP_BIN (e.g. target/debug/backstop after `cargo build`) or pass binary',
  );
}

export interface ServerOptions {
  binary?: string;
  /** 0 picks a free port; restart() reuses the one bound. */
  port?: number;
  extraArgs?: string[];
  startupTimeoutMs?: number;
}

/** `backstop serve` with a TOML config on a free loopback port, with a data directory kept across restarts. */
export class BackstopServer {
  readonly binary: string;
  readonly dir: string;
  readonly configPath: string;
  port: number;
  fields: Record<string, string> = {};
  logs = '';
  private proc: ChildProcess | undefined;
  private readonly extraArgs: string[];
  private readonly startupTimeoutMs: number;

  constructor(config = '', opts: ServerOptions = {}) {
    this.binary = findBinary(opts.binary);
    this.dir = mkdtempSync(join(tmpdir(), 'backstop-test-'));
    this.configPath = join(this.dir, 'backstop.toml');
    writeFileSync(this.configPath, config);
    this.port = opts.port ?? 0;
    this.extraArgs = opts.extraArgs ?? [];
    this.startupTimeoutMs = opts.startupTimeoutMs ?? 30_000;
  }

  static async start(config = '', opts: ServerOptions = {}): Promise<BackstopServer> {
    return new BackstopServer(config, opts).start();
  }

  /** `127.0.0.1:PORT` of the gRPC listener. */
  get address(): string {
    const a = this.fields.grpc;
    if (!a) throw new Error('the server is not running');
    return a;
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  get running(): boolean {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async start(): Promise<this> {
    if (this.running) throw new Error('already running');
    const args = [
      'serve',
      '--config', this.configPath,
      '--listen', `127.0.0.1:${this.port}`,
      '--http', '127.0.0.1:0',
      '--data-dir', join(this.dir, 'data'),
      ...this.extraArgs,
    ];
    const proc = spawn(this.binary, args, {
      cwd: this.dir,
      env: { RUST_LOG: 'warn', ...process.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    proc.stderr?.on('data', (b: Buffer) => {
      this.logs = (this.logs + b.toString()).slice(-65536);
    });
    const fields = await new Promise<Record<string, string> | undefined>((resolve) => {
      const timer = setTimeout(() => resolve(undefined), this.startupTimeoutMs);
      const lines = createInterface({ input: proc.stdout as NodeJS.ReadableStream });
      lines.on('line', (line) => {
        if (!line.startsWith('backstop listening')) return;
        clearTimeout(timer);
        resolve(Object.fromEntries(line.split(/\s+/).slice(2).filter((kv) => kv.includes('=')).map((kv) => kv.split('=', 2) as [string, string])));
      });
      proc.once('exit', () => {
        clearTimeout(timer);
        resolve(undefined);
      });
    });
    if (!fields?.grpc) {
      await this.kill();
      throw new Error(`backstop did not start; its log:\n${this.logs}`);
    }
    this.fields = fields;
    this.port = Number(fields.grpc.slice(fields.grpc.lastIndexOf(':') + 1));
    return this;
  }

  private async signal(sig: NodeJS.Signals): Promise<void> {
    const proc = this.proc;
    if (!proc || !this.running) return;
    const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
    proc.kill(sig);
    await exited;
  }

  /** SIGKILL: a crash. */
  kill(): Promise<void> {
    return this.signal('SIGKILL');
  }

  /** SIGTERM: a graceful drain. */
  stop(): Promise<void> {
    return this.signal('SIGTERM');
  }

  /** Starts again on the same port and data directory (retrying while the port is still being released). */
  async restart(retries = 50): Promise<this> {
    await this.kill();
    let last: unknown;
    for (let i = 0; i < retries; i++) {
      try {
        return await this.start();
      } catch (e) {
        last = e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    throw new Error(`backstop did not restart on port ${this.port}: ${String(last)}`);
  }

  async close(): Promise<void> {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// --- provider errors shaped like the SDKs' -------------------------------------------------

export type Sdk = 'anthropic' | 'openai';

export interface FakeErrorSpec {
  status: number;
  sdk?: Sdk;
  error?: { type?: string; code?: string; message?: string };
  headers?: Record<string, string>;
}

/** The SDKs' base error class shape: status, headers (a WHATWG Headers), the JSON body as `error`. */
export class APIError extends Error {
  readonly status: number | undefined;
  readonly headers: Headers | undefined;
  readonly error: unknown;
  readonly type: string | null | undefined;
  readonly code?: string | null | undefined;
  readonly param?: string | null | undefined;
  constructor(status: number | undefined, error: unknown, message: string, headers: Headers | undefined, extra: { type?: string | null; code?: string | null; param?: string | null } = {}) {
    super(message);
    this.status = status;
    this.headers = headers;
    this.error = error;
    this.type = extra.type;
    if ('code' in extra) this.code = extra.code;
    if ('param' in extra) this.param = extra.param;
  }
}
export class BadRequestError extends APIError {}
export class AuthenticationError extends APIError {}
export class PermissionDeniedError extends APIError {}
export class NotFoundError extends APIError {}
export class ConflictError extends APIError {}
export class UnprocessableEntityError extends APIError {}
export class RateLimitError extends APIError {}
export class InternalServerError extends APIError {}
export class APIConnectionError extends APIError {
  constructor(message = 'Connection error.') {
    super(undefined, undefined, message, undefined);
  }
}
export class APIConnectionTimeoutError extends APIConnectionError {
  constructor(message = 'Request timed out.') {
    super(message);
  }
}

const CLASSES: Record<number, typeof APIError> = {
  400: BadRequestError,
  401: AuthenticationError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  422: UnprocessableEntityError,
  429: RateLimitError,
};

/**
 * The error the `@anthropic-ai/sdk` (default) or `openai` package throws for an
 * HTTP error response: the class its `APIError.generate` picks for the status,
 * message `"STATUS MSG"`, `headers` as a Headers object, and `error` = the
 * whole body (Anthropic) or its inner `error` object (OpenAI, which also
 * copies `type`, `code` and `param` onto the error).
 */
export function apiError(spec: FakeErrorSpec): APIError {
  const { status } = spec;
  const headers = new Headers(spec.headers ?? {});
  const Cls = CLASSES[status] ?? (status >= 500 ? InternalServerError : APIError);
  const e = spec.error ?? {};
  if (spec.sdk === 'openai') {
    const inner = { message: e.message ?? '', type: e.type ?? null, param: null, code: e.code ?? null };
    return new Cls(status, inner, `${status} ${inner.message || JSON.stringify(inner)}`, headers, {
      type: inner.type,
      code: inner.code,
      param: null,
    });
  }
  const body: { type: 'error'; error: Record<string, string> } = { type: 'error', error: {} };
  if (e.type !== undefined) body.error.type = e.type;
  if (e.message !== undefined) body.error.message = e.message;
  return new Cls(status, body, `${status} ${JSON.stringify(body)}`, headers, { type: e.type ?? null });
}

/** Anthropic's 529 overloaded_error. */
export const overloaded = (): APIError =>
  apiError({ status: 529, error: { type: 'overloaded_error', message: 'Overloaded' } });

/** OpenAI's 429 with a retry hint (`retry-after-ms`). */
export const rateLimitedOpenAI = (retryAfterMs = 1000): APIError =>
  apiError({
    status: 429,
    sdk: 'openai',
    error: { type: 'requests', code: 'rate_limit_exceeded', message: 'Rate limit reached for requests' },
    headers: { 'retry-after-ms': String(retryAfterMs) },
  });

/** Anthropic's 401 authentication_error. */
export const unauthorized = (): APIError =>
  apiError({ status: 401, error: { type: 'authentication_error', message: 'invalid x-api-key' } });

/** OpenAI's 400 context_length_exceeded for a prompt of `tokens`. */
export const contextLength = (tokens = 150000, window = 128000): APIError =>
  apiError({
    status: 400,
    sdk: 'openai',
    error: {
      type: 'invalid_request_error',
      code: 'context_length_exceeded',
      message: `This model's maximum context length is ${window} tokens. However, your messages resulted in ${tokens} tokens.`,
    },
  });

/**
 * How the client names a wire event (what `watch()` yields), for tests that
 * check every event kind the server can send has a name.
 */
export { toEvent } from './events.js';
