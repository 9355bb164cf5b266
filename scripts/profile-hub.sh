#!/usr/bin/env bash
# Counts the hub's instructions per delivery with callgrind, which counts
# instructions rather than time: the figure repeats for the same binary and
# load whatever else the machine is doing, so it measures a change even on a
# busy machine.
#
#   scripts/profile-hub.sh [NODES] [RATE] [DURATION]    # default 16 50 10s
#   HUB_BIN=path/to/freshness-hub scripts/profile-hub.sh   # another hub binary
#   BATCH=100 scripts/profile-hub.sh 16 2000 10s           # events per publish
#   DURABLE=1 BATCH=100 scripts/profile-hub.sh 16 2000 10s # a durable hub (fsync = always)
#
# Builds nothing: run `cargo build --release -p freshness-hub -p
# freshness-bench` first. Prints the bench's summary, the hub's total
# instructions, instructions per delivery, and leaves the profile in
# target/profile/cg.<time>.out for `callgrind_annotate --inclusive=yes`.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-16}
rate=${2:-50}
duration=${3:-10s}
out=target/profile
mkdir -p "$out"
stamp=$(date +%Y%m%d-%H%M%S)
cg="$out/cg.$stamp.out"
port=$((47000 + RANDOM % 1000))
# Memory-only unless DURABLE is set: then a fresh log in a directory of its own.
data="$out/data.$stamp"
if [ -n "${DURABLE:-}" ]; then log=(--data-dir "$data"); else log=(--ephemeral); fi
FRESHNESS_LOG=error valgrind --tool=callgrind --callgrind-out-file="$cg" \
    "${HUB_BIN:-target/release/freshness-hub}" "${log[@]}" --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$((port + 1000))" 2>"$out/valgrind.$stamp.log" &
hub=$!
trap 'kill $hub 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
target/release/freshness-bench --workload b1 --nodes "$nodes" --rate "$rate" \
    --duration "$duration" --ack-interval "${ACK_INTERVAL:-2ms}" ${BATCH:+--batch "$BATCH"} \
    --hub "http://127.0.0.1:$port" --json >"$out/bench.$stamp.json"
kill -INT $hub
wait $hub || true
trap - EXIT
rm -rf "$data"
sum() { python3 -c "import json,sys; print(sum(json.loads(l)[sys.argv[2]] for l in open(sys.argv[1]) if l.strip()))" "$out/bench.$stamp.json" "$1"; }
delivered=$(sum delivered)
events=$(sum published)
total=$(sed -n 's/.*Collected : *//p' "$out/valgrind.$stamp.log")
echo "nodes=$nodes rate=$rate duration=$duration batch=${BATCH:-1} durable=${DURABLE:-no} delivered=$delivered events=$events"
echo "instructions=$total per_delivery=$((total / delivered)) per_event=$((total / events))"
echo "profile: $cg"
