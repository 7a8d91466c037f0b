#!/usr/bin/env bash
# Keeps deploy/ honest: parses the Dockerfile, compose.yaml and every
# Kubernetes manifest, and checks them against the real server:
#
#   deploy/scripts/test.sh [pytest args...]
#
# flags they pass exist in `backstop serve --help`, configs they contain or
# mount pass `backstop check-config`, ports agree with the configs, and each
# config is started for real (with a real redis-server for cluster configs) to
# request the probe paths, run the image's health-check script and ask the
# gRPC health service. Needs redis-server (Debian: apt-get install
# redis-server). Python packages (PyYAML, pytest, grpcio, protobuf,
# kubernetes-validate) live in a virtualenv under $ROOT/.ci/.cache, reused
# between runs. target/debug/backstop is built if missing; set BACKSTOP_BIN to
# test another binary.
set -euo pipefail
DEPLOY="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
PYTHON="${PYTHON:-python3}"

say() {
  if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

DEPS=(
  "PyYAML>=6"
  "pytest>=7"
  "grpcio>=1.66.2"
  "protobuf>=5.27.2,<8"
  "kubernetes-validate>=1.30"
  "tomli>=2; python_version < '3.11'"
)
VENV="$ROOT/.ci/.cache/pyenv-deploy"
if [ ! -x "$VENV/bin/python" ]; then
  say "deploy: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.backstop-deps"
want="$(printf '%s\n' "${DEPS[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  say "deploy: installing ${DEPS[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "${DEPS[@]}"
  echo "$want" > "$stamp"
fi

if [ -z "${BACKSTOP_BIN:-}" ]; then
  BACKSTOP_BIN="$ROOT/target/debug/backstop"
  if [ ! -x "$BACKSTOP_BIN" ]; then
    say "building target/debug/backstop"
    (cd "$ROOT" && cargo build --bin backstop)
  fi
fi
export BACKSTOP_BIN

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_SERVER:-}" ]; then
  echo "deploy tests need redis-server (Debian/Ubuntu: apt-get install redis-server), or REDIS_SERVER=/path/to/it" >&2
  exit 2
fi

say "deploy: Dockerfile, compose.yaml, k8s/ against $BACKSTOP_BIN"
cd "$DEPLOY"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --rootdir "$DEPLOY" tests "$@"
