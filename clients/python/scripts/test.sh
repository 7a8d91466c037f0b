#!/usr/bin/env bash
# Runs the Python client's test suite against the real backstop binary, with
# the dependency versions users actually get:
#
#   clients/python/scripts/test.sh [pytest args...]
#
# * "newest": what `pip install ./clients/python` resolves today (the newest
#   grpcio and protobuf the package allows, e.g. protobuf 7.x);
# * "oldest": the lowest versions pyproject.toml declares (grpcio 1.66.2,
#   protobuf 5.27.2), so the lower bounds are real.
# The suite runs once per set (PYTHON_DEPS=newest|oldest|both, default both).
# The stub generator (grpcio-tools, pinned; it needs protobuf < 6) lives in its
# own virtualenv, used by the staleness test through BACKSTOP_STUBGEN_PYTHON.
# Each virtualenv is under $ROOT/.ci/.cache and is reused; the package is a
# real, non-editable install, so packaging mistakes show up. target/debug/backstop
# is built if missing; set BACKSTOP_BIN to test another binary.
set -euo pipefail
PKG="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(cd "$PKG/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
SETS="${PYTHON_DEPS:-both}"

say() {
  if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi
}

# venv NAME PACKAGES...: creates (or reuses) $ROOT/.ci/.cache/pyenv-NAME with
# PACKAGES installed; reinstalls when the package list changes.
venv() {
  local name=$1; shift
  local dir="$ROOT/.ci/.cache/pyenv-$name"
  if [ ! -x "$dir/bin/python" ]; then
    say "python: creating virtualenv $dir"
    "$PYTHON" -m venv "$dir"
  fi
  local stamp="$dir/.backstop-deps" want
  want="$(printf '%s\n' "$@" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    say "python ($name): installing $*"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$@"
    echo "$want" > "$stamp"
  fi
  VENV_PY="$dir/bin/python"
}

# The package itself, into the given interpreter's venv, when any file changed.
install_pkg() {
  local py=$1
  local stamp; stamp="$(dirname "$(dirname "$py")")/.backstop-client-src"
  local src_hash
  src_hash="$(cd "$PKG" && find . -path ./tests -prune -o -path ./examples -prune -o -type f \
    \( -name '*.py' -o -name '*.pyi' -o -name py.typed -o -name pyproject.toml -o -name README.md \) \
    ! -path '*/__pycache__/*' ! -path './build/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$src_hash" ]; then
    "$py" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$PKG"
    rm -rf "$PKG"/build "$PKG"/src/*.egg-info
    echo "$src_hash" > "$stamp"
  fi
}

if [ -z "${BACKSTOP_BIN:-}" ]; then
  BACKSTOP_BIN="$ROOT/target/debug/backstop"
  if [ ! -x "$BACKSTOP_BIN" ]; then
    say "building target/debug/backstop"
    (cd "$ROOT" && cargo build --bin backstop)
  fi
fi
export BACKSTOP_BIN

venv gen "grpcio-tools==1.66.2"
export BACKSTOP_STUBGEN_PYTHON="$VENV_PY"

run_set() {
  local set=$1; shift
  case "$set" in
    newest) venv newest "grpcio>=1.66.2" "protobuf>=5.27.2,<8" "pytest>=7" "pydantic>=2,<3" "jsonschema>=4" ;;
    oldest) venv oldest "grpcio==1.66.2" "protobuf==5.27.2" "pytest>=7" "pydantic>=2,<3" "jsonschema>=4" ;;
    *) echo "unknown dependency set $set" >&2; exit 2 ;;
  esac
  install_pkg "$VENV_PY"
  local versions
  versions="$("$VENV_PY" -c 'import grpc, google.protobuf as p; print(f"grpcio {grpc.__version__}, protobuf {p.__version__}")')"
  say "python client tests ($set: $versions) against $BACKSTOP_BIN"
  (cd "$PKG" && "$VENV_PY" -m pytest -p no:cacheprovider "$@")
}

case "$SETS" in
  both) run_set newest "$@"; run_set oldest "$@" ;;
  *) run_set "$SETS" "$@" ;;
esac
