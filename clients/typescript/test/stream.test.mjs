// The Decide stream: decisions multiplexed over one bidirectional stream per
// client by default (checked on the real server's /metrics), the opt-out,
// out-of-order answers, a server killed and restarted mid-run, per-item
// deadlines, the fallback to unary calls against a server without Decide,
// item errors, cancellation, drains and idle streams. Tests that need a server
// misbehaving in a precise way use a tiny @grpc/grpc-js server.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { Backstop, ControlPlaneError, ControlPlaneUnavailable } from '@backstop/client';
import { resilience as pb } from '@backstop/client/proto';
import { BackstopServer } from '@backstop/client/testing';
import { CHAT, FAST, backstopBin, recordingLogger, waitFor } from './helpers.mjs';

// These tests are about the stream: the rest of the suite honours BACKSTOP_STREAM=0, this file does not.
delete process.env.BACKSTOP_STREAM;

const HERE = dirname(fileURLToPath(import.meta.url));
const PKG = join(HERE, '..');
const SONNET = 'anthropic/sonnet';
const GPT = 'openai/gpt-4o';
const HAIKU = 'anthropic/haiku';

/** `backstop_rpc_duration_seconds_count` per method, from the server's /metrics. */
async function rpcCounts(server) {
  const text = await (await fetch(`http://${server.fields.http}/metrics`)).text();
  const out = {};
  for (const m of text.matchAll(/^backstop_rpc_duration_seconds_count\{method="([^"]+)"\} (\d+)/gm)) out[m[1]] = Number(m[2]);
  return out;
}

async function withServer(config, fn) {
  const server = await BackstopServer.start(config, { binary: backstopBin() });
  const clients = [];
  const make = (opts = {}) => {
    const c = new Backstop(server.address, { timeoutMs: 1000, caller: 'stream-test', logger: recordingLogger(), ...opts });
    clients.push(c);
    return c;
  };
  try {
    await fn(server, make);
  } finally {
    for (const c of clients) c.close();
    await server.close();
  }
}

/** Some guarded calls and a call() loop: CanProceed, Route and RecordOutcome decisions. */
async function workload(bs, n = 5) {
  for (let i = 0; i < n; i++) {
    await bs.guard(SONNET, () => ({ text: 'ok', usage: { input_tokens: 1, output_tokens: 1 } }));
    const r = await bs.call('chat', ({ target }) => ({ text: target }));
    assert.equal(r.text, SONNET);
  }
}

const allowed = (target, permit = `p-${target}`) =>
  pb.CanProceedResponse.fromPartial({ allowed: true, reason: pb.Reason.REASON_ALLOWED, state: pb.BreakerState.BREAKER_STATE_CLOSED, permit });
const routed = (target) => pb.RouteResponse.fromPartial({ target, permit: `p-${target}`, state: pb.BreakerState.BREAKER_STATE_CLOSED });
const recorded = () =>
  pb.RecordOutcomeResponse.fromPartial({
    classifiedAs: pb.OutcomeClass.OUTCOME_CLASS_SUCCESS,
    state: pb.BreakerState.BREAKER_STATE_CLOSED,
    retry: { retry: false, reason: pb.RetryReason.RETRY_REASON_SUCCEEDED },
  });

/** The answer a fake server gives to one Decide item. */
function answerFor(req) {
  if (req.canProceed) return { id: req.id, canProceed: allowed(req.canProceed.target) };
  if (req.route) return { id: req.id, route: routed(req.route.candidates[0] ?? '') };
  return { id: req.id, recordOutcome: recorded() };
}

/**
 * A tiny Resilience server: the unary methods answer "allowed" (counted in
 * `counts`); `decide` (when given) handles the Decide stream, else the
 * method is not registered at all, like a server built before it existed.
 */
async function fakeServer(decide) {
  const counts = { canProceed: 0, recordOutcome: 0, route: 0, recordOutcomeBatch: 0, streams: 0 };
  const impl = {
    canProceed: (call, cb) => {
      counts.canProceed += 1;
      cb(null, allowed(call.request.target, 'unary'));
    },
    recordOutcome: (_call, cb) => {
      counts.recordOutcome += 1;
      cb(null, recorded());
    },
    route: (call, cb) => {
      counts.route += 1;
      cb(null, routed(call.request.candidates[0] ?? ''));
    },
    canProceedBatch: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: 'fake' }),
    recordOutcomeBatch: (call, cb) => {
      counts.recordOutcomeBatch += 1;
      cb(null, { items: call.request.items.map(() => ({ ok: recorded() })) });
    },
  };
  let service = pb.ResilienceService;
  if (decide) {
    impl.decide = (call) => {
      counts.streams += 1;
      decide(call, counts);
    };
  } else {
    const { decide: _omitted, ...unaryOnly } = pb.ResilienceService;
    service = unaryOnly;
  }
  const server = new grpc.Server();
  server.addService(service, impl);
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  return { address: `127.0.0.1:${port}`, counts, close: () => server.forceShutdown() };
}

/** Counts the Decide streams a client opens (a spy on its generated stub). */
function countStreams(bs) {
  const stub = bs.stubs.resilience;
  const original = stub.decide;
  const seen = { opened: 0 };
  stub.decide = function (...args) {
    seen.opened += 1;
    return original.apply(this, args);
  };
  return seen;
}

test('by default every decision goes over the Decide stream (server metrics: Decide.* grows, unary does not)', async () => {
  await withServer(FAST + CHAT, async (server, make) => {
    const bs = make();
    const streams = countStreams(bs);
    assert.equal(bs.streaming, true);
    await workload(bs, 5);
    const c = await rpcCounts(server);
    assert.ok(c['Decide.CanProceed'] >= 5, JSON.stringify(c));
    assert.ok(c['Decide.Route'] >= 5, JSON.stringify(c));
    assert.ok(c['Decide.RecordOutcome'] >= 10, JSON.stringify(c));
    assert.equal(c.CanProceed, 0, JSON.stringify(c));
    assert.equal(c.Route, 0, JSON.stringify(c));
    assert.equal(c.RecordOutcome, 0, JSON.stringify(c));
    assert.equal(streams.opened, 1, 'one stream carried all of them');
    assert.equal(bs.streaming, true);
    assert.equal(bs.mode, 'remote');
  });
});

test('opt-out: stream: false and BACKSTOP_STREAM=0 use unary calls; an explicit stream: true wins over the variable', async () => {
  await withServer(FAST + CHAT, async (server, make) => {
    const off = make({ stream: false });
    assert.equal(off.streaming, false);
    await workload(off, 3);
    let c = await rpcCounts(server);
    assert.deepEqual([c.CanProceed, c.Route, c.RecordOutcome], [3, 3, 6], JSON.stringify(c));
    assert.equal(c['Decide.CanProceed'] + c['Decide.Route'] + c['Decide.RecordOutcome'], 0, JSON.stringify(c));

    const saved = process.env.BACKSTOP_STREAM;
    process.env.BACKSTOP_STREAM = '0';
    let byEnv;
    let explicit;
    try {
      byEnv = make();
      explicit = make({ stream: true });
    } finally {
      if (saved === undefined) delete process.env.BACKSTOP_STREAM;
      else process.env.BACKSTOP_STREAM = saved;
    }
    assert.equal(byEnv.streaming, false);
    await workload(byEnv, 2);
    c = await rpcCounts(server);
    assert.deepEqual([c.CanProceed, c.Route, c.RecordOutcome], [5, 5, 10], JSON.stringify(c));
    assert.equal(c['Decide.CanProceed'], 0);

    assert.equal(explicit.streaming, true);
    await workload(explicit, 1);
    c = await rpcCounts(server);
    assert.deepEqual([c.CanProceed, c['Decide.CanProceed'], c['Decide.Route']], [5, 1, 1], JSON.stringify(c));
  });
});

test('concurrent decisions: answers arriving out of order reach the caller that asked', async () => {
  // A server that holds every item until 50 have arrived, then answers them in reverse order.
  const fake = await fakeServer((call) => {
    let held = [];
    call.on('data', (req) => {
      held.push(req);
      if (held.length < 50) return;
      for (const r of held.reverse()) call.write(answerFor(r));
      held = [];
    });
    call.on('end', () => call.end());
  });
  const bs = new Backstop(fake.address, { timeoutMs: 2000, logger: recordingLogger() });
  try {
    const targets = Array.from({ length: 100 }, (_, i) => `p/${i}`);
    const answers = await Promise.all(
      targets.map((t, i) => (i % 2 ? bs.canProceed(t) : bs.route([t, 'other/x']))),
    );
    answers.forEach((a, i) => {
      assert.equal(a.target, targets[i]);
      assert.equal(a.permit, `p-${targets[i]}`, 'the permit of this item, not of another');
      assert.equal(a.local, false);
    });
    assert.equal(fake.counts.streams, 1);
    assert.equal(fake.counts.canProceed + fake.counts.route, 0, 'no unary calls');
  } finally {
    bs.close();
    fake.close();
  }

  // And against the real server: 300 decisions in flight at once, each answered for its own target.
  await withServer(FAST, async (server, make) => {
    const live = make();
    const many = Array.from({ length: 300 }, (_, i) => `m/${i}`);
    const res = await Promise.all(many.map((t, i) => (i % 3 ? live.canProceed(t) : live.route([t]))));
    res.forEach((r, i) => {
      assert.equal(r.target, many[i]);
      assert.ok(r.permit && !r.local);
    });
    const c = await rpcCounts(server);
    assert.equal(c['Decide.CanProceed'] + c['Decide.Route'], 300, JSON.stringify(c));
  });
});

test('server killed and restarted mid-run: the fail-safe decides meanwhile, then the stream reconnects by itself', async () => {
  await withServer(FAST + CHAT, async (server, make) => {
    const logger = recordingLogger();
    const bs = make({ timeoutMs: 250, reconnectIntervalMs: 100, logger, localRoutes: { chat: [SONNET, GPT, HAIKU] } });
    const results = [];
    let stop = false;
    const loop = (async () => {
      while (!stop) {
        try {
          const r = await bs.call('chat', ({ target, local }) => ({ text: target, local }));
          results.push({ target: r.text, local: r.local, mode: bs.mode });
        } catch (e) {
          results.push({ error: String(e) });
        }
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    try {
      await waitFor(() => results.length >= 5, 10_000, 'calls through the live server');
      assert.ok(results.every((r) => r.target === SONNET && r.local === false), JSON.stringify(results));
      const before = await rpcCounts(server);
      assert.ok(before['Decide.Route'] >= 5 && before.Route === 0, JSON.stringify(before));

      await server.kill();
      await waitFor(() => bs.mode === 'local', 5000, 'the switch to local decisions');
      let n = results.length;
      await waitFor(() => results.length >= n + 10, 10_000, 'calls while Backstop is down');
      const down = results.slice(n);
      assert.ok(down.every((r) => r.target === SONNET && r.local === true), JSON.stringify(down.slice(0, 3)));

      await server.restart();
      await waitFor(() => bs.mode === 'remote', 10_000, 'reconnecting to the restarted server');
      n = results.length;
      await waitFor(() => results.slice(n).filter((r) => r.local === false).length >= 5, 10_000, 'remote calls after the restart');
      assert.ok(results.every((r) => !r.error), JSON.stringify(results.filter((r) => r.error).slice(0, 3)));
      const after = await rpcCounts(server); // the restarted process: counters start at 0
      assert.ok(after['Decide.Route'] >= 5, JSON.stringify(after));
      assert.equal(after.Route + after.CanProceed + after.RecordOutcome, 0, JSON.stringify(after));
      assert.equal(bs.streaming, true);
      const warns = logger.lines.filter(([lvl]) => lvl === 'warn').map(([, m]) => m);
      assert.match(warns[0], /unreachable \((CanProceed|Route|RecordOutcome): (UNAVAILABLE|DEADLINE_EXCEEDED)/, warns.join('\n'));
      assert.ok(warns.some((m) => m.includes('reachable again')), warns.join('\n'));
    } finally {
      stop = true;
      await loop;
    }
  });
});

test('per-item deadline: an unanswered item is decided by the fail-safe; a DEADLINE_EXCEEDED item error too', async () => {
  // Answers every item at once, except: "slow/*" never, "late/*" with the server's DEADLINE_EXCEEDED item error.
  const fake = await fakeServer((call) => {
    call.on('data', (req) => {
      const target = req.canProceed?.target ?? '';
      if (target.startsWith('slow/')) return;
      if (target.startsWith('late/')) {
        call.write({ id: req.id, error: { code: grpc.status.DEADLINE_EXCEEDED, message: 'not decided within the item deadline' } });
        return;
      }
      call.write(answerFor(req));
    });
    call.on('end', () => call.end());
  });
  const logger = recordingLogger();
  const bs = new Backstop(fake.address, { timeoutMs: 200, reconnectIntervalMs: 50, logger });
  try {
    const fast = await bs.canProceed('fast/a');
    assert.equal(fast.local, false);
    const t0 = performance.now();
    const [slow, other] = await Promise.all([bs.canProceed('slow/a'), bs.canProceed('fast/b')]);
    const took = performance.now() - t0;
    assert.equal(other.local, false, 'the other item on the same stream was answered');
    assert.equal(slow.local, true, 'decided locally');
    assert.equal(slow.allowed, true);
    assert.ok(took >= 190 && took < 2000, String(took));
    assert.match(logger.lines.map(([, m]) => m).join('\n'), /unreachable \(CanProceed: DEADLINE_EXCEEDED: no answer on the Decide stream within 200ms\)/);
    assert.equal(bs.mode, 'local');

    // The probe finds the server again; the next decision opens a fresh stream.
    await waitFor(() => bs.mode === 'remote', 5000, 'back to remote');
    assert.equal((await bs.canProceed('fast/c')).local, false);
    assert.equal(fake.counts.streams, 2, 'the stream that missed a deadline was replaced');

    const late = await bs.canProceed('late/a');
    assert.equal(late.local, true, 'the server gave up on the item: fail-safe');
    assert.equal(bs.mode, 'local');
    assert.equal(fake.counts.canProceed, 0, 'no unary calls');
  } finally {
    bs.close();
    fake.close();
  }
});

test('a server without Decide (UNIMPLEMENTED): unary calls from then on, remembered for the channel', async () => {
  const fake = await fakeServer(undefined);
  const logger = recordingLogger();
  const bs = new Backstop(fake.address, { timeoutMs: 1000, logger });
  const streams = countStreams(bs);
  try {
    assert.equal(bs.streaming, true, 'not known yet');
    // The first decisions are in flight on the stream when UNIMPLEMENTED comes back: they are re-sent as unary calls.
    const first = await Promise.all([bs.canProceed('a/x'), bs.canProceed('b/y'), bs.route(['c/z'])]);
    assert.deepEqual(first.map((a) => [a.target, a.permit, a.local]), [['a/x', 'unary', false], ['b/y', 'unary', false], ['c/z', 'p-c/z', false]]);
    assert.equal(bs.streaming, false);
    for (let i = 0; i < 10; i++) {
      const g = await bs.guard('a/x', () => ({ text: 'ok' }));
      assert.equal(g.text, 'ok');
    }
    assert.equal(streams.opened, 1, 'the stream was tried once');
    assert.deepEqual([fake.counts.canProceed, fake.counts.route, fake.counts.recordOutcome], [12, 1, 10]);
    assert.equal(bs.mode, 'remote');
    const warns = logger.lines.filter(([l]) => l === 'warn').map(([, m]) => m);
    assert.equal(warns.length, 1, warns.join('\n'));
    assert.match(warns[0], /does not implement the Decide stream.*unary calls/);
  } finally {
    bs.close();
    fake.close();
  }
});

test('item errors are the same typed errors as the unary calls give', async () => {
  await withServer(FAST + CHAT, async (_server, make) => {
    // NOT_FOUND: an unknown route; INVALID_ARGUMENT: a caller over the server's 256-byte limit.
    const outcomes = async (bs, long) => {
      const errs = [];
      for (const f of [() => bs.route('no-such-route'), () => long.canProceed(SONNET), () => long.recordOutcome(SONNET, { outcome: 'success' })]) {
        try {
          await f();
          errs.push('no error');
        } catch (e) {
          errs.push({ cls: e.constructor.name, code: e.code, method: e.method, message: e.message, isCpe: e instanceof ControlPlaneError });
        }
      }
      return errs;
    };
    const long = 'c'.repeat(300);
    const viaStream = await outcomes(make(), make({ caller: long }));
    const viaUnary = await outcomes(make({ stream: false }), make({ caller: long, stream: false }));
    assert.deepEqual(viaStream, viaUnary);
    assert.deepEqual(viaStream.map((e) => [e.cls, e.code, e.method]), [
      ['ControlPlaneError', grpc.status.NOT_FOUND, 'Route'],
      ['ControlPlaneError', grpc.status.INVALID_ARGUMENT, 'CanProceed'],
      ['ControlPlaneError', grpc.status.INVALID_ARGUMENT, 'RecordOutcome'],
    ]);
    const bs = make();
    await assert.rejects(bs.route('no-such-route'), (e) => e instanceof ControlPlaneError && !(e instanceof ControlPlaneUnavailable) && /NOT_FOUND/.test(e.message));
    assert.equal(bs.mode, 'remote', 'a refusal is not an outage');
    assert.equal((await bs.canProceed(SONNET)).local, false, 'the stream goes on after an item error');
  });

  // RESOURCE_EXHAUSTED (the stream is full): the item is sent again as a unary call.
  const fake = await fakeServer((call) => {
    call.on('data', (req) => call.write({ id: req.id, error: { code: grpc.status.RESOURCE_EXHAUSTED, message: 'this stream already has 1024 requests outstanding' } }));
    call.on('end', () => call.end());
  });
  const bs = new Backstop(fake.address, { timeoutMs: 1000, logger: recordingLogger() });
  try {
    const a = await bs.canProceed('a/x');
    assert.deepEqual([a.allowed, a.permit, a.local], [true, 'unary', false]);
    assert.equal(fake.counts.canProceed, 1);
    assert.equal(bs.streaming, true);
  } finally {
    bs.close();
    fake.close();
  }
});

test('an AbortSignal cancels a decision waiting on the stream (no fail-safe, the stream goes on)', async () => {
  const fake = await fakeServer((call) => {
    call.on('data', (req) => {
      if ((req.canProceed?.target ?? '').startsWith('hang/')) return;
      call.write(answerFor(req));
    });
    call.on('end', () => call.end());
  });
  const bs = new Backstop(fake.address, { timeoutMs: 5000, logger: recordingLogger() });
  try {
    await bs.canProceed('ok/a');
    const ac = new AbortController();
    const t0 = performance.now();
    setTimeout(() => ac.abort(new Error('user gave up')), 30);
    await assert.rejects(bs.canProceed('hang/a', { signal: ac.signal }), /user gave up/);
    assert.ok(performance.now() - t0 < 1000);
    // guard() passes its signal to the admission.
    const ac2 = new AbortController();
    setTimeout(() => ac2.abort(), 30);
    let ran = false;
    await assert.rejects(bs.guard('hang/b', () => (ran = true), { signal: ac2.signal }), { name: 'AbortError' });
    assert.equal(ran, false);
    assert.equal(bs.mode, 'remote');
    assert.equal((await bs.canProceed('ok/b')).local, false);
    assert.equal(fake.counts.streams, 1);
  } finally {
    bs.close();
    fake.close();
  }
});

test('a drain ends the stream cleanly before answering: the unread items go again on a new stream', async () => {
  const fake = await fakeServer((call, counts) => {
    if (counts.streams === 1) {
      call.once('data', () => call.end()); // "shutting down": status OK, the item never answered
      return;
    }
    call.on('data', (req) => call.write(answerFor(req)));
    call.on('end', () => call.end());
  });
  const bs = new Backstop(fake.address, { timeoutMs: 2000, logger: recordingLogger() });
  try {
    const a = await bs.canProceed('a/x');
    assert.deepEqual([a.permit, a.local], ['p-a/x', false]);
    assert.equal(fake.counts.streams, 2);
    assert.equal(bs.mode, 'remote');
  } finally {
    bs.close();
    fake.close();
  }
});

test('an idle stream is half-closed, so a process that forgets close() still exits', async () => {
  let ended = 0;
  const fake = await fakeServer((call) => {
    call.on('data', (req) => call.write(answerFor(req)));
    call.on('end', () => {
      ended += 1;
      call.end();
    });
  });
  const bs = new Backstop(fake.address, { timeoutMs: 1000, streamIdleMs: 50, logger: recordingLogger() });
  try {
    await bs.canProceed('a/x');
    await waitFor(() => ended === 1, 2000, 'the idle stream to be half-closed');
    assert.equal((await bs.canProceed('a/y')).local, false, 'the next decision opens a new stream');
    assert.equal(fake.counts.streams, 2);
  } finally {
    bs.close();
    fake.close();
  }

  await withServer(FAST, async (server) => {
    const script = `
      import { Backstop } from '@backstop/client';
      const bs = new Backstop(process.argv[1], { timeoutMs: 1000 });
      const a = await bs.canProceed('a/x');
      console.log(JSON.stringify({ local: a.local, streaming: bs.streaming }));`;
    const t0 = performance.now();
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script, server.address], { cwd: PKG, timeout: 10_000 });
    assert.deepEqual(JSON.parse(stdout), { local: false, streaming: true });
    assert.ok(performance.now() - t0 < 8000, 'exited after the default idle time');
    const c = await rpcCounts(server);
    assert.equal(c['Decide.CanProceed'], 1);
  });
});
