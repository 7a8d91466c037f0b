// End-to-end tests against the real binary: a breaker shared by two Node
// processes, killing and restarting the server mid-run (fail-safe, then
// recovery and reconciliation), a hung server, the event stream, the worker
// iterator, cancellation, bearer tokens, and the CommonJS build.
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { AllTargetsFailed, Backstop, CircuitOpen, ControlPlaneError, structured } from '@backstop/client';
import { BackstopServer, overloaded } from '@backstop/client/testing';
import { CHAT, FAST, backstopBin, recordingLogger, stopProcess, waitFor } from './helpers.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const PKG = join(HERE, '..');
const run = promisify(execFile);
const SONNET = 'anthropic/sonnet';
const GPT = 'openai/gpt-4o';
const HAIKU = 'anthropic/haiku';

async function withServer(config, fn) {
  const server = await BackstopServer.start(config, { binary: backstopBin() });
  const clients = [];
  const make = (opts = {}) => {
    const c = new Backstop(server.address, { timeoutMs: 1000, caller: 'e2e', logger: recordingLogger(), ...opts });
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

async function agent(address, mode, target, count) {
  const { stdout } = await run(process.execPath, [join(HERE, 'agent-process.mjs'), address, mode, target, String(count)], { cwd: PKG });
  return stdout.trim().split('\n').map((l) => JSON.parse(l));
}

test('two processes share one breaker: one trips it, the other is refused without calling', async () => {
  const config = FAST.replace('open_duration = "500ms"', 'open_duration = "30s"').replace('max_open_duration = "1s"', 'max_open_duration = "60s"');
  await withServer(config, async (server, make) => {
    const a = await agent(server.address, 'fail', SONNET, 2);
    assert.deepEqual(a.map((r) => [r.ok, r.called, r.error]), [[false, true, 'InternalServerError'], [false, true, 'InternalServerError']]);
    const b = await agent(server.address, 'ok', SONNET, 2);
    for (const r of b) {
      assert.equal(r.called, false, 'the second process never reached the provider');
      assert.equal(r.error, 'CircuitOpen');
      assert.equal(r.reason, 'circuit_open');
      assert.equal(r.mode, 'remote');
      assert.ok(r.retryAfterMs > 20_000 && r.retryAfterMs <= 30_000, String(r.retryAfterMs));
    }
    const status = await make().getTarget(SONNET);
    assert.equal(status.state, 'open');
    assert.deepEqual([status.counters.admitted, status.counters.transient, status.counters.refused], [2, 2, 2]);
  });
});

test('kill -9 mid-run: calls go on locally (local breaker, fallback), then the client returns to the server by itself', async () => {
  await withServer(FAST + CHAT, async (server, make) => {
    const logger = recordingLogger();
    const bs = make({
      timeoutMs: 250,
      reconnectIntervalMs: 100,
      logger,
      localRoutes: { chat: [SONNET, GPT, HAIKU] },
      localPolicy: { failureThreshold: 2, openDurationMs: 500, baseDelayMs: 10, maxDelayMs: 40, maxRetries: 2 },
    });
    let sonnetDown = false;
    const providerCalls = { [SONNET]: 0, [GPT]: 0, [HAIKU]: 0 };
    const results = [];
    let stop = false;
    const loop = (async () => {
      while (!stop) {
        try {
          const reply = await bs.call('chat', async ({ target }) => {
            providerCalls[target] += 1;
            if (target === SONNET && sonnetDown) throw overloaded();
            return { text: target, usage: { input_tokens: 1, output_tokens: 1 } };
          });
          results.push({ target: reply.text, mode: bs.mode });
        } catch (e) {
          results.push({ error: String(e), mode: bs.mode });
        }
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    try {
      await waitFor(() => results.length >= 5, 10_000, 'calls through the live server');
      assert.ok(results.every((r) => r.target === SONNET && r.mode === 'remote'));

      await server.kill();
      await waitFor(() => bs.mode === 'local', 5000, 'the switch to local decisions');
      let n = results.length;
      await waitFor(() => results.length >= n + 10, 10_000, 'calls while Backstop is down');

      // An outage of the primary while the control plane is down: the local
      // breaker opens after 2 failures and the local route falls back.
      sonnetDown = true;
      const sonnetBefore = providerCalls[SONNET];
      n = results.length;
      await waitFor(() => results.length >= n + 15, 10_000, 'local fallback calls');
      const recent = results.slice(-5);
      assert.deepEqual(new Set(recent.map((r) => r.target)), new Set([GPT]));
      assert.ok(recent.every((r) => r.mode === 'local'));
      // Backoff and the local breaker bound the calls to the failing model
      // (2 failures open it; each 500 ms half-open admits one probe).
      assert.ok(providerCalls[SONNET] - sonnetBefore <= 8, String(providerCalls[SONNET] - sonnetBefore));
      sonnetDown = false;

      await server.restart();
      const took = await waitFor(() => bs.mode === 'remote', 10_000, 'reconnecting to the restarted server');
      assert.ok(took < 5000, String(took));
      n = results.length;
      await waitFor(() => results.length >= n + 5, 10_000, 'calls after the restart');
      assert.ok(results.slice(n + 1).every((r) => r.mode === 'remote'));
      // The outcomes decided locally were reconciled: the restarted server counts
      // the local failures of sonnet (it was ephemeral in no way: the data dir is
      // kept, but counters written behind may lag, so only what happened while
      // down is asserted, as a lower bound).
      await waitFor(async () => (await bs.getTarget(SONNET)).counters.transient >= 2, 5000, 'reconciled failures');
    } finally {
      stop = true;
      await loop;
    }
    assert.deepEqual(results.filter((r) => r.error), []);
    const down = logger.lines.filter(([, m]) => m.includes('is unreachable'));
    const back = logger.lines.filter(([, m]) => m.includes('reachable again'));
    assert.equal(down.length, 1, JSON.stringify(logger.lines));
    assert.equal(back.length, 1, JSON.stringify(logger.lines));
  });
});

test('a hung server costs one short deadline, then decisions are local and instant until it answers again', async () => {
  await withServer(FAST, async (server, make) => {
    const bs = make({ timeoutMs: 50, reconnectIntervalMs: 100 });
    // 50 ms is tight for a loaded 2-core CI machine running tests in parallel:
    // a missed deadline here would (correctly) switch to local mode, so wait for a remote answer.
    const remoteAnswer = async () => bs.mode === 'remote' && !(await bs.canProceed('hung/model')).local;
    await waitFor(remoteAnswer, 10_000, 'a remote answer before the server hangs');
    await stopProcess(server.pid);
    try {
      let t0 = performance.now();
      const adm = await bs.canProceed('hung/model');
      assert.ok(adm.allowed && adm.local);
      assert.ok(performance.now() - t0 < 500, String(performance.now() - t0));
      t0 = performance.now();
      for (let i = 0; i < 20; i++) assert.ok((await bs.canProceed('hung/model')).local);
      assert.ok(performance.now() - t0 < 200);
    } finally {
      process.kill(server.pid, 'SIGCONT');
    }
    await waitFor(remoteAnswer, 10_000, 'recovery after SIGCONT');
  });
});

test('an agent that starts before its control plane decides locally, then connects', async () => {
  const server = new BackstopServer(FAST, { binary: backstopBin() });
  await server.start();
  const port = server.port;
  await server.kill();
  const bs = new Backstop(`127.0.0.1:${port}`, { timeoutMs: 50, connectTimeoutMs: 300, reconnectIntervalMs: 100, logger: recordingLogger() });
  try {
    const t0 = performance.now();
    const adm = await bs.canProceed(SONNET);
    assert.ok(adm.allowed && adm.local && performance.now() - t0 < 1000);
    await server.start();
    await waitFor(() => bs.mode === 'remote', 10_000, 'connecting once the server is up');
    assert.equal((await bs.canProceed(SONNET)).local, false);
  } finally {
    bs.close();
    await server.close();
  }
});

test('watch(): a snapshot, then the breaker transition, as an async iterator', async () => {
  await withServer(FAST, async (server, make) => {
    const bs = make();
    const ac = new AbortController();
    const seen = [];
    const reading = (async () => {
      for await (const ev of bs.watch({ targets: [SONNET], signal: ac.signal })) {
        seen.push(ev);
        if (ev.kind === 'breaker_transition') ac.abort();
      }
    })();
    await waitFor(() => seen.some((e) => e.kind === 'snapshot'), 5000, 'the snapshot');
    for (let i = 0; i < 2; i++) {
      await assert.rejects(bs.guard(SONNET, () => {
        throw overloaded();
      }));
    }
    await reading;
    const t = seen.find((e) => e.kind === 'breaker_transition');
    assert.deepEqual([t.target, t.from, t.to], [SONNET, 'closed', 'open']);
    assert.ok(t.seq > seen[0].seq || seen[0].seq === 0);
  });
});

test('the worker is an async iterator of admitted items: ack reports success, nack dead-letters the last attempt', async () => {
  const config = FAST + '\n[queue]\ndefault_max_attempts = 1\n' + CHAT;
  await withServer(config, async (server, make) => {
    const bs = make();
    await bs.defer('chat', { prompt: 'one' });
    await bs.defer('chat', { prompt: 'two' });
    const w = bs.worker('chat', { waitMs: 200 });
    const got = [];
    for await (const item of w.items({ untilEmpty: true })) {
      got.push([item.target, item.json().prompt, item.attempt]);
      if (item.json().prompt === 'one') await item.ack({ usage: { input_tokens: 2, output_tokens: 3 } });
      else assert.equal((await item.nack(new Error('handler failed'))).deadLettered, true);
    }
    assert.deepEqual(got, [[SONNET, 'one', 1], [SONNET, 'two', 1]]);
    assert.deepEqual([w.stats.acked, w.stats.nacked, w.stats.deadLettered], [1, 1, 1]);
    const dead = await bs.deadLetters('chat');
    assert.equal(dead.length, 1);
    assert.match(dead[0].lastError, /handler failed/);
    const s = await bs.getTarget(SONNET);
    assert.deepEqual([s.counters.success, s.counters.badInput], [1, 1], 'a plain handler error is the agent’s, not the provider’s');
  });
});

test('an AbortSignal stops call() during a retry wait; the attempt is reported and the abort propagates', async () => {
  const config = CHAT + '\n[defaults.retry]\nbase_delay = "5s"\nmax_delay = "5s"\nstrategy = "equal"\n';
  await withServer(config, async (server, make) => {
    const bs = make();
    const ac = new AbortController();
    const t0 = performance.now();
    let calls = 0;
    const p = bs.call('chat', () => {
      calls += 1;
      setTimeout(() => ac.abort(), 50);
      throw overloaded();
    }, { signal: ac.signal });
    await assert.rejects(p, (e) => e.name === 'AbortError');
    assert.ok(performance.now() - t0 < 2000, 'did not sleep the 2.5-5 s backoff');
    assert.equal(calls, 1);
    assert.equal((await bs.getTarget(SONNET)).counters.transient, 1);
  });
});

test('structured() over a real route with zod: a PARTIAL, a correction, the value', async () => {
  const { z } = await import('zod');
  await withServer(FAST + CHAT, async (server, make) => {
    const bs = make();
    const prompts = [];
    const value = await bs.call('chat', structured(z.object({ answer: z.number() }), ({ correction }) => {
      prompts.push(correction?.prompt ?? null);
      return correction ? '{"answer": 42}' : 'Sure! The answer is 42.';
    }));
    assert.deepEqual(value, { answer: 42 });
    assert.equal(prompts[0], null);
    assert.match(prompts[1], /could not be used/);
    const c = (await bs.getTarget(SONNET)).counters;
    assert.deepEqual([c.partial, c.success], [1, 1]);
  });
});

test('bearer tokens: admin calls carry authorization metadata', async () => {
  await withServer(FAST + '\n[server]\nadmin_token = "s3cret-admin-token-0123"\n', async (server, make) => {
    const anon = make();
    await assert.rejects(anon.getTarget('x'), (e) => e instanceof ControlPlaneError && e.code === 16);
    const admin = make({ token: 's3cret-admin-token-0123' });
    await admin.canProceed('x');
    assert.equal((await admin.getTarget('x')).counters.admitted, 1);
    const split = make({ token: 'agent-token', adminToken: 's3cret-admin-token-0123' });
    assert.equal((await split.getTarget('x')).target, 'x');
  });
});

test('fail_closed refuses while unreachable, and AllTargetsFailed lists every target', async () => {
  await withServer(FAST + CHAT, async (server, make) => {
    const bs = make({ timeoutMs: 250, policy: 'fail_closed', localRoutes: { chat: [SONNET, GPT] }, reconnectIntervalMs: 100 });
    await bs.guard(SONNET, () => 1);
    await server.kill();
    await assert.rejects(bs.guard(SONNET, () => assert.fail('must not run')), (e) => e.name === 'BackstopUnreachable' && e.local);
    await assert.rejects(bs.call('chat', () => assert.fail('must not run')), (e) => e instanceof AllTargetsFailed && e.errors.every((x) => x.reason === 'control_plane_unavailable'));
  });
});

test('the CommonJS build loads with require() and has the same API', () => {
  const dir = mkdtempSync(join(tmpdir(), 'backstop-cjs-'));
  try {
    const file = join(dir, 'check.cjs');
    writeFileSync(file, `const b = require(${JSON.stringify(PKG)}); const t = require(${JSON.stringify(join(PKG, 'dist/cjs/testing.js'))});
      const e = new b.CircuitOpen('t', 'circuit_open', 'open', 1500, false);
      console.log(JSON.stringify([typeof b.Backstop, e instanceof b.Refused, e.retryAfter, typeof t.BackstopServer]));`);
    const out = spawnSync(process.execPath, [file], { encoding: 'utf8' });
    assert.equal(out.status, 0, out.stderr);
    assert.deepEqual(JSON.parse(out.stdout), ['function', true, 1.5, 'function']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('CircuitOpen from guard() says when to come back', async () => {
  await withServer(FAST, async (server, make) => {
    const bs = make();
    await bs.setBreakerState(HAIKU, 'force_open', 'maintenance');
    await assert.rejects(bs.guard(HAIKU, () => assert.fail('must not run')), (e) => e instanceof CircuitOpen && e.reason === 'forced_open');
  });
});
