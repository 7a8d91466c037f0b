// Shared test helpers: where the server binary is, short configs, waiting for conditions.
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

/** $BACKSTOP_BIN, else $ROOT/target/debug/backstop. */
export function backstopBin() {
  const bin = process.env.BACKSTOP_BIN || join(ROOT, 'target/debug/backstop');
  if (!existsSync(bin)) throw new Error(`no backstop binary at ${bin}: set BACKSTOP_BIN or build it (cargo build)`);
  return bin;
}

/**
 * Short durations so tests stay fast: a breaker opens after 2 consecutive
 * failures, for 500 ms; retry delays are tens of milliseconds.
 */
export const FAST = `
[defaults.breaker]
failure_threshold = 2
success_threshold = 1
open_duration = "500ms"
max_open_duration = "1s"
jitter = 0.0
persistent_open_duration = "30s"

[defaults.retry]
max_retries = 2
base_delay = "10ms"
max_delay = "40ms"
`;

export const CHAT = `
[routes.chat]
targets = ["anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"]
`;

/** Polls `cond` every 20 ms until true; fails naming `what` after `timeoutMs`. Returns the ms it took. */
export async function waitFor(cond, timeoutMs, what) {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return performance.now() - t0;
}

/** A logger that records what the client says (for asserting the fail-safe logs once). */
export function recordingLogger() {
  const lines = [];
  return { lines, warn: (m) => lines.push(['warn', m]), error: (m) => lines.push(['error', m]) };
}

/**
 * SIGSTOP `pid` and wait until every thread of it is stopped. A signal reaches
 * threads running on another core a moment later; meanwhile a decision on an
 * open Decide stream could still be answered, so a test that expects a hung
 * server must not send until the kernel reports all of them stopped.
 */
export async function stopProcess(pid) {
  process.kill(pid, 'SIGSTOP');
  const stopped = () => {
    let tasks;
    try {
      tasks = readdirSync(`/proc/${pid}/task`);
    } catch {
      return true; // no procfs (not Linux): best effort
    }
    return tasks.every((t) => {
      try {
        const stat = readFileSync(`/proc/${pid}/task/${t}/stat`, 'utf8');
        const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
        return state === 'T' || state === 't';
      } catch {
        return true; // the thread exited meanwhile
      }
    });
  };
  await waitFor(async () => stopped(), 5_000, `process ${pid} to stop after SIGSTOP`);
}
