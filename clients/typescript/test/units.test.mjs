// Unit tests without a server: classification of SDK-shaped errors, headers,
// usage, the local taxonomy and retry hints, backoff, the local breaker,
// route memory, structured parsing, option validation.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  Backstop,
  LocalEngine,
  MalformedOutput,
  RouteMemory,
  StructuredOutputError,
  Validator,
  classify,
  composeErrorType,
  contextTokensNeeded,
  fullJitter,
  localPolicy,
  normalizeHeaders,
  observeError,
  observeSuccess,
  replyText,
  retryHintMs,
  structured,
} from '@backstop/client';
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  apiError,
  contextLength,
  overloaded,
  rateLimitedOpenAI,
  unauthorized,
} from '@backstop/client/testing';
import { z } from 'zod';

test('HTTP errors are sent raw for the server to classify: status, "type code: message", headers', () => {
  const o = observeError(rateLimitedOpenAI(400));
  assert.equal(o.outcome, 'unspecified');
  assert.equal(o.httpStatus, 429);
  assert.equal(o.errorType, 'requests rate_limit_exceeded: Rate limit reached for requests');
  assert.deepEqual(o.headers, { 'retry-after-ms': '400' });

  const a = observeError(overloaded()); // Anthropic: error = the whole body
  assert.equal(a.httpStatus, 529);
  assert.equal(a.errorType, 'overloaded_error: Overloaded');

  const q = observeError(apiError({ status: 429, sdk: 'openai', error: { type: 'insufficient_quota', code: 'insufficient_quota', message: 'You exceeded your current quota' } }));
  assert.equal(q.errorType, 'insufficient_quota: You exceeded your current quota', 'type and code are not repeated');
});

test('other error shapes: statusCode, response.status, axios response.data, plain-object and Map headers', () => {
  assert.equal(observeError({ statusCode: 503, message: 'x' }).httpStatus, 503);
  const axiosLike = { message: 'Request failed', response: { status: 400, headers: { 'X-Request-Id': 'r1' }, data: { error: { type: 'invalid_request_error', message: 'prompt is too long: 5 tokens > 4 maximum' } } } };
  const o = observeError(axiosLike);
  assert.equal(o.httpStatus, 400);
  assert.equal(o.errorType, 'invalid_request_error: prompt is too long: 5 tokens > 4 maximum');
  assert.deepEqual(o.headers, { 'x-request-id': 'r1' });
  assert.deepEqual(normalizeHeaders(new Map([['Retry-After', '3']])), { 'retry-after': '3' });
  assert.deepEqual(normalizeHeaders([['a', '1'], ['A', '2']]), { a: '1, 2' });
  assert.equal(observeError({ status: 999 }).httpStatus, 0, 'not an HTTP status');
});

test('failures without a status are classified by the client', () => {
  assert.equal(observeError(new APIConnectionTimeoutError()).outcome, 'timeout');
  assert.equal(observeError(new APIConnectionError()).outcome, 'transient');
  assert.equal(observeError(Object.assign(new Error('connect'), { code: 'ECONNREFUSED' })).outcome, 'transient');
  assert.equal(observeError(new TypeError('fetch failed', { cause: { code: 'UND_ERR_SOCKET' } })).outcome, 'transient');
  assert.equal(observeError(new DOMException('timed out', 'TimeoutError')).outcome, 'timeout');
  assert.equal(observeError(new SyntaxError('Unexpected token')).outcome, 'partial');
  assert.equal(observeError(new MalformedOutput('bad')).outcome, 'partial');
  const aborted = observeError(new DOMException('stop', 'AbortError'));
  assert.deepEqual([aborted.outcome, aborted.errorType], ['bad_input', 'cancelled']);
  const bug = observeError(new TypeError("Cannot read properties of undefined (reading 'x')"));
  assert.deepEqual([bug.outcome, bug.errorType], ['bad_input', 'client_error: TypeError'], "the agent's own bug is never blamed on the provider");
});

test('error_type is clipped to 256 bytes without splitting a character; headers to the server limits', () => {
  const long = composeErrorType('t', 'c', 'é'.repeat(300));
  assert.ok(Buffer.byteLength(long) <= 256 && !long.includes('\uFFFD'));
  const many = Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`h${i}`, 'v']));
  many['retry-after'] = '1';
  const h = normalizeHeaders(many);
  assert.equal(Object.keys(h).length, 64);
  assert.equal(h['retry-after'], '1', 'signal headers are kept first');
});

test('usage from Anthropic and OpenAI shaped replies', () => {
  assert.deepEqual([observeSuccess({ usage: { input_tokens: 5, output_tokens: 7 } }).inputTokens, observeSuccess({ usage: { input_tokens: 5, output_tokens: 7 } }).outputTokens], [5, 7]);
  const o = observeSuccess({ usage: { prompt_tokens: 3, completion_tokens: 4 }, headers: { 'x-ratelimit-remaining-requests': '0' } });
  assert.deepEqual([o.inputTokens, o.outputTokens, o.headers], [3, 4, { 'x-ratelimit-remaining-requests': '0' }]);
  assert.equal(observeSuccess('text').inputTokens, 0);
});

test('context-length errors state the prompt size (OpenAI and Anthropic wording)', () => {
  assert.equal(contextTokensNeeded(observeError(contextLength(150000)).errorType), 150000);
  assert.equal(contextTokensNeeded('prompt is too long: 208310 tokens > 200000 maximum'), 208310);
  assert.equal(contextTokensNeeded('content_policy_violation'), 0);
});

test('the local taxonomy matches the server table', () => {
  const cases = [
    [200, '', 'success'], [408, '', 'timeout'], [429, 'rate_limit_error', 'rate_limited'],
    [429, 'insufficient_quota', 'persistent'], [400, 'invalid_request_error: Your credit balance is too low', 'persistent'],
    [401, '', 'persistent'], [403, '', 'persistent'], [529, 'overloaded_error', 'transient'], [500, '', 'transient'],
    [400, 'context_length_exceeded', 'bad_input'], [413, '', 'bad_input'], [0, 'timeout: X', 'timeout'], [0, 'whatever', 'transient'],
  ];
  for (const [status, et, want] of cases) assert.equal(classify('unspecified', status, et), want, `${status} ${et}`);
  assert.equal(classify('partial', 500, ''), 'partial', 'an explicit outcome wins');
});

test('retry hints: retry-after-ms, retry-after seconds or date, the longest wins, nonsense ignored', () => {
  const now = () => Date.parse('2026-01-01T00:00:00Z');
  assert.equal(retryHintMs({ 'retry-after-ms': '400' }), 400);
  assert.equal(retryHintMs({ 'Retry-After': '2' }), 2000);
  assert.equal(retryHintMs({ 'retry-after': 'Thu, 01 Jan 2026 00:00:05 GMT' }, undefined, now), 5000);
  assert.equal(retryHintMs({ 'retry-after': '1', 'retry-after-ms': '1500' }, 200), 1500);
  assert.equal(retryHintMs({ 'retry-after': '-1', 'retry-after-ms': 'soon' }), undefined);
});

test('full jitter stays within [0, min(max, base * 2^attempt)] and spreads', () => {
  assert.equal(fullJitter(3, 100, 10_000, () => 0.999999) < 800, true);
  assert.equal(fullJitter(3, 100, 10_000, () => 0), 0);
  assert.equal(fullJitter(20, 100, 500, () => 0.5), 250, 'capped at max');
  const samples = Array.from({ length: 200 }, () => fullJitter(2, 100, 1000));
  assert.ok(samples.every((s) => s >= 0 && s < 400));
  assert.ok(Math.max(...samples) - Math.min(...samples) > 200, 'jittered, not fixed');
});

test('local breaker: opens after the threshold, half-opens with one probe, closes on success', () => {
  let now = 0;
  const eng = new LocalEngine(localPolicy({ failureThreshold: 2, successThreshold: 1, openDurationMs: 1000, maxRetries: 2, baseDelayMs: 10, maxDelayMs: 40 }), { clock: () => now, rand: () => 0.5 });
  const fail = (permit) => eng.record({ target: 't', permit, outcome: 'unspecified', httpStatus: 529, errorType: '', headers: {}, inputTokens: 0, outputTokens: 0, attempt: 0, keySlot: '', caller: '' });
  const a = eng.admit('t');
  assert.ok(a.allowed && a.local && a.permit.startsWith('local:'));
  assert.deepEqual(fail(a.permit).retry, { retry: true, delayMs: 5, reason: 'retryable' });
  assert.equal(fail(eng.admit('t').permit).state, 'open');
  const refused = eng.admit('t');
  assert.deepEqual([refused.allowed, refused.reason, refused.retryAfterMs], [false, 'circuit_open', 1000]);
  now = 1000;
  const probe = eng.admit('t');
  assert.equal(probe.state, 'half_open');
  assert.equal(eng.admit('t').reason, 'probe_limit', 'one probe at a time');
  const ok = eng.record({ target: 't', permit: probe.permit, outcome: 'success', httpStatus: 200, errorType: '', headers: {}, inputTokens: 0, outputTokens: 0, attempt: 0, keySlot: '', caller: '' });
  assert.equal(ok.state, 'closed');
  assert.equal(eng.takePending().length, 3, 'every local outcome is kept for reconciliation');
});

test('local pauses on a 429 with a hint; persistent opens for the long duration; bad input never trips', () => {
  let now = 0;
  const eng = new LocalEngine(localPolicy({ failureThreshold: 1, persistentOpenDurationMs: 600_000 }), { clock: () => now });
  const rep = (status, et = '', headers = {}) => ({ target: 't', permit: eng.admit('t').permit, outcome: 'unspecified', httpStatus: status, errorType: et, headers, inputTokens: 0, outputTokens: 0, attempt: 0, keySlot: '', caller: '' });
  const r = eng.record(rep(429, '', { 'retry-after-ms': '300' }));
  assert.ok(r.retry.retry && r.retry.delayMs >= 300);
  assert.deepEqual([eng.admit('t').reason, eng.admit('t').retryAfterMs], ['rate_limited', 300]);
  now = 300;
  assert.equal(eng.record(rep(400, 'context_length_exceeded')).state, 'closed');
  const p = eng.record(rep(401));
  assert.deepEqual([p.state, p.retry.retry, p.retry.reason], ['open', false, 'persistent']);
  assert.equal(eng.admit('t').retryAfterMs, 600_000);
});

test('route memory learns the server order from Route answers', () => {
  const m = new RouteMemory({});
  m.learn('chat', { target: 'c', skipped: [{ target: 'a' }, { target: 'b' }] });
  m.learn('chat', { target: 'a', skipped: [] });
  m.learn('chat', { target: 'd', skipped: [{ target: 'a' }, { target: 'b' }, { target: 'c' }] });
  assert.deepEqual(m.candidates('chat'), ['a', 'b', 'c', 'd']);
});

test('structured: JSON schema, zod and Standard Schema; fences stripped; reply shapes', async () => {
  const json = new Validator({ type: 'object', required: ['n'], properties: { n: { type: 'integer', minimum: 1 } }, additionalProperties: false });
  assert.deepEqual(await json.parse('```json\n{"n": 2}\n```'), { n: 2 });
  await assert.rejects(json.parse('{"n": 0}'), /below the minimum/);
  await assert.rejects(json.parse('{"n": 1, "x": 1}'), /not allowed/);
  await assert.rejects(json.parse('nope'), MalformedOutput);
  const zod = new Validator(z.object({ answer: z.number().int() }));
  assert.deepEqual(await zod.parse('{"answer": 4}'), { answer: 4 });
  await assert.rejects(zod.parse('{"answer": "x"}'), (e) => e instanceof MalformedOutput && /answer/.test(e.message));
  const std = new Validator({ '~standard': { version: 1, vendor: 't', validate: (v) => (v === 1 ? { value: 1 } : { issues: [{ message: 'must be 1' }] }) } });
  await assert.rejects(std.parse('2'), /must be 1/);
  assert.equal(replyText({ content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] }), 'ab');
  assert.equal(replyText({ choices: [{ message: { content: 'c' } }] }), 'c');
});

test('structured sessions count corrections and give up with StructuredOutputError', async () => {
  const seen = [];
  const s = structured({ type: 'integer' }, (a) => {
    seen.push(a.correction?.number ?? 0);
    return 'not json';
  }, { maxCorrections: 1 });
  const run = s.session();
  await assert.rejects(run({ target: 't' }), MalformedOutput);
  await assert.rejects(run({ target: 't' }), StructuredOutputError);
  assert.deepEqual(seen, [0, 1]);
  assert.throws(() => structured({}, () => '', { maxCorrections: -1 }), /maxCorrections/);
});

test('bad options get clear errors', () => {
  assert.throws(() => new Backstop('', {}), /address/);
  assert.throws(() => new Backstop('127.0.0.1:1', { policy: 'fail_sometimes' }), /policy/);
  assert.throws(() => new Backstop('127.0.0.1:1', { timeoutMs: 0 }), /timeoutMs/);
  assert.throws(() => new Backstop('127.0.0.1:1', { localPolicy: { failureThreshold: 0 } }), /failureThreshold/);
  assert.throws(() => new Backstop('127.0.0.1:1', { tls: { certChain: 'x' } }), /privateKey/);
  assert.throws(() => new Backstop('127.0.0.1:1', { stream: 'yes' }), /stream must be true or false/);
  assert.throws(() => new Backstop('127.0.0.1:1', { streamIdleMs: -1 }), /streamIdleMs/);
});

test('the typed errors carry what an agent needs', () => {
  const e = unauthorized();
  assert.equal(e.constructor.name, 'AuthenticationError');
  assert.equal(e.status, 401);
  assert.ok(e.headers instanceof Headers);
});

test('a newer server: unknown enum values read as unspecified, unknown fields are skipped', async () => {
  const conv = await import('../dist/esm/convert.js');
  const { resilience } = await import('@backstop/client/proto');
  assert.equal(conv.breakerState(99), 'unspecified');
  assert.equal(conv.retryReason(99), 'unspecified', 'a reason added by a future server');
  assert.equal(conv.retryReason(8), 'circuit_open');
  const known = resilience.CanProceedResponse.encode({ allowed: true, reason: 1, state: 1, permit: '1.opaque', keySlot: '', shadowReason: 0, retryAfter: undefined }).finish();
  // Field 20 (varint) and field 21 (a string): fields this client has never heard of.
  const extra = Buffer.concat([Buffer.from(known), Buffer.from([0xa0, 0x01, 0x01, 0xaa, 0x01, 0x02, 0x68, 0x69])]);
  const adm = conv.admission('t', resilience.CanProceedResponse.decode(extra));
  assert.deepEqual([adm.allowed, adm.reason, adm.permit], [true, 'allowed', '1.opaque']);
  const r = conv.outcomeResult('t', resilience.RecordOutcomeResponse.decode(resilience.RecordOutcomeResponse.encode({ classifiedAs: 42, state: 1, retry: { retry: false, delay: undefined, reason: 42 }, stalePermit: false }).finish()));
  assert.deepEqual([r.classifiedAs, r.retry.reason, r.retry.retry], ['unspecified', 'unspecified', false]);
});

test('every event kind the server can send has a name (none reads as unspecified)', async () => {
  const { toEvent } = await import('@backstop/client/testing');
  const { Event } = await import('../dist/esm/gen/backstop/v1/events.js');
  const kinds = Object.keys(Event.fromPartial({})).filter((k) => !['seq', 'at', 'target'].includes(k));
  assert.ok(kinds.length >= 17, `${kinds.length} kinds`);
  for (const field of kinds) {
    const ev = toEvent(Event.fromPartial({ seq: 1, target: 't', [field]: {} }));
    assert.notEqual(ev.kind, 'unspecified', `${field} has no name`);
  }
});
