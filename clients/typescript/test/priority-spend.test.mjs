// Priorities, spend limits and routing strategies against the real binary:
// a budget's reserve refuses batch while interactive passes (PriorityReserved
// from guard()), a spend limit surfaces as spend_limit / SpendLimitExceeded with
// retryAfterMs and is never a provider failure, RecordOutcome says what a call
// cost, Route takes a strategy and says why; the fail-safe takes every option.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { test } from 'node:test';
import { AllTargetsFailed, Backstop, PriorityReserved, RateLimited, SpendLimitExceeded } from '@backstop/client';
import { BackstopServer } from '@backstop/client/testing';
import { backstopBin, recordingLogger } from './helpers.mjs';

const CONFIG = `
[targets.p]
requests_per_minute = 10
reserve = { interactive = 0.3 }

[targets.m]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
spend = 0.01
window = "1h"

[targets.a]
[targets.b]

[routes.fast]
targets = ["a", "b"]
strategy = "lowest_latency"
explore = 0.0
`;

// (1000 in, 200 out) at $3 / $15 per million tokens: 0.6 cents of the 1 cent an hour.
const IN = 1000;
const OUT = 200;
const COST = 0.006;
const ok = () => ({ usage: { input_tokens: IN, output_tokens: OUT } });

async function withServer(fn) {
  const server = await BackstopServer.start(CONFIG, { binary: backstopBin() });
  const bs = new Backstop(server.address, { timeoutMs: 1000, caller: 'priority-spend', logger: recordingLogger() });
  try {
    await fn(bs);
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

test('a priority reserve refuses batch and default while interactive passes', async () => {
  await withServer(async (bs) => {
    for (let i = 0; i < 7; i++) assert.equal((await bs.canProceed('p', { priority: 'batch' })).allowed, true, `batch #${i}`);
    const refused = await bs.canProceed('p', { priority: 'batch' });
    assert.equal(refused.allowed, false);
    assert.equal(refused.reason, 'priority_reserved');
    assert.ok(refused.retryAfterMs > 0, String(refused.retryAfterMs));
    assert.equal((await bs.canProceed('p')).reason, 'priority_reserved', 'unset priority is default');

    let ran = false;
    await assert.rejects(
      bs.guard('p', () => (ran = true), { priority: 'default' }),
      (e) => e instanceof PriorityReserved && e instanceof RateLimited && e.reason === 'priority_reserved' && e.retryAfterMs > 0,
    );
    assert.equal(ran, false);
    await assert.rejects(bs.call(['p'], ok, { priority: 'batch' }), (e) => {
      assert.ok(e instanceof AllTargetsFailed);
      assert.deepEqual(e.errors.map((x) => [x.target, x.reason, x.outcome]), [['p', 'priority_reserved', undefined]]);
      return true;
    });

    for (let i = 0; i < 2; i++) assert.equal((await bs.canProceed('p', { priority: 'interactive' })).allowed, true);
    await bs.guard('p', ok, { priority: 'interactive' });
    assert.equal((await bs.canProceed('p', { priority: 'interactive' })).reason, 'rate_limited');

    const status = await bs.getTarget('p');
    assert.equal(status.state, 'closed');
    assert.equal(status.consecutiveFailures, 0);
    await assert.rejects(bs.canProceed('p', { priority: 'urgent' }), TypeError);
  });
});

test('a spend limit refuses with spend_limit and retryAfterMs; maxOutputTokens is reserved; record says the cost', async () => {
  await withServer(async (bs) => {
    const first = await bs.canProceed('m', { estimatedTokens: IN, maxOutputTokens: OUT });
    assert.equal(first.allowed, true);
    // 0.3 cents of input + 0.15 of output on top of the 0.6 reserved does not fit the 1 cent...
    const refused = await bs.canProceed('m', { estimatedTokens: IN, maxOutputTokens: 100 });
    assert.equal(refused.reason, 'spend_limit');
    assert.ok(refused.retryAfterMs > 0);
    const res = await bs.recordOutcome('m', { permit: first.permit, outcome: 'success', inputTokens: IN, outputTokens: OUT });
    assert.ok(Math.abs(res.cost - COST) < 1e-9, String(res.cost));

    let ran = false;
    await assert.rejects(
      bs.guard('m', () => (ran = true), { estimatedTokens: IN, maxOutputTokens: OUT }),
      (e) => {
        assert.ok(e instanceof SpendLimitExceeded && e instanceof RateLimited, String(e));
        assert.equal(e.reason, 'spend_limit');
        assert.equal(e.target, 'm');
        assert.ok(e.retryAfterMs > 0 && e.retryAfter > 0);
        return true;
      },
    );
    assert.equal(ran, false);

    const calls = [];
    await assert.rejects(
      bs.call(['m'], (a) => (calls.push(a.target), ok()), { estimatedTokens: IN, maxOutputTokens: OUT }),
      (e) => {
        assert.ok(e instanceof AllTargetsFailed);
        assert.deepEqual(e.errors.map((x) => [x.target, x.reason, x.outcome]), [['m', 'spend_limit', undefined]]);
        assert.ok(e.errors[0].retryAfterMs > 0 && e.retryAfterMs > 0);
        assert.match(e.message, /spend_limit/);
        return true;
      },
    );
    assert.deepEqual(calls, []);
    const status = await bs.getTarget('m');
    assert.equal(status.state, 'closed');
    assert.equal(status.counters.transient, 0);
  });
});

test('guard() reports usage and the outcome carries the cost', async () => {
  await withServer(async (bs) => {
    let outcome;
    await bs.guard('m', (g) => {
      g.usage(IN, OUT);
      outcome = g;
    }, { estimatedTokens: IN, maxOutputTokens: OUT });
    assert.ok(Math.abs(outcome.outcome.cost - COST) < 1e-9, String(outcome.outcome.cost));
  });
});

test('route() takes a strategy and says which one chose the target, and why', async () => {
  await withServer(async (bs) => {
    const own = await bs.route('fast');
    assert.equal(own.strategy, 'lowest_latency');
    assert.match(own.reason, /^lowest_latency/);
    const busy = await bs.route('fast', { strategy: 'least_busy', priority: 'interactive' });
    assert.equal(busy.strategy, 'least_busy');
    assert.match(busy.reason, /^least_busy/);
    const cheap = await bs.route('fast', { strategy: 'lowest_cost', estimatedTokens: 100, expectedOutputTokens: 50 });
    assert.equal(cheap.strategy, 'lowest_cost');
    const ordered = await bs.route(['a', 'b'], { strategy: 'ordered' });
    assert.deepEqual([ordered.target, ordered.strategy], ['a', 'ordered']);
    assert.ok(await bs.call('fast', ok, { strategy: 'most_headroom', expectedOutputTokens: 10, priority: 'batch' }));
    await assert.rejects(bs.route('fast', { strategy: 'fastest' }), TypeError);
  });
});

test('the local fail-safe accepts priority, maxOutputTokens and strategy', async () => {
  const bs = new Backstop(`127.0.0.1:${await freePort()}`, {
    timeoutMs: 50,
    connectTimeoutMs: 300,
    reconnectIntervalMs: 100,
    logger: recordingLogger(),
  });
  try {
    const adm = await bs.canProceed('m', { priority: 'batch', maxOutputTokens: OUT });
    assert.equal(adm.allowed && adm.local, true);
    const d = await bs.route(['a', 'b'], { strategy: 'lowest_cost', priority: 'interactive', maxOutputTokens: 1, expectedOutputTokens: 1 });
    assert.deepEqual([d.local, d.target, d.strategy], [true, 'a', 'ordered']);
    assert.match(d.reason, /lowest_cost/);
    await bs.guard('a', (g) => g.usage(IN, OUT), { priority: 'interactive', maxOutputTokens: OUT });
    assert.ok(await bs.call(['a', 'b'], ok, { priority: 'batch', maxOutputTokens: OUT, strategy: 'least_busy' }));
  } finally {
    bs.close();
  }
});

test('claim() and the worker admit deliveries at their priority', async () => {
  await withServer(async (bs) => {
    for (let i = 0; i < 7; i++) assert.equal((await bs.canProceed('p', { priority: 'batch' })).allowed, true);
    await bs.defer('p', { q: 'later' });
    const held = await bs.claim('p', { priority: 'batch' });
    assert.deepEqual([held.items.length, held.blockedReason], [0, 'priority_reserved']);
    assert.ok(held.retryAfterMs > 0);
    const handled = [];
    const stats = await bs.worker('p', { priority: 'interactive', waitMs: 100 }).run((item) => handled.push(item.json()), { untilEmpty: true, timeoutMs: 5000 });
    assert.deepEqual(handled, [{ q: 'later' }]);
    assert.equal(stats.acked, 1);
    assert.throws(() => bs.worker('p', { priority: 'soon' }), TypeError);
  });
});
