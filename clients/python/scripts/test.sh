#!/usr/bin/env bash
# Runs the Python client's test suite against the real backstop binary.
#
#   clients/python/scripts/test.sh [pytest args...]
#
# Creates (or reuses) a virtualenv at $ROOT/.ci/.cache/pyenv, installs the test
# dependencies and this package (a real, non-editable install, so packaging
# mistakes show up), builds target/debug/backstop if it is missing, and runs
# pytest with BACKSTOP_BIN pointing at it. Set BACKSTOP_BIN to test another binary.
set -euo pipefail
PKG="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$PKG/../.." && pwd)"
VENV="$ROOT/.ci/.cache/pyenv"
PYTHON="${PYTHON:-python3}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "python: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Dependencies: reinstalled only when pyproject.toml changes.
DEPS_STAMP="$VENV/.backstop-client-deps"
deps_hash="$(sha256sum "$PKG/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$DEPS_STAMP" 2>/dev/null || true)" != "$deps_hash" ]; then
  say "python: installing test dependencies"
  "$PY" -m pip install -q --disable-pip-version-check \
    "grpcio>=1.66.2" "protobuf>=5.27.2,<8" "grpcio-tools==1.66.2" "pytest>=7" "pydantic>=2,<3"
  echo "$deps_hash" > "$DEPS_STAMP"
fi

# The package itself: reinstalled when any of its files changes.
PKG_STAMP="$VENV/.backstop-client-src"
src_hash="$(cd "$PKG" && find . -path ./tests -prune -o -path ./examples -prune -o -type f \
  \( -name '*.py' -o -name '*.pyi' -o -name py.typed -o -name pyproject.toml -o -name README.md \) \
  ! -path '*/__pycache__/*' ! -path './build/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$PKG_STAMP" 2>/dev/null || true)" != "$src_hash" ]; then
  say "python: installing the backstop package"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$PKG"
  rm -rf "$PKG"/build "$PKG"/src/*.egg-info
  echo "$src_hash" > "$PKG_STAMP"
fi

if [ -z "${BACKSTOP_BIN:-}" ]; then
  BACKSTOP_BIN="$ROOT/target/debug/backstop"
  if [ ! -x "$BACKSTOP_BIN" ]; then
    say "building target/debug/backstop"
    (cd "$ROOT" && cargo build --bin backstop)
  fi
fi
export BACKSTOP_BIN

say "python: client tests (pytest, against $BACKSTOP_BIN)"
cd "$PKG"
exec "$PY" -m pytest -p no:cacheprovider "$@"
