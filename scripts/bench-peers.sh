#!/usr/bin/env bash
# Installs and starts the peers the benchmark compares the hub with: NATS
# (core pub/sub) and Redis (pub/sub), on loopback, on non-default ports,
# without persistence. Idempotent: a peer already answering is left alone.
#
#   scripts/bench-peers.sh start [CPU]   # optionally pinned with taskset -c CPU
#                                        # (at nice -15 with PRIO=nice, SCHED_FIFO with PRIO=fifo)
#   scripts/bench-peers.sh stop
#   scripts/bench-peers.sh pids          # "NATS_PID REDIS_PID"
#
# Ports: NATS 14222, Redis 16379 (the bench's defaults). Runtime files live
# under target/bench/peers/.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_PORT=${NATS_PORT:-14222}
REDIS_PORT=${REDIS_PORT:-16379}
DIR=target/bench/peers
mkdir -p "$DIR"

install() {
    local missing=()
    command -v nats-server >/dev/null || missing+=(nats-server)
    command -v redis-server >/dev/null || missing+=(redis-server)
    [ ${#missing[@]} -eq 0 ] && return
    apt-get update -qq
    # The policy is read whole before it is searched: `apt-cache ... | grep
    # -q` under pipefail fails when grep stops reading early.
    local p policy
    for p in "${missing[@]}"; do
        policy=$(apt-cache policy "$p")
        if ! grep -q 'Candidate: [^(]' <<<"$policy"; then
            echo "bench-peers: Debian has no installable package $p" >&2
            exit 1
        fi
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() {
    local pin=()
    case "${PRIO:-none}" in
        fifo) pin=(chrt -f 10) ;;
        nice) pin=(nice -n -15) ;;
    esac
    [ -n "${1:-}" ] && pin+=(taskset -c "$1")
    install
    if ! alive nats; then
        # -a: loopback only; no JetStream, so nothing is persisted.
        "${pin[@]}" nats-server -a 127.0.0.1 -p "$NATS_PORT" \
            >"$DIR/nats.log" 2>&1 &
        echo $! >"$DIR/nats.pid"
    fi
    if ! alive redis; then
        # No RDB snapshots, no AOF; the pub/sub output buffer of a node is
        # left at Redis' default (32 MB hard, 8 MB for 60 s soft).
        "${pin[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
            --appendonly no --daemonize no --protected-mode yes \
            >"$DIR/redis.log" 2>&1 &
        echo $! >"$DIR/redis.pid"
    fi
    for _ in $(seq 50); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$NATS_PORT") 2>/dev/null \
            && (exec 3<>/dev/tcp/127.0.0.1/"$REDIS_PORT") 2>/dev/null; then
            echo "nats-server $(nats-server --version 2>&1 | head -1) pid $(cat "$DIR/nats.pid") on $NATS_PORT"
            echo "redis-server $(redis-server --version | awk '{print $3}') pid $(cat "$DIR/redis.pid") on $REDIS_PORT"
            return
        fi
        sleep 0.1
    done
    echo "peers did not come up; see $DIR/*.log" >&2
    exit 1
}

stop() {
    for p in nats redis; do
        if alive "$p"; then
            local pid
            pid=$(cat "$DIR/$p.pid")
            kill "$pid"
            # Wait for the port to be free before anyone starts a new one.
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$DIR/$p.pid"
    done
}

case "${1:-start}" in
start) start "${2:-}" ;;
stop) stop ;;
pids) echo "$(cat "$DIR/nats.pid") $(cat "$DIR/redis.pid")" ;;
*) echo "usage: $0 start [CPU] | stop | pids" >&2; exit 64 ;;
esac
