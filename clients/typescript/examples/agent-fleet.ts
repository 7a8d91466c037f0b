/**
 * A fleet of agents sharing one Backstop: the five-minute demo.
 *
 * The classic three-model router (a Sonnet-class primary, a GPT-4o-class
 * fallback, a Haiku-class last resort) run by several agents, each with its
 * own client and connection as if it were its own process, against a fake
 * provider into which this script injects outages:
 *
 *   t = 20% .. 60%   the primary answers 529 overloaded
 *   t = 40% .. 55%   the fallback answers 429 with retry-after-ms
 *   t = 70% .. 80%   every model is down: requests are deferred to the queue
 *   afterwards       a deferred worker drains the queue once models recover
 *
 * Every agent asks Backstop before each call, so the fleet discovers each
 * outage once (the primary's breaker opens after a few failures, for every
 * agent at once), backs off together and resumes together. Each agent's
 * code is one `bs.call(...)`.
 *
 *   node build/examples/agent-fleet.js                       # starts backstop ($BACKSTOP_BIN)
 *   node build/examples/agent-fleet.js --agents 6 --duration 20
 *   node build/examples/agent-fleet.js --backstop 127.0.0.1:50051   # a running server with a "chat" route
 */
import { parseArgs } from 'node:util';
import { AllTargetsFailed, Backstop, type CallAttempt } from '@backstop/client';
import { BackstopServer, apiError, overloaded } from '@backstop/client/testing';

const SONNET = 'anthropic/claude-sonnet';
const GPT4O = 'openai/gpt-4o';
const HAIKU = 'anthropic/claude-haiku';
const ROUTE = [SONNET, GPT4O, HAIKU];

const CONFIG = `
# Short durations so the demo shows a whole outage cycle in seconds.
[defaults.breaker]
failure_threshold = 3
success_threshold = 2
open_duration = "1s"
max_open_duration = "2s"

[defaults.retry]
max_retries = 2
base_delay = "50ms"
max_delay = "400ms"

[routes.chat]
targets = ${JSON.stringify(ROUTE)}
`;

const { values: args } = parseArgs({
  options: {
    agents: { type: 'string', default: '4' },
    duration: { type: 'string', default: '10' },
    backstop: { type: 'string' },
  },
});
const agents = Number(args.agents);
const durationMs = Number(args.duration) * 1000;
if (!(agents >= 1) || !(durationMs >= 1000)) throw new TypeError('--agents must be >= 1 and --duration >= 1 (seconds)');

/** The fake provider: which models fail, and how, at this point of the run. */
function provider(started: number) {
  const calls: Record<string, number> = { [SONNET]: 0, [GPT4O]: 0, [HAIKU]: 0 };
  const call = async ({ target }: CallAttempt): Promise<{ text: string; model: string; usage: { input_tokens: number; output_tokens: number } }> => {
    calls[target] = (calls[target] ?? 0) + 1;
    await new Promise((r) => setTimeout(r, 5));
    const t = (performance.now() - started) / durationMs;
    if (t >= 0.7 && t < 0.8) throw overloaded();
    if (target === SONNET && t >= 0.2 && t < 0.6) throw overloaded();
    if (target === GPT4O && t >= 0.4 && t < 0.55) {
      throw apiError({ status: 429, sdk: 'openai', error: { type: 'requests', code: 'rate_limit_exceeded', message: 'Rate limit reached' }, headers: { 'retry-after-ms': '300' } });
    }
    return { text: `answer from ${target}`, model: target, usage: { input_tokens: 200, output_tokens: 50 } };
  };
  return { call, calls };
}

async function main(): Promise<void> {
  const server = args.backstop ? undefined : await BackstopServer.start(CONFIG);
  const address = args.backstop ?? server!.address;
  const started = performance.now();
  const fake = provider(started);
  const served: Record<string, number> = {};
  let fallbacks = 0;
  let deferred = 0;
  let failed = 0;
  const quiet = { warn: () => {}, error: (m: string) => console.error(m) };

  const agent = async (n: number): Promise<void> => {
    const bs = new Backstop(address, { caller: `agent-${n}`, timeoutMs: 1000, logger: quiet });
    try {
      while (performance.now() - started < durationMs) {
        try {
          const result = await bs.call('chat', fake.call, {
            estimatedTokens: 250,
            defer: { payload: { prompt: `question ${n}` }, metadata: { agent: String(n) } },
          });
          if ('deferred' in result) deferred += 1;
          else {
            served[result.model] = (served[result.model] ?? 0) + 1;
            if (result.model !== SONNET) fallbacks += 1;
          }
        } catch (e) {
          if (!(e instanceof AllTargetsFailed)) throw e;
          failed += 1;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    } finally {
      bs.close();
    }
  };
  await Promise.all(Array.from({ length: agents }, (_, i) => agent(i)));

  // The models are back: one worker drains what was deferred, at the rate Backstop admits.
  const bs = new Backstop(address, { caller: 'drainer', timeoutMs: 1000, logger: quiet });
  let drained = 0;
  const stats = await bs.worker('chat', { waitMs: 500 }).run(
    async (item) => {
      drained += 1;
      return fake.call({ target: item.target, maxTokens: 0, keySlot: item.keySlot, attempt: 0, local: false, signal: undefined });
    },
    { untilEmpty: true, timeoutMs: 30_000 },
  );
  const states = await Promise.all(ROUTE.map(async (t) => `${t}: ${(await bs.getTarget(t)).state}`));
  bs.close();
  await server?.close();

  console.log(`agents: ${agents}, duration: ${durationMs / 1000}s`);
  console.log(`served: ${ROUTE.map((t) => `${t} ${served[t] ?? 0}`).join(', ')}`);
  console.log(`served by a fallback model: ${fallbacks}`);
  console.log(`provider calls: ${ROUTE.map((t) => `${t} ${fake.calls[t]}`).join(', ')}`);
  console.log(`deferred while every model was down: ${deferred}; drained after recovery: ${drained} (acked ${stats.acked})`);
  console.log(`failed outright: ${failed}`);
  console.log(`breakers now: ${states.join(', ')}`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
