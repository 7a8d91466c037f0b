#!/usr/bin/env bash
# Runs every test Backstop has, on a fresh machine, with nothing installed by hand:
#   lint (fmt, clippy) -> Rust unit, property and end-to-end tests (the real binary
#   on ephemeral ports) -> client and browser suites.
# Missing system packages (redis-server, chromium) are installed from Debian's
# repositories; Python packages go into a virtualenv under .ci/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="$ROOT/.ci/.cache"
mkdir -p "$CACHE"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started=$(date +%s)

apt_install() {
  # Installs Debian packages if their command is missing. Uses sudo when not root.
  local cmd=$1; shift
  if command -v "$cmd" >/dev/null 2>&1; then return 0; fi
  step "installing $* (for $cmd)"
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

step "rust: unit, property and end-to-end tests"
cargo test --all-targets

step "python client: generated stubs, wrapper, fail-safe (pytest against the real binary)"
clients/python/scripts/test.sh -q

step "browser: the dashboard in headless Chromium"
apt_install chromium chromium
apt_install node nodejs npm
(cd tests/browser && npm install --no-audit --no-fund --loglevel=error)
cargo test --test e2e_dashboard -- --ignored

printf '\nall tests passed in %ss\n' "$(( $(date +%s) - started ))"
