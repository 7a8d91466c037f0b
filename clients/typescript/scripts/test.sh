#!/usr/bin/env bash
# Runs the TypeScript client's checks on a fresh machine, against the real backstop binary:
#
#   clients/typescript/scripts/test.sh [node --test args...]
#
# npm ci (only when package-lock.json changed) -> generated-code staleness ->
# build (ESM + CommonJS + .d.ts) -> strict type-check of src and examples (the
# lint) -> every test under test/ (unit, e2e, conformance, example) with
# BACKSTOP_BIN pointing at the server binary (default $ROOT/target/debug/backstop,
# built with cargo if missing). Needs Node 20+ (installed from Debian if absent).
set -euo pipefail
PKG="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$PKG/../.." && pwd)"
cd "$PKG"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "typescript: installing nodejs and npm (Debian)"
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "Node $(node --version) is too old: the client and its tests need Node 20 or newer" >&2
  exit 1
fi

# Dependencies: reinstalled only when the lockfile changes.
stamp="node_modules/.backstop-lock-hash"
lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$lock_hash" ]; then
  say "typescript: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > "$stamp"
fi

say "typescript: generated code is up to date with proto/"
node scripts/gen-proto.mjs --check

say "typescript: build (ESM, CommonJS, .d.ts)"
node scripts/build.mjs

say "typescript: strict type-check (src, examples) and compile the examples"
node node_modules/typescript/bin/tsc -p tsconfig.json --noEmit
node node_modules/typescript/bin/tsc -p tsconfig.examples.json

if [ -z "${BACKSTOP_BIN:-}" ]; then
  BACKSTOP_BIN="$ROOT/target/debug/backstop"
  if [ ! -x "$BACKSTOP_BIN" ]; then
    say "building target/debug/backstop"
    (cd "$ROOT" && cargo build --bin backstop)
  fi
fi
export BACKSTOP_BIN

say "typescript: tests (node --test, against $BACKSTOP_BIN)"
exec node --test --test-concurrency=2 "$@" test/
