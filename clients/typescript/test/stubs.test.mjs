// The generated code in src/gen matches proto/ (regenerated with the pinned buf +
// ts-proto and compared byte for byte), and the check notices a stale file.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const PKG = join(dirname(fileURLToPath(import.meta.url)), '..');
const gen = (...args) => spawnSync(process.execPath, [join(PKG, 'scripts/gen-proto.mjs'), ...args], { encoding: 'utf8', timeout: 120_000 });

test('src/gen is up to date with proto/', () => {
  const out = gen('--check');
  assert.equal(out.status, 0, `generated code is stale; run \`npm run gen\`\n${out.stdout}${out.stderr}`);
});

test('the check detects a stale, a missing and an extra file', () => {
  const dir = mkdtempSync(join(tmpdir(), 'backstop-stale-'));
  try {
    cpSync(join(PKG, 'src/gen'), dir, { recursive: true });
    const f = join(dir, 'backstop/v1/deferred.ts');
    writeFileSync(f, readFileSync(f, 'utf8').replace('leaseToken', 'leaseTokn'));
    rmSync(join(dir, 'google/protobuf/duration.ts'));
    writeFileSync(join(dir, 'old.ts'), '// no longer generated\n');
    const out = gen('--check', '--out', dir);
    assert.equal(out.status, 1);
    assert.match(out.stderr, /backstop\/v1\/deferred\.ts: stale/);
    assert.match(out.stderr, /google\/protobuf\/duration\.ts: missing/);
    assert.match(out.stderr, /old\.ts: on disk but no longer generated/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
