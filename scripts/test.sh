#!/usr/bin/env bash
# Runs every test Backstop has, on a fresh machine, with nothing installed by hand:
#   lint (fmt, clippy) -> Rust unit, property and end-to-end tests (the real binary
#   on ephemeral ports) -> a real Prometheus over the metrics -> the Python,
#   TypeScript and Go clients (each with the shared conformance suite) -> the
#   dashboard in headless Chromium.
# Missing system packages come from Debian's repositories (--no-install-recommends,
# and each is named before it is installed); Python packages go into virtualenvs
# and npm packages into node_modules, all under the repository (.ci/.cache).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="$ROOT/.ci/.cache"
mkdir -p "$CACHE"

# Colour only for a person at a terminal (and never with NO_COLOR set).
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m'; plain=$'\033[0m'; else bold=""; plain=""; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
started=$(date +%s)

# apt_install CMD PACKAGE...: installs PACKAGE... from Debian if CMD is missing.
apt_install() {
  local cmd=$1; shift
  if command -v "$cmd" >/dev/null 2>&1; then return 0; fi
  step "installing Debian packages: $* (for $cmd)"
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  echo "installed: $*"
}

step "format and lint"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

step "rust: unit, property and end-to-end tests (cluster tests start their own redis-server)"
apt_install redis-server redis-server redis-tools
cargo test --all-targets

step "metrics: a real Prometheus scrapes the server and evaluates the Grafana dashboard's queries"
apt_install prometheus prometheus
cargo test --test e2e_prometheus -- --ignored

export BACKSTOP_BIN="$ROOT/target/debug/backstop"

step "python client: stubs, wrapper, fail-safe, conformance (newest and oldest grpcio/protobuf)"
apt_install python3 python3 python3-venv
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of python3.
  step "installing Debian packages: python3-venv (python3 cannot create virtualenvs)"
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  echo "installed: python3-venv"
fi
clients/python/scripts/test.sh -q

step "typescript client: generated code, strict type-check, unit / e2e / conformance (node --test)"
apt_install node nodejs npm
clients/typescript/scripts/test.sh

step "go client: stubs, gofmt, vet, unit / e2e / conformance (GOPATH mode, Debian's Go)"
clients/go/scripts/test.sh

step "deploy: Dockerfile, compose, Kubernetes manifests against the real binary (and a real redis-server)"
deploy/scripts/test.sh -q

step "browser: the dashboard in headless Chromium"
apt_install chromium chromium
(cd tests/browser && npm install --no-audit --no-fund --loglevel=error)
cargo test --test e2e_dashboard -- --ignored

printf '\nall tests passed in %ss\n' "$(( $(date +%s) - started ))"
