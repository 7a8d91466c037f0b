/**
 * What a provider call produced, in RecordOutcome terms.
 *
 * Duck-typed on purpose: the `openai` and `@anthropic-ai/sdk` packages (and
 * fetch, undici, axios) throw errors carrying an HTTP status, the response
 * headers and a JSON error body under slightly different property names.
 * Reading those shapes here means this package depends on no provider SDK.
 *
 * When the provider answered with an HTTP status the client does NOT
 * classify: it sends the status, "type code: message" from the body and the
 * raw headers, and the server's taxonomy decides (one taxonomy for the whole
 * fleet: a 429 `insufficient_quota` is PERSISTENT, a 429 with `retry-after`
 * pauses the fleet). The client classifies only what the server cannot see:
 * timeouts, connection failures, unparseable replies and its own bugs.
 */
import { MalformedOutput, StructuredOutputError } from './errors.js';
import type { OutcomeClass } from './types.js';

/** The server's bounds on RecordOutcome.headers (`[server] max_headers` / `max_header_bytes` defaults). */
export const MAX_HEADERS = 64;
export const MAX_HEADER_BYTES = 16384;
/** The longest error_type the server accepts (bytes). */
export const MAX_ERROR_TYPE = 256;

/** Headers the server reads; kept first when a response has too many to send. */
const SIGNAL_PREFIXES = ['retry-after', 'x-ratelimit', 'anthropic-ratelimit', 'ratelimit', 'x-should-retry'];
const TIMEOUT_WORDS = ['timeout', 'timedout', 'deadline'];
const CONNECTION_WORDS = ['connection', 'connect', 'network', 'socket', 'fetcherror', 'unreachable'];
const TIMEOUT_CODES = new Set([
  'ETIMEDOUT',
  'ESOCKETTIMEDOUT',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'ECONNABORTED',
]);
const CONNECTION_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
]);

/** The fields of an outcome report derived from what the call produced. */
export interface Observed {
  outcome: OutcomeClass;
  httpStatus: number;
  errorType: string;
  headers: Record<string, string>;
  inputTokens: number;
  outputTokens: number;
  /** A short human description (for AllTargetsFailed and logs). */
  message: string;
}

type Bag = Record<string, unknown>;

const isObject = (v: unknown): v is Bag => typeof v === 'object' && v !== null;

function get(obj: unknown, key: string): unknown {
  return isObject(obj) ? obj[key] : undefined;
}

function intStatus(v: unknown): number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 100 && v <= 599 ? v : 0;
}

/** The HTTP status an error carries (`status`, `statusCode`, or its `response`'s), or 0. */
export function httpStatusOf(err: unknown): number {
  for (const key of ['status', 'statusCode', 'httpStatus']) {
    const s = intStatus(get(err, key));
    if (s) return s;
  }
  const resp = get(err, 'response');
  for (const key of ['status', 'statusCode']) {
    const s = intStatus(get(resp, key));
    if (s) return s;
  }
  return 0;
}

function headerPairs(headers: unknown): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  if (!isObject(headers)) return out;
  const push = (k: unknown, v: unknown): void => {
    if (v === undefined || v === null) return;
    const val = Array.isArray(v) ? v.map(String).join(', ') : String(v);
    out.push([String(k), val]);
  };
  // WHATWG Headers (current SDKs, fetch) and Map both iterate as [key, value].
  if (typeof (headers as { entries?: unknown }).entries === 'function' && !Array.isArray(headers)) {
    try {
      for (const kv of (headers as { entries(): Iterable<unknown> }).entries()) {
        if (Array.isArray(kv) && kv.length === 2) push(kv[0], kv[1]);
      }
      return out;
    } catch {
      return out;
    }
  }
  if (Array.isArray(headers)) {
    for (const kv of headers) if (Array.isArray(kv) && kv.length === 2) push(kv[0], kv[1]);
    return out;
  }
  for (const [k, v] of Object.entries(headers)) push(k, v);
  return out;
}

const byteLength = (s: string): number => Buffer.byteLength(s, 'utf8');

/**
 * Response headers as a plain object, lower-cased, trimmed to what the server
 * accepts: rate-limit and retry headers first, the rest filling up to the
 * server's limits. Repeated headers are joined with ", " (as HTTP allows).
 */
export function normalizeHeaders(headers: unknown): Record<string, string> {
  const merged = new Map<string, string>();
  for (const [k, v] of headerPairs(headers)) {
    const key = k.trim().toLowerCase();
    if (!key) continue;
    const prev = merged.get(key);
    merged.set(key, prev === undefined ? v : `${prev}, ${v}`);
  }
  const isSignal = (k: string): boolean => SIGNAL_PREFIXES.some((p) => k.startsWith(p));
  const keys = [...merged.keys()];
  const ordered = [...keys.filter(isSignal), ...keys.filter((k) => !isSignal(k))];
  const out: Record<string, string> = {};
  let size = 0;
  let count = 0;
  for (const k of ordered) {
    const v = merged.get(k) as string;
    const cost = byteLength(k) + byteLength(v);
    if (count >= MAX_HEADERS || size + cost > MAX_HEADER_BYTES) continue;
    out[k] = v;
    size += cost;
    count += 1;
  }
  return out;
}

function headersOf(err: unknown): Record<string, string> {
  const direct = get(err, 'headers');
  return normalizeHeaders(direct ?? get(get(err, 'response'), 'headers'));
}

function asBody(v: unknown): Bag | undefined {
  if (typeof v === 'string') {
    try {
      const parsed: unknown = JSON.parse(v);
      return isObject(parsed) ? parsed : undefined;
    } catch {
      return undefined;
    }
  }
  return isObject(v) && !(v instanceof Error) ? v : undefined;
}

/**
 * (type, code, message) of an SDK-shaped error. Anthropic keeps the whole body
 * (`{type: "error", error: {type, message}}`) as `err.error`; OpenAI keeps the
 * inner error object there and copies `type` / `code` onto the error; axios
 * has the body at `response.data`.
 */
export function errorFields(err: unknown): { type: string; code: string; message: string } {
  let type = '';
  let code = '';
  let message = '';
  const body = asBody(get(err, 'error')) ?? asBody(get(err, 'body')) ?? asBody(get(get(err, 'response'), 'data'));
  if (body) {
    const inner = isObject(body.error) ? body.error : body;
    if (typeof inner.type === 'string' && inner.type !== 'error') type = inner.type;
    const c = inner.code ?? inner.status;
    if (typeof c === 'string' || typeof c === 'number') code = String(c);
    if (typeof inner.message === 'string') message = inner.message;
  }
  const t = get(err, 'type');
  if (!type && typeof t === 'string') type = t;
  const c = get(err, 'code');
  if (!code && typeof c === 'string') code = c;
  if (!message) {
    const m = get(err, 'message');
    if (typeof m === 'string') message = m;
  }
  return { type, code, message };
}

/** Clips to `limit` UTF-8 bytes without splitting a character. */
export function clip(s: string, limit: number): string {
  if (byteLength(s) <= limit) return s;
  let out = '';
  let used = 0;
  for (const ch of s) {
    const n = byteLength(ch);
    if (used + n > limit) break;
    out += ch;
    used += n;
  }
  return out;
}

/**
 * The error_type sent to the server: type, code and message. The server
 * matches markers as substrings ("insufficient_quota", "credit balance",
 * "per day"...) and some only ever appear in the message (Anthropic's "Your
 * credit balance is too low" is a 400 invalid_request_error), so the message
 * is included, clipped to the server's 256-byte limit.
 */
export function composeErrorType(type: string, code: string, message: string): string {
  const parts: string[] = [];
  for (const p of [type, code]) if (p && !parts.includes(p)) parts.push(p);
  let head = parts.join(' ');
  if (message) head = head ? `${head}: ${message}` : message;
  return clip(head.split(/\s+/).filter(Boolean).join(' '), MAX_ERROR_TYPE);
}

/** Lower-cased class names along the prototype chain, plus `name`: "apiconnectiontimeouterror apiconnectionerror ...". */
function nameChain(err: unknown): string {
  const names: string[] = [];
  const n = get(err, 'name');
  if (typeof n === 'string') names.push(n.toLowerCase());
  let proto: unknown = isObject(err) ? Object.getPrototypeOf(err) : undefined;
  while (isObject(proto) && proto !== Object.prototype) {
    const ctor = (proto as { constructor?: { name?: unknown } }).constructor;
    if (typeof ctor?.name === 'string' && ctor.name) names.push(ctor.name.toLowerCase());
    proto = Object.getPrototypeOf(proto);
  }
  return names.join(' ');
}

function codesOf(err: unknown): string[] {
  const codes: string[] = [];
  let cur: unknown = err;
  for (let depth = 0; depth < 4 && isObject(cur); depth++) {
    const c = cur.code;
    if (typeof c === 'string') codes.push(c);
    cur = cur.cause;
  }
  return codes;
}

function isCancellation(err: unknown): boolean {
  const names = nameChain(err);
  return names.includes('aborterror') || names.includes('apiuseraborterror');
}

function isParseError(err: unknown): boolean {
  if (err instanceof MalformedOutput || err instanceof StructuredOutputError || err instanceof SyntaxError) return true;
  const names = nameChain(err);
  return names.includes('zoderror') || names.includes('validationerror');
}

function isTimeout(err: unknown): boolean {
  if (codesOf(err).some((c) => TIMEOUT_CODES.has(c))) return true;
  const names = nameChain(err);
  return TIMEOUT_WORDS.some((w) => names.includes(w));
}

function isConnectionError(err: unknown): boolean {
  if (codesOf(err).some((c) => CONNECTION_CODES.has(c))) return true;
  const names = nameChain(err);
  if (CONNECTION_WORDS.some((w) => names.includes(w))) return true;
  // undici's fetch() rejects with TypeError("fetch failed") and the socket error as its cause.
  return err instanceof TypeError && err.message === 'fetch failed';
}

function typeName(err: unknown): string {
  if (isObject(err)) {
    const ctor = (Object.getPrototypeOf(err) as { constructor?: { name?: string } } | null)?.constructor?.name;
    if (ctor && ctor !== 'Object') return ctor;
    if (typeof err.name === 'string') return err.name;
  }
  return typeof err;
}

export function describe(err: unknown): string {
  const name = typeName(err);
  const msg = isObject(err) && typeof err.message === 'string' ? err.message.trim() : String(err);
  return msg ? `${name}: ${msg}` : name;
}

const empty = (): Observed => ({
  outcome: 'unspecified',
  httpStatus: 0,
  errorType: '',
  headers: {},
  inputTokens: 0,
  outputTokens: 0,
  message: '',
});

/**
 * Turns what a provider call threw into outcome-report fields.
 *
 * | thrown | reported |
 * |---|---|
 * | anything carrying an HTTP status | status + "type code: message" + headers; the server classifies |
 * | AbortError / APIUserAbortError (cancellation) | BAD_INPUT "cancelled" |
 * | SyntaxError, ZodError, ValidationError, MalformedOutput | PARTIAL |
 * | *Timeout* classes (APIConnectionTimeoutError), ETIMEDOUT | TIMEOUT |
 * | *Connection* classes (APIConnectionError), ECONNREFUSED..., fetch failed | TRANSIENT |
 * | anything else | BAD_INPUT "client_error: Name" |
 *
 * The last rows keep the agent's own bugs and cancellations from being blamed
 * on the provider: BAD_INPUT never moves the breaker, but the report still
 * releases the permit's reserved budget and any half-open probe slot.
 */
export function observeError(err: unknown): Observed {
  const o = empty();
  const status = httpStatusOf(err);
  if (status) {
    const f = errorFields(err);
    o.httpStatus = status;
    o.errorType = composeErrorType(f.type, f.code, f.message);
    o.headers = headersOf(err);
    o.message = f.message || describe(err);
    return o;
  }
  o.message = describe(err);
  if (isCancellation(err)) {
    o.outcome = 'bad_input';
    o.errorType = 'cancelled';
    o.message = 'cancelled';
  } else if (isParseError(err)) {
    o.outcome = 'partial';
    o.errorType = clip(`malformed_output: ${typeName(err)}`, MAX_ERROR_TYPE);
  } else if (isTimeout(err)) {
    o.outcome = 'timeout';
    o.errorType = clip(`timeout: ${typeName(err)}`, MAX_ERROR_TYPE);
  } else if (isConnectionError(err)) {
    o.outcome = 'transient';
    const f = errorFields(err);
    const detail = composeErrorType(f.type, f.code, f.message);
    o.errorType = clip(detail ? `${typeName(err)}: ${detail}` : typeName(err), MAX_ERROR_TYPE);
    o.headers = headersOf(err);
  } else {
    o.outcome = 'bad_input';
    o.errorType = clip(`client_error: ${typeName(err)}`, MAX_ERROR_TYPE);
  }
  return o;
}

function nonNegInt(v: unknown): number {
  return typeof v === 'number' && Number.isFinite(v) && v > 0 ? Math.floor(v) : 0;
}

/**
 * (input, output) tokens of a provider response, duck-typed: Anthropic
 * `usage.input_tokens` / `output_tokens`, OpenAI `usage.prompt_tokens` /
 * `completion_tokens` (and the camelCase forms some SDKs use).
 */
export function usageOf(value: unknown): [number, number] {
  const usage = get(value, 'usage');
  if (!isObject(usage)) return [0, 0];
  const pick = (...keys: string[]): number => {
    for (const k of keys) if (usage[k] !== undefined && usage[k] !== null) return nonNegInt(usage[k]);
    return 0;
  };
  return [
    pick('input_tokens', 'prompt_tokens', 'inputTokens', 'promptTokens'),
    pick('output_tokens', 'completion_tokens', 'outputTokens', 'completionTokens'),
  ];
}

/**
 * A successful call: usage and (if the value carries them) response headers,
 * whose rate-limit fields let the server pause the fleet before a 429.
 */
export function observeSuccess(value: unknown): Observed {
  const o = empty();
  o.outcome = 'success';
  [o.inputTokens, o.outputTokens] = usageOf(value);
  const h = get(value, 'headers');
  if (h !== undefined) o.headers = normalizeHeaders(h);
  return o;
}

// Prompt sizes as providers state them in context-length errors: OpenAI "...
// However, your messages resulted in 150000 tokens", Anthropic "prompt is too
// long: 150000 tokens > 100000 maximum".
const PROMPT_TOKENS = [/resulted in (\d+) tokens/, /(\d+) tokens > \d+/];

/**
 * The prompt size a context-length error reports (0 if it states none), so the
 * fallback Route can skip every model whose context window is too small.
 */
export function contextTokensNeeded(text: string): number {
  for (const re of PROMPT_TOKENS) {
    const m = re.exec(text);
    if (m?.[1]) return Number(m[1]);
  }
  return 0;
}
