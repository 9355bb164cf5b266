#!/usr/bin/env bash
# Hub replicas on JetStream at scale: REPLICAS hub replicas of one region
# on one nats-server (JetStream, R=1, a store directory of its own), with
# NODES_PER_REPLICA nodes on each, against one hub on the same JetStream
# with NODES_PER_REPLICA nodes; B1 at RATE events/s, alternating, ROUNDS
# times. Hubs and nats-server share cpu $SERVER_CPU, the generator has cpu
# $BENCH_CPU, both at nice -15; nats-server's CPU is printed per run.
#
#   scripts/bench-replicas.sh                       # 3 x 1,000 nodes against 1 x 1,000
#   REPLICAS=3 NODES_PER_REPLICA=1000 RATE=100 ROUNDS=2 scripts/bench-replicas.sh
#
# Builds the release hub and bench first (FRESHNESS_BIN=dir uses binaries
# from there, no build). Stops everything it started when done.
set -euo pipefail
cd "$(dirname "$0")/.."

REPLICAS=${REPLICAS:-3}
NODES_PER_REPLICA=${NODES_PER_REPLICA:-1000}
RATE=${RATE:-100}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-4s}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}

if [ -z "${FRESHNESS_BIN:-}" ]; then
    cargo build --release -q -p freshness-hub -p freshness-bench
fi
bin=$(cd "${FRESHNESS_BIN:-target/release}" && pwd)
work=$(mktemp -d)
# Every process started, also from subshells, so that none outlives the script.
cleanup() {
    [ -f "$work/pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

nats_port=$(free_port)
nice -n -15 taskset -c "$SERVER_CPU" nats-server -a 127.0.0.1 -p "$nats_port" -js \
    -sd "$work/nats" >"$work/nats.log" 2>&1 &
nats_pid=$!
echo "$nats_pid" >>"$work/pids"
for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
    sleep 0.1
done

# Starts COUNT replicas of region REGION; prints "URLS PIDS" (comma lists).
start_region() {
    local region=$1 count=$2 urls=() rpids=() i port
    for i in $(seq "$count"); do
        port=$(free_port)
        FRESHNESS_LOG=error nice -n -15 taskset -c "$SERVER_CPU" "$bin/freshness-hub" \
            --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 \
            --region "$region" --hub-id "$region-$i" \
            --log jetstream --nats-url "nats://127.0.0.1:$nats_port" \
            >"$work/$region-$i.log" 2>&1 &
        echo "$!" >>"$work/pids"
        rpids+=("$!")
        urls+=("http://127.0.0.1:$port")
        for _ in $(seq 150); do
            (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {
            echo "replica $region-$i did not start:" >&2
            cat "$work/$region-$i.log" >&2
            exit 1
        }
    done
    (IFS=,; echo "${urls[*]} ${rpids[*]}")
}

run() { # label, urls, pids, nodes
    local before after
    before=$(cpu_ticks "$nats_pid")
    echo "== $1: $4 nodes, $RATE events/s"
    nice -n -15 taskset -c "$BENCH_CPU" "$bin/freshness-bench" --workload b1 \
        --nodes "$4" --rate "$RATE" --duration "$DURATION" --hub "$2" --hub-pid "$3" \
        --placement "hubs and nats-server on cpu$SERVER_CPU, generator on cpu$BENCH_CPU" |
        grep -v '^wl'
    after=$(cpu_ticks "$nats_pid")
    echo "   nats-server CPU during the run: $(( (after - before) * 10 )) ms"
}

for r in $(seq "$ROUNDS"); do
    read -r urls rp < <(start_region "many$r" "$REPLICAS")
    run "$REPLICAS replicas (round $r)" "$urls" "$rp" $((REPLICAS * NODES_PER_REPLICA))
    for p in ${rp//,/ }; do kill "$p"; done
    read -r urls rp < <(start_region "one$r" 1)
    run "1 hub (round $r)" "$urls" "$rp" "$NODES_PER_REPLICA"
    for p in ${rp//,/ }; do kill "$p"; done
done
