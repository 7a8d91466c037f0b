#!/usr/bin/env node
// Builds dist/esm (ES modules) and dist/cjs (CommonJS), each with .d.ts files.
// The package is "type": "module", so dist/cjs gets its own package.json saying
// "commonjs" for Node to load its .js files as CommonJS.
import { execFileSync } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const PKG = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const tsc = join(PKG, 'node_modules/typescript/bin/tsc');
rmSync(join(PKG, 'dist'), { recursive: true, force: true });
for (const config of ['tsconfig.esm.json', 'tsconfig.cjs.json']) {
  execFileSync(process.execPath, [tsc, '-p', join(PKG, config)], { stdio: 'inherit', cwd: PKG });
}
writeFileSync(join(PKG, 'dist/cjs/package.json'), '{ "type": "commonjs" }\n');
console.log('built dist/esm and dist/cjs');
