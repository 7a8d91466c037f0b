// End-to-end user requests (issue #17) against the real binary: call() and
// guard() name each user request with one requestId, sent on every Route /
// CanProceed / RecordOutcome of it (retries and fallbacks included); the
// success report closes it as completed, giving up finishes it as failed and
// deferring as deferred (FinishRequest). Finishing an id again answers
// `duplicate` with what the server measured, which is how these tests read a
// request's attempts; the totals come from /metrics.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';
import { AllTargetsFailed, Backstop } from '@backstop/client';
import { BackstopServer } from '@backstop/client/testing';
import { backstopBin, recordingLogger } from './helpers.mjs';

const CONFIG = `
[routes.chat]
targets = ["a", "b"]
[targets.a]
[targets.b]
`;

/** A 401: PERSISTENT, not retried, so call() falls back to the next target. */
function unauthorized() {
  return Object.assign(new Error('invalid x-api-key'), { status: 401, error: { type: 'authentication_error' } });
}

/** A 500: transient; one does not open a breaker (default threshold 5). */
const serverError = () => Object.assign(new Error('internal error'), { status: 500 });

function fn(failing, calls = []) {
  return ({ target }) => {
    calls.push(target);
    if (failing.includes(target)) throw unauthorized();
    return `ok from ${target}`;
  };
}

async function metrics(server) {
  const r = await fetch(`http://${server.fields.http}/metrics`);
  return r.text();
}

async function total(server, result, route = 'chat') {
  const m = (await metrics(server)).match(new RegExp(`^backstop_requests_total\\{route="${route}",result="${result}"\\} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : 0;
}

async function attemptsSum(server, route = 'chat') {
  const m = (await metrics(server)).match(new RegExp(`^backstop_request_attempts_sum\\{route="${route}"\\} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : 0;
}

async function withServer(fn) {
  const server = await BackstopServer.start(CONFIG, { binary: backstopBin() });
  const bs = new Backstop(server.address, { timeoutMs: 1000, caller: 'requests', logger: recordingLogger() });
  try {
    await fn(bs, server);
  } finally {
    bs.close();
    await server.close();
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

test('a fallback is one completed request with two attempts, under the id given', async () => {
  await withServer(async (bs, server) => {
    const calls = [];
    assert.equal(await bs.call('chat', fn(['a'], calls), { requestId: 'user-req-1' }), 'ok from b');
    assert.deepEqual(calls, ['a', 'b']);
    assert.equal(await total(server, 'completed'), 1);
    assert.equal(await total(server, 'failed'), 0);
    assert.equal(await attemptsSum(server), 2);
    const again = await bs.finishRequest('user-req-1', 'failed');
    assert.deepEqual([again.tracked, again.duplicate, again.attempts, again.route], [true, true, 2, 'chat']);
    assert.ok(again.durationMs >= 0 && again.durationMs < 10_000, String(again.durationMs));
    assert.equal(await total(server, 'failed'), 0);
  });
});

test('call() names its request without being asked', async () => {
  await withServer(async (bs, server) => {
    assert.equal(await bs.call('chat', fn(['a'])), 'ok from b');
    assert.equal(await bs.call('chat', fn([])), 'ok from b', 'a is open now: one attempt');
    assert.equal(await total(server, 'completed'), 2);
    assert.equal(await attemptsSum(server), 3);
  });
});

test('exhausting every target is one failed request; deferring is a deferred one', async () => {
  await withServer(async (bs, server) => {
    const calls = [];
    await assert.rejects(bs.call('chat', fn(['a', 'b'], calls), { requestId: 'doomed' }), AllTargetsFailed);
    assert.deepEqual(calls, ['a', 'b']);
    assert.equal(await total(server, 'failed'), 1);
    assert.equal(await total(server, 'completed'), 0);
    const again = await bs.finishRequest('doomed', 'completed');
    assert.deepEqual([again.duplicate, again.attempts], [true, 2]);

    const d = await bs.call('chat', fn(['a', 'b']), { requestId: 'later-1', defer: { payload: { prompt: 'later' } } });
    assert.ok(d.id, JSON.stringify(d));
    assert.equal(await total(server, 'deferred'), 1);
    assert.equal(await total(server, 'failed'), 1);
    assert.equal((await bs.finishRequest('later-1', 'failed')).duplicate, true);
  });
});

test('guard(): its own request, or a span of yours', async () => {
  await withServer(async (bs, server) => {
    let id;
    await bs.guard('a', (g) => {
      id = g.requestId;
    });
    assert.match(id, /^[0-9a-f]{32}$/);
    await assert.rejects(bs.guard('b', () => { throw serverError(); }), /internal error/);
    assert.equal(await total(server, 'completed', 'direct'), 1);
    assert.equal(await total(server, 'failed', 'direct'), 1);
    assert.equal((await bs.finishRequest(id, 'failed')).duplicate, true);

    // An id of yours: a failure leaves it open for your next attempt.
    await assert.rejects(bs.guard('a', () => { throw serverError(); }, { requestId: 'mine' }));
    assert.equal(await total(server, 'failed', 'direct'), 1);
    assert.equal(await bs.guard('b', () => 'ok', { requestId: 'mine', attempt: 1 }), 'ok');
    assert.equal(await total(server, 'completed', 'direct'), 2);
    const mine = await bs.finishRequest('mine', 'failed');
    assert.equal(mine.attempts, 2);
  });
});

test('the low-level calls take a requestId; finishRequest counts what it never saw', async () => {
  await withServer(async (bs, server) => {
    const d = await bs.route('chat', { requestId: 'manual' });
    assert.equal(d.target, 'a');
    await bs.recordOutcome('a', { permit: d.permit, httpStatus: 200, requestId: 'manual', finish: 'completed' });
    const adm = await bs.canProceed('b', { requestId: 'manual-2' });
    await bs.recordOutcome('b', { permit: adm.permit, httpStatus: 500, requestId: 'manual-2' });
    const f = await bs.finishRequest('manual-2', 'failed');
    assert.deepEqual([f.tracked, f.duplicate, f.attempts, f.route], [true, false, 1, 'direct']);
    const e = await bs.finishRequest('elsewhere', 'deferred', { route: 'chat', elapsedMs: 2500, attempts: 3 });
    assert.deepEqual([e.tracked, e.durationMs, e.attempts, e.route], [false, 2500, 3, 'chat']);
    assert.equal(await total(server, 'completed'), 1);
    assert.equal(await total(server, 'failed', 'direct'), 1);
    assert.equal(await total(server, 'deferred'), 1);
    await assert.rejects(bs.finishRequest('', 'failed'), TypeError);
    await assert.rejects(bs.finishRequest('x', 'unspecified'), TypeError);
  });
});

test('in local mode the finish is skipped and never fails the call', async () => {
  const bs = new Backstop(`127.0.0.1:${await freePort()}`, {
    timeoutMs: 200,
    connectTimeoutMs: 200,
    localRoutes: { chat: ['a', 'b'] },
    logger: recordingLogger(),
  });
  try {
    assert.equal(await bs.call('chat', fn(['a'])), 'ok from b');
    assert.equal(bs.mode, 'local');
    await assert.rejects(bs.call('chat', fn(['a', 'b'])), AllTargetsFailed);
    await bs.guard('c', (g) => assert.equal(g.local, true));
  } finally {
    bs.close();
  }
});
