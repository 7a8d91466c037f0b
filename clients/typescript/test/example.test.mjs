// The agent-fleet example runs end to end (a shortened run) from its compiled form.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { backstopBin } from './helpers.mjs';

const PKG = join(dirname(fileURLToPath(import.meta.url)), '..');
const EXAMPLE = join(PKG, 'build/examples/agent-fleet.js');

test('examples/agent-fleet.ts: fallbacks during the outage, every deferral drained, nothing failed', async () => {
  assert.ok(existsSync(EXAMPLE), 'compile the examples first: tsc -p tsconfig.examples.json (scripts/test.sh does)');
  const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE, '--agents', '2', '--duration', '5'], {
    env: { ...process.env, BACKSTOP_BIN: backstopBin() },
    timeout: 120_000,
  });
  assert.ok(Number(/served by a fallback model: (\d+)/.exec(stdout)?.[1]) > 0, stdout);
  const m = /deferred while every model was down: (\d+); drained after recovery: (\d+)/.exec(stdout);
  assert.ok(m && Number(m[1]) > 0 && m[1] === m[2], stdout);
  assert.match(stdout, /failed outright: 0/);
});
