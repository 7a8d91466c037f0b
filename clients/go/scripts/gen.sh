#!/usr/bin/env bash
# Regenerates the Go stubs in clients/go/backstopv1 from proto/backstop/v1/*.proto.
#
#   clients/go/scripts/gen.sh            # writes clients/go/backstopv1/*.go
#   clients/go/scripts/gen.sh OUT_DIR    # writes OUT_DIR/backstopv1/*.go (the staleness test uses this)
#
# Needs protoc, protoc-gen-go and protoc-gen-go-grpc on PATH (Debian:
# protobuf-compiler protoc-gen-go protoc-gen-go-grpc; scripts/test.sh installs
# them). The output is checked in, so users of the client never need them.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-$HERE}
MODULE=github.com/backstop-dev/backstop/clients/go

for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "gen.sh: $tool is not on PATH (apt-get install protobuf-compiler protoc-gen-go protoc-gen-go-grpc)" >&2
    exit 2
  }
done

# The well-known types (duration, timestamp) ship with protoc; find their include dir.
INCLUDES=(-I "$ROOT/proto")
for d in /usr/include /usr/local/include; do
  if [ -f "$d/google/protobuf/duration.proto" ]; then INCLUDES+=(-I "$d"); break; fi
done

mkdir -p "$OUT/backstopv1"
rm -f "$OUT"/backstopv1/*.pb.go
protoc "${INCLUDES[@]}" \
  --go_out="$OUT" --go_opt=module="$MODULE" \
  --go-grpc_out="$OUT" --go-grpc_opt=module="$MODULE" \
  "$ROOT"/proto/backstop/v1/*.proto
