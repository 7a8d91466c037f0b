// The shared client conformance scenarios (clients/conformance), run against
// this client: one test per scenario file, the real server with the
// scenario's config, an in-process scripted provider throwing errors shaped
// like the openai / @anthropic-ai/sdk packages' (./testing), the steps played
// through the public API, the expectations checked. The format is specified
// in clients/conformance/README.md; this file is one implementation of it.
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import Ajv2020 from 'ajv/dist/2020.js';
import {
  AllTargetsFailed,
  Backstop,
  BackstopUnreachable,
  CircuitOpen,
  ControlPlaneError,
  RateLimited,
  RequestTooLarge,
  StructuredOutputError,
  structured,
} from '@backstop/client';
import {
  APIConnectionError,
  APIConnectionTimeoutError,
  APIError,
  BackstopServer,
  apiError,
} from '@backstop/client/testing';
import { backstopBin } from './helpers.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const CONFORMANCE = join(HERE, '../../conformance');
const SCENARIOS = readdirSync(join(CONFORMANCE, 'scenarios'))
  .filter((f) => f.endsWith('.json'))
  .sort()
  .map((f) => join(CONFORMANCE, 'scenarios', f));

/** Capabilities of this client (see the README's "Capabilities"). */
const CAPABILITIES = new Set(['worker', 'reconcile']);

class Mismatch extends Error {}

// --- the scripted provider -------------------------------------------------------------------

class ScriptedProvider {
  constructor(spec = {}) {
    this.scripts = new Map();
    this.defaults = new Map();
    this.calls = [];
    for (const [target, s] of Object.entries(spec)) this.update(target, s);
  }

  update(target, s) {
    if (!this.scripts.has(target)) this.scripts.set(target, []);
    this.scripts.get(target).push(...(s.script ?? []));
    if ('default' in s) this.defaults.set(target, s.default);
  }

  async invoke(target, keySlot = '', correction = 0) {
    const call = { target, keySlot, correction, started: performance.now(), ended: 0 };
    this.calls.push(call);
    const q = this.scripts.get(target);
    const resp = (q && q.length ? q.shift() : this.defaults.get(target)) ?? {};
    try {
      if (resp.latency_ms) await new Promise((r) => setTimeout(r, resp.latency_ms));
      if (resp.failure === 'timeout') throw new APIConnectionTimeoutError();
      if (resp.failure === 'connection') throw new APIConnectionError();
      if (resp.failure === 'client_bug') throw new TypeError("Cannot read properties of undefined (reading 'content')");
      const status = resp.status ?? 200;
      if (status >= 300) throw apiError({ status, sdk: resp.sdk ?? 'anthropic', error: resp.error, headers: resp.headers });
      const u = resp.usage ?? {};
      const [inp, out] = [u.input_tokens ?? 10, u.output_tokens ?? 20];
      const usage = resp.sdk === 'openai' ? { prompt_tokens: inp, completion_tokens: out } : { input_tokens: inp, output_tokens: out };
      return { text: resp.text ?? `reply from ${target}`, usage, headers: { ...(resp.headers ?? {}) } };
    } finally {
      call.ended = performance.now();
    }
  }
}

// --- expectations ------------------------------------------------------------------------------

class Bindings {
  constructor() {
    this.values = new Map();
  }
  match(expected, actual, what) {
    if (!expected.startsWith('=')) {
      if (expected !== actual) throw new Mismatch(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
      return;
    }
    const name = expected.slice(1);
    if (this.values.has(name)) {
      if (this.values.get(name) !== actual) {
        throw new Mismatch(`${what}: ${expected} is bound to ${JSON.stringify(this.values.get(name))}, got ${JSON.stringify(actual)}`);
      }
      return;
    }
    for (const [other, v] of this.values) {
      if (v === actual) throw new Mismatch(`${what}: ${expected} would bind ${JSON.stringify(actual)}, already bound to =${other}`);
    }
    this.values.set(name, actual);
  }
  resolve(key, what) {
    if (!key.startsWith('=')) return key;
    if (!this.values.has(key.slice(1))) throw new Mismatch(`${what}: ${key} is not bound yet`);
    return this.values.get(key.slice(1));
  }
}

function inRange(value, range, what) {
  const lo = range.min ?? -Infinity;
  const hi = range.max ?? Infinity;
  if (!(value >= lo && value <= hi)) throw new Mismatch(`${what}: ${value} not in [${lo}, ${hi}]`);
}

const ERROR_TYPES = {
  AllTargetsFailed: (e) => e instanceof AllTargetsFailed,
  CircuitOpen: (e) => e instanceof CircuitOpen,
  RateLimited: (e) => e instanceof RateLimited,
  RequestTooLarge: (e) => e instanceof RequestTooLarge,
  BackstopUnreachable: (e) => e instanceof BackstopUnreachable,
  StructuredOutputError: (e) => e instanceof StructuredOutputError,
  ProviderError: (e) => e instanceof APIError,
  ClientBug: (e) => e instanceof TypeError,
};

function checkError(exp, err) {
  if (!ERROR_TYPES[exp.type](err)) throw new Mismatch(`expected ${exp.type}, got ${err?.constructor?.name}: ${err?.message}`);
  if ('reason' in exp && err.reason !== exp.reason) throw new Mismatch(`reason: expected ${exp.reason}, got ${err.reason}`);
  if ('retry_after_ms' in exp) {
    if (err.retryAfterMs === undefined) throw new Mismatch(`retry_after: expected a value, got none (${err.message})`);
    inRange(err.retryAfterMs, exp.retry_after_ms, 'retry_after_ms');
  }
  if ('status' in exp && err.status !== exp.status) throw new Mismatch(`status: expected ${exp.status}, got ${err.status}`);
  if ('local' in exp && err.local !== exp.local) throw new Mismatch(`local: expected ${exp.local}, got ${err.local}`);
  for (const needle of exp.message_contains ?? []) {
    if (!String(err.message).includes(needle)) throw new Mismatch(`message does not contain ${JSON.stringify(needle)}: ${err.message}`);
  }
}

function checkResult(exp, value) {
  if ('text' in exp) {
    const text = typeof value === 'string' ? value : value?.text;
    if (text !== exp.text) throw new Mismatch(`result text: expected ${JSON.stringify(exp.text)}, got ${JSON.stringify(text)}`);
  }
  if ('value' in exp) {
    try {
      assert.deepStrictEqual(value, exp.value);
    } catch {
      throw new Mismatch(`result value: expected ${JSON.stringify(exp.value)}, got ${JSON.stringify(value)}`);
    }
  }
  if ('deferred' in exp) {
    if (value?.deferred !== true) throw new Mismatch(`expected a Deferred, got ${JSON.stringify(value)}`);
    if (!value.id) throw new Mismatch('the Deferred has no id');
    const needle = exp.deferred.message_contains;
    if (needle !== undefined && !value.message.includes(needle)) {
      throw new Mismatch(`deferred message ${JSON.stringify(value.message)} does not contain ${JSON.stringify(needle)}`);
    }
  }
}

function checkCalls(exp, calls, bindings) {
  const got = calls.map((c) => `${c.target}[${c.keySlot}]#${c.correction}`);
  const wantTargets = exp.map((e) => e.target);
  if (JSON.stringify(wantTargets) !== JSON.stringify(calls.map((c) => c.target))) {
    throw new Mismatch(`provider calls: expected ${JSON.stringify(wantTargets)}, got ${JSON.stringify(got)}`);
  }
  exp.forEach((e, i) => {
    if ('key_slot' in e) bindings.match(e.key_slot, calls[i].keySlot, `call ${i} key_slot`);
    if ('correction' in e && e.correction !== calls[i].correction) {
      throw new Mismatch(`call ${i} correction: expected ${e.correction}, got ${calls[i].correction}`);
    }
  });
}

function checkGaps(exp, calls) {
  for (const g of exp) {
    const i = g.after;
    if (i + 1 >= calls.length) throw new Mismatch(`gap after call ${i}: only ${calls.length} calls`);
    const gap = calls[i + 1].started - calls[i].ended;
    inRange(gap, { min: g.min_ms, max: g.max_ms }, `gap after call ${i} (ms)`);
  }
}

const COUNTER = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

// --- the runner ---------------------------------------------------------------------------------

class Runner {
  constructor(scenario) {
    this.s = scenario;
    this.provider = new ScriptedProvider(scenario.provider ?? {});
    this.bindings = new Bindings();
  }

  client() {
    const c = this.s.client ?? {};
    const lp = c.local_policy;
    return new Backstop(this.server.address, {
      timeoutMs: c.timeout_ms ?? 1000,
      policy: c.policy ?? 'fail_open',
      reconnectIntervalMs: c.reconnect_interval_ms ?? 100,
      connectTimeoutMs: c.connect_timeout_ms ?? 1000,
      caller: c.caller ?? 'conformance',
      localRoutes: c.local_routes ?? {},
      logger: { warn: () => {}, error: (m) => console.error(m) },
      ...(lp
        ? {
            // failure_threshold -> failureThreshold, open_duration_ms -> openDurationMs, ...
            localPolicy: Object.fromEntries(Object.entries(lp).map(([k, v]) => [COUNTER(k), v])),
          }
        : {}),
    });
  }

  async run() {
    this.server = await BackstopServer.start(this.s.config, { binary: backstopBin() });
    try {
      this.bs = this.client();
      for (const [i, step] of this.s.steps.entries()) {
        try {
          await this.step(step);
        } catch (e) {
          if (e instanceof Mismatch) throw new Mismatch(`step ${i} (${step.op}): ${e.message}`);
          throw e;
        }
      }
    } finally {
      this.bs?.close();
      await this.server.close();
    }
  }

  async step(st) {
    switch (st.op) {
      case 'call':
      case 'guard':
        return this.act(st);
      case 'provider':
        return this.provider.update(st.target, st);
      case 'kill_server':
        return this.server.kill();
      case 'restart_server':
        return this.server.restart();
      case 'wait_mode': {
        const deadline = performance.now() + (st.within_ms ?? 10000);
        while (this.bs.mode !== st.mode) {
          if (performance.now() > deadline) throw new Mismatch(`mode is still ${this.bs.mode}, expected ${st.mode}`);
          await new Promise((r) => setTimeout(r, 20));
        }
        return;
      }
      case 'admin':
        if (st.action === 'reset') await this.bs.resetTarget(st.target);
        else await this.bs.setBreakerState(st.target, st.action);
        return;
      case 'drain':
        return this.drain(st);
      case 'expect_server':
        return this.expectServer(st);
      default:
        throw new Mismatch(`unknown op ${st.op}`);
    }
  }

  async act(st) {
    const exp = st.expect ?? {};
    const first = this.provider.calls.length;
    const started = performance.now();
    let value;
    let error;
    let failed = false;
    let guard;
    try {
      if (st.op === 'call') value = await this.call(st);
      else {
        value = await this.bs.guard(
          st.target,
          (g) => {
            guard = g;
            return this.provider.invoke(st.target, g.keySlot);
          },
          { estimatedTokens: st.estimated_tokens ?? 0, attempt: st.attempt ?? 0 },
        );
      }
    } catch (e) {
      error = e;
      failed = true;
    }
    const elapsed = performance.now() - started;
    const calls = this.provider.calls.slice(first);
    if (failed && !('error' in exp)) throw new Mismatch(`unexpected ${error?.constructor?.name}: ${error?.stack ?? error}`);
    if ('error' in exp) {
      if (!failed) throw new Mismatch(`expected ${exp.error.type}, but the step returned ${JSON.stringify(value)}`);
      checkError(exp.error, error);
    }
    if ('result' in exp) checkResult(exp.result, value);
    if ('calls' in exp) checkCalls(exp.calls, calls, this.bindings);
    if ('gaps' in exp) checkGaps(exp.gaps, calls);
    if ('max_duration_ms' in exp && elapsed > exp.max_duration_ms) {
      throw new Mismatch(`took ${elapsed.toFixed(0)} ms, expected at most ${exp.max_duration_ms}`);
    }
    if ('mode' in exp && this.bs.mode !== exp.mode) throw new Mismatch(`mode: expected ${exp.mode}, got ${this.bs.mode}`);
    if ('admission' in exp) {
      if (!guard) throw new Mismatch('no admission (the guard was refused)');
      const a = exp.admission;
      if ('local' in a && guard.admission.local !== a.local) throw new Mismatch(`admission.local: expected ${a.local}, got ${guard.admission.local}`);
      if ('key_slot' in a) this.bindings.match(a.key_slot, guard.admission.keySlot, 'admission key_slot');
    }
    if ('outcome' in exp) {
      const out = guard?.outcome;
      if (!out) throw new Mismatch('no outcome was reported');
      const o = exp.outcome;
      if ('classified_as' in o && out.classifiedAs !== o.classified_as) throw new Mismatch(`classified_as: expected ${o.classified_as}, got ${out.classifiedAs}`);
      if ('state' in o && out.state !== o.state) throw new Mismatch(`state: expected ${o.state}, got ${out.state}`);
      if ('retry' in o && out.retry.retry !== o.retry) throw new Mismatch(`retry: expected ${o.retry}, got ${out.retry.retry}`);
      if ('retry_reason' in o && out.retry.reason !== o.retry_reason) throw new Mismatch(`retry_reason: expected ${o.retry_reason}, got ${out.retry.reason}`);
      if ('delay_ms' in o) inRange(out.retry.delayMs, o.delay_ms, 'retry delay_ms');
    }
  }

  call(st) {
    const opts = {
      estimatedTokens: st.estimated_tokens ?? 0,
      requiredContextTokens: st.required_context_tokens ?? 0,
      exclude: st.exclude ?? [],
    };
    if (st.defer) {
      opts.defer = { payload: st.defer.payload, metadata: st.defer.metadata, idempotencyKey: st.defer.idempotency_key };
    }
    const fn = st.structured
      ? structured(
          st.structured.schema,
          async (a) => (await this.provider.invoke(a.target, a.keySlot, a.correction?.number ?? 0)).text,
          { maxCorrections: st.structured.max_corrections ?? 2 },
        )
      : (a) => this.provider.invoke(a.target, a.keySlot);
    return this.bs.call(st.route, fn, opts);
  }

  async drain(st) {
    const handled = [];
    const first = this.provider.calls.length;
    const within = st.within_ms ?? 10000;
    const worker = this.bs.worker(st.queue, { waitMs: 200, leaseMs: 30000, retryDelayMs: 50 });
    await worker.run(
      (item) => {
        handled.push({ target: item.target, payload: item.text() });
        return this.provider.invoke(item.target, item.keySlot);
      },
      { untilEmpty: true, timeoutMs: within },
    );
    const left = (await this.bs.queueStats(st.queue)).filter((q) => q.queue === st.queue && (q.depth || q.inFlight));
    if (left.length) throw new Mismatch(`queue ${st.queue} not drained within ${within} ms: ${JSON.stringify(left)}`);
    const exp = st.expect ?? {};
    if (exp.handled) {
      const got = handled.map((h, i) => Object.fromEntries(Object.entries(h).filter(([k]) => k in (exp.handled[i] ?? {}))));
      if (handled.length !== exp.handled.length || JSON.stringify(got) !== JSON.stringify(exp.handled)) {
        throw new Mismatch(`handled: expected ${JSON.stringify(exp.handled)}, got ${JSON.stringify(handled)}`);
      }
    }
    if (exp.calls) checkCalls(exp.calls, this.provider.calls.slice(first), this.bindings);
  }

  async expectServer(st) {
    const deadline = performance.now() + (st.within_ms ?? 0);
    for (;;) {
      try {
        return await this.checkServer(st);
      } catch (e) {
        if (!(e instanceof Mismatch || e instanceof ControlPlaneError) || performance.now() >= deadline) throw e;
        await new Promise((r) => setTimeout(r, 25));
      }
    }
  }

  async checkServer(st) {
    for (const [target, exp] of Object.entries(st.targets ?? {})) {
      let status;
      try {
        status = await this.bs.getTarget(target);
      } catch (e) {
        if (e instanceof ControlPlaneError && e.code === 5 && exp.exists === false) continue;
        throw e;
      }
      if (exp.exists === false) throw new Mismatch(`${target}: expected NOT_FOUND, but the server knows it`);
      if ('state' in exp && status.state !== exp.state) throw new Mismatch(`${target}: state ${status.state}, expected ${exp.state} (${status.lastCause})`);
      if ('consecutive_failures' in exp && status.consecutiveFailures !== exp.consecutive_failures) {
        throw new Mismatch(`${target}: consecutive_failures ${status.consecutiveFailures}, expected ${exp.consecutive_failures}`);
      }
      for (const [name, want] of Object.entries(exp.counters ?? {})) {
        const got = status.counters[COUNTER(name)];
        if (got !== want) throw new Mismatch(`${target}: counters.${name} = ${got}, expected ${want} (all: ${JSON.stringify(status.counters)})`);
      }
      const slots = new Map(status.keySlots.map((k) => [k.name, k]));
      for (const [key, want] of Object.entries(exp.key_slots ?? {})) {
        const name = this.bindings.resolve(key, `${target} key_slots`);
        const ks = slots.get(name);
        if (!ks) throw new Mismatch(`${target}: no key slot ${JSON.stringify(name)} (has ${JSON.stringify([...slots.keys()])})`);
        if ('disabled' in want && ks.disabled !== want.disabled) throw new Mismatch(`${target}: key slot ${name} disabled=${ks.disabled}, expected ${want.disabled}`);
        if ('paused' in want) {
          const paused = ks.pausedUntil !== undefined && ks.pausedUntil.getTime() > Date.now();
          if (paused !== want.paused) throw new Mismatch(`${target}: key slot ${name} paused=${paused}, expected ${want.paused}`);
        }
      }
      for (const [kind, range] of Object.entries(exp.budgets ?? {})) {
        const b = status.keySlots[0]?.budgets.find((x) => x.kind === kind);
        if (!b) throw new Mismatch(`${target}: no ${kind} budget`);
        inRange(b.available, range, `${target}: ${kind} budget available`);
      }
    }
    for (const [queue, want] of Object.entries(st.queues ?? {})) {
      const q = (await this.bs.queueStats(queue)).find((x) => x.queue === queue);
      for (const [k, v] of Object.entries(want)) {
        const got = q ? q[COUNTER(k)] : 0;
        if (got !== v) throw new Mismatch(`queue ${queue}: ${k} = ${got}, expected ${v}`);
      }
    }
  }
}

function load(path) {
  const data = JSON.parse(readFileSync(path, 'utf8'));
  if (data.format !== 1) throw new Error(`${basename(path)}: format ${data.format} is not 1`);
  if (data.name !== basename(path, '.json')) throw new Error(`${basename(path)}: name ${data.name} must equal the file stem`);
  return data;
}

test('the suite is there', () => {
  assert.ok(SCENARIOS.length >= 10, `no scenarios under ${CONFORMANCE}`);
});

test('every scenario matches the schema, and the schema rejects typos', () => {
  const ajv = new Ajv2020({ allErrors: true, strict: false });
  const validate = ajv.compile(JSON.parse(readFileSync(join(CONFORMANCE, 'scenario.schema.json'), 'utf8')));
  for (const path of SCENARIOS) {
    const ok = validate(JSON.parse(readFileSync(path, 'utf8')));
    assert.ok(ok, `${basename(path)}: ${ajv.errorsText(validate.errors)}`);
  }
  const typo = JSON.parse(readFileSync(SCENARIOS[0], 'utf8'));
  typo.steps[0].expect = { ...(typo.steps[0].expect ?? {}), calsl: [] };
  assert.equal(validate(typo), false);
});

for (const path of SCENARIOS) {
  const scenario = load(path);
  const missing = (scenario.requires ?? []).filter((c) => !CAPABILITIES.has(c));
  test(`scenario ${scenario.name}`, { skip: missing.length ? `lacks capability ${missing.join(', ')}` : false }, async () => {
    await new Runner(scenario).run();
  });
}
