#!/usr/bin/env bash
# Runs the Go client's checks on a fresh Debian machine:
#   installs what is missing (Go 1.19+, gRPC and protobuf for Go, protoc and
#   its Go plugins; Debian packages, --no-install-recommends), sets up GOPATH
#   mode (Debian ships grpc-go as GOPATH sources; there is no module proxy
#   here), checks gofmt and go vet, then runs every Go test against the real
#   server binary: $BACKSTOP_BIN, default $ROOT/target/debug/backstop.
#
#   clients/go/scripts/test.sh            # everything
#   clients/go/scripts/test.sh -run Call  # extra arguments go to `go test`
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE="$ROOT/.ci/.cache"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

# Debian package -> a file it installs (present = installed).
declare -A NEEDS=(
  [golang-go]=/usr/bin/go
  [golang-google-grpc-dev]=/usr/share/gocode/src/google.golang.org/grpc/clientconn.go
  [golang-google-protobuf-dev]=/usr/share/gocode/src/google.golang.org/protobuf/proto/proto.go
  # grpc-go 1.33 imports github.com/golang/protobuf; the default 1.3 package panics at run time.
  [golang-github-golang-protobuf-1-5-dev]=/usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go
  [protobuf-compiler]=/usr/bin/protoc
  [protoc-gen-go]=/usr/bin/protoc-gen-go
  [protoc-gen-go-grpc]=/usr/bin/protoc-gen-go-grpc
)
missing=()
for pkg in "${!NEEDS[@]}"; do
  [ -e "${NEEDS[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# GOPATH mode: the module path github.com/backstop-dev/backstop/... is this
# repository, linked into a private GOPATH beside Debian's /usr/share/gocode.
GOPATH_DIR="$CACHE/gopath"
LINK="$GOPATH_DIR/src/github.com/backstop-dev/backstop"
mkdir -p "$(dirname "$LINK")"
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK"
  ln -s "$ROOT" "$LINK"
fi
export GO111MODULE=off GOPATH="$GOPATH_DIR:/usr/share/gocode" GOPROXY=off GOFLAGS= GOCACHE="$CACHE/gocache"
export BACKSTOP_BIN="${BACKSTOP_BIN:-$ROOT/target/debug/backstop}"
export BACKSTOP_REQUIRE_PROTOC=1
cd "$LINK/clients/go"
go version

step "go client: gofmt and go vet"
unformatted=$(gofmt -l . | grep -v '^backstopv1/' || true)
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi
go vet ./...

step "go client: tests (server: $BACKSTOP_BIN)"
if [ ! -x "$BACKSTOP_BIN" ]; then
  echo "no backstop binary at $BACKSTOP_BIN: build it (cargo build) or set BACKSTOP_BIN" >&2
  exit 1
fi
go test -count=1 "$@" ./...
go build -o /dev/null ./examples/agentfleet
