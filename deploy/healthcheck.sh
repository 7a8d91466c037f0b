#!/bin/bash
# Container health check: `backstop-healthcheck [PORT [PATH]]` asks
# GET PATH (default /readyz) on 127.0.0.1:PORT (default 9464), the HTTP
# listener, and exits 0 only on a 200.
#
# Why HTTP /readyz rather than the gRPC health service: Debian packages
# neither grpc_health_probe nor grpcurl, and /readyz answers the same
# question: the server flips it to 503 at the same moment it sets
# grpc.health.v1 to NOT_SERVING (the start of a drain, src/server/mod.rs),
# and it is served only once the gRPC listener is bound. Why bash: its
# /dev/tcp needs nothing installed (the slim image has no curl or wget).
# deploy/tests/test_deploy.py runs this very script against a real server.
set -u
port=${1:-9464}
path=${2:-/readyz}
if ! { exec 3<>"/dev/tcp/127.0.0.1/${port}"; } 2>/dev/null; then
  echo "backstop-healthcheck: nothing listens on 127.0.0.1:${port}" >&2
  exit 1
fi
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
# A server that accepts but never answers fails here instead of hanging.
if ! IFS= read -r -t 2 status <&3; then
  echo "backstop-healthcheck: no answer from 127.0.0.1:${port}${path}" >&2
  exit 1
fi
status=${status%$'\r'}
case "$status" in
  "HTTP/1."?" 200 "*) exit 0 ;;
  *) echo "backstop-healthcheck: GET ${path}: ${status}" >&2; exit 1 ;;
esac
