#!/usr/bin/env bash
# Runs the benchmark suite behind BENCHMARKS.md: every workload against
# Backstop and the bare baseline in the same run (A B rounds), the Redis peer,
# resident memory for 1,000,000 targets, and the criterion micro-benchmarks.
# Results (JSON) go to bench-results/. Takes about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --bins
mkdir -p bench-results
B=./target/release/backstop-bench
R=${ROUNDS:-3}
D=${DURATION:-5s}
lscpu | grep -E "Model name|^CPU\(s\)" | tee bench-results/machine.txt
$B --workload can-proceed --targets 1 --in-flight 16,64 --rounds "$R" --duration "$D" --json bench-results/can-proceed-1.json
$B --workload can-proceed --targets 10000 --in-flight 16,64 --rounds "$R" --duration "$D" --peer redis-lua --json bench-results/can-proceed-10k.json
$B --workload record-outcome --targets 10000 --in-flight 16,64 --rounds "$R" --duration "$D" --json bench-results/record-outcome-10k.json
$B --workload route --targets 10000 --in-flight 16,64 --rounds "$R" --duration "$D" --json bench-results/route-10k.json
$B --workload agent-loop --targets 10000 --in-flight 16,64 --rounds "$R" --duration "$D" --json bench-results/agent-loop-10k.json
$B --workload batch --batch-size 100 --targets 1 --in-flight 8,16 --rounds "$R" --duration "$D" --json bench-results/batch-1.json
$B --workload batch --batch-size 100 --targets 10000 --in-flight 8,16 --rounds "$R" --duration "$D" --json bench-results/batch-10k.json
# Cluster mode: one replica on a Redis, next to embedded, with Redis commands per decision.
$B --workload can-proceed --targets 1 --in-flight 16,64 --rounds "$R" --duration "$D" --cluster 1 --json bench-results/cluster-can-proceed-1.json
$B --workload can-proceed --targets 10000 --in-flight 16,64 --rounds "$R" --duration "$D" --cluster 1 --json bench-results/cluster-can-proceed-10k.json
$B --workload agent-loop --targets 10000 --in-flight 64 --rounds "$R" --duration "$D" --cluster 1 --json bench-results/cluster-agent-loop-10k.json
$B --workload batch --batch-size 100 --targets 10000 --in-flight 16 --rounds "$R" --duration "$D" --cluster 1 --json bench-results/cluster-batch-10k.json
$B --fill 1000000 --json bench-results/fill-1m.json
cargo bench --bench decision 2>&1 | grep -E "^(domain|engine)/|time:" | tee bench-results/criterion.txt
