#!/usr/bin/env node
// Regenerates src/gen from proto/backstop/v1 with buf + ts-proto (versions pinned
// in package-lock.json), or with --check compares a fresh generation against the
// checked-in files and exits 1 naming every stale, missing or extra file.
//
//   node scripts/gen-proto.mjs            rewrite src/gen
//   node scripts/gen-proto.mjs --check    exit 1 if src/gen is stale
//   node scripts/gen-proto.mjs --check --out DIR   compare DIR instead (tests use this)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, cpSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const PKG = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const PROTO = resolve(PKG, '../../proto');
const args = process.argv.slice(2);
const check = args.includes('--check');
const outIdx = args.indexOf('--out');
const target = outIdx >= 0 ? resolve(args[outIdx + 1]) : join(PKG, 'src/gen');

function files(root) {
  const out = [];
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(root, p));
    }
  };
  if (existsSync(root)) walk(root);
  return out.sort();
}

const scratch = mkdtempSync(join(tmpdir(), 'backstop-gen-'));
try {
  const buf = join(PKG, 'node_modules/.bin/buf');
  if (!existsSync(buf)) {
    console.error('buf is not installed: run `npm ci` in clients/typescript first');
    process.exit(2);
  }
  // buf resolves the template's plugin path and `out` relative to the working directory.
  execFileSync(buf, ['generate', PROTO, '--template', join(PKG, 'buf.gen.yaml'), '--output', scratch], {
    cwd: PKG,
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const fresh = join(scratch, 'src/gen');
  if (!check) {
    rmSync(target, { recursive: true, force: true });
    cpSync(fresh, target, { recursive: true });
    console.log(`generated ${files(target).length} files into ${relative(PKG, target)}`);
    process.exit(0);
  }
  const want = files(fresh);
  const have = files(target);
  const problems = [];
  for (const f of want) {
    if (!have.includes(f)) problems.push(`${f}: missing (newly generated)`);
    else if (!readFileSync(join(fresh, f)).equals(readFileSync(join(target, f)))) problems.push(`${f}: stale`);
  }
  for (const f of have) if (!want.includes(f)) problems.push(`${f}: on disk but no longer generated`);
  if (problems.length) {
    console.error(`generated code in ${relative(PKG, target) || target} is out of date with proto/ (run \`npm run gen\`):`);
    for (const p of problems) console.error(`  ${p}`);
    process.exit(1);
  }
  console.log(`${want.length} generated files are up to date`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
