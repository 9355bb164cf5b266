#!/usr/bin/env bash
# The whole benchmark: the hub side by side with NATS and Redis (B1, B2),
# then the hub-only workloads (B3-B7). Writes JSON lines, the machine
# description and a summary table under target/bench/<time>/ (and
# target/bench/latest).
#
# Placement: the server under test (a fresh freshness-hub process per run,
# nats-server, redis-server) is pinned to CPU $SERVER_CPU and the load
# generator to CPU $BENCH_CPU with taskset, so each gets one core.
#
# Priority: on a machine shared with compiles, a pinned process still shares
# its core with whatever else runs there, and CFS time slices turn into
# multi-millisecond latency tails. With PRIO=nice (the default) servers and
# generator run at nice -15: the kernel gives them about 28 times a
# compile's share of their core, and still time-slices between their own
# threads. PRIO=fifo runs them SCHED_FIFO (chrt -f 10), which shuts the
# compiles out entirely but also stops time slicing between one process's
# threads on a core: the generator's busy node worker holds off its
# publisher thread until it blocks, which inflates publish-call tails
# (BENCHMARKS.md, "SCHED_FIFO and the publish call"), and a server's
# threads wait for each other the same way; the kernel's RT throttling also
# caps each at 95 % of its core. PRIO=none: normal priority.
#
#   scripts/bench.sh                 # everything (10 to 20 minutes)
#   ONLY="b1 b2" scripts/bench.sh    # a subset
#   REPEAT=3 scripts/bench.sh        # more interleaved repetitions of B1
#   B5_PAIRS=5 scripts/bench.sh      # more B5 pairs (default 3; judged by their median)
#   B2_BATCH=100 scripts/bench.sh    # events per publish call in B2, every target alike (default 100)
#   B2_NODES=16,64,256 scripts/bench.sh  # B2's node counts (default: the workload's, 16,64,256)
#   HUB_ARGS=--ephemeral scripts/bench.sh # flags for every started hub (here: no durable log)
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
REPEAT=${REPEAT:-3}
ONLY=${ONLY:-"b1 b2 b3 b4 b5 b6 b7"}
export PRIO=${PRIO:-nice}

# 10,000 idle nodes (B7) hold 10,000 sockets in the generator and as many
# in the hub: raise the descriptor limit as far as the hard limit allows.
ulimit -n "$(ulimit -Hn)"

cargo build --release -p freshness-hub -p freshness-bench

OUT=target/bench/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ln -sfn "$(basename "$OUT")" target/bench/latest

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "revision: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- server src proto || echo ' (hub sources modified)')"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "fd limit: $(ulimit -n)"
    echo "priority: $PRIO"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

scripts/bench-peers.sh stop >/dev/null 2>&1 || true
scripts/bench-peers.sh start "$SERVER_CPU"
read -r NATS_PID REDIS_PID < <(scripts/bench-peers.sh pids)
trap 'scripts/bench-peers.sh stop' EXIT

PREFIX=()
case "$PRIO" in
    fifo) PREFIX=(chrt -f 10) ;;
    nice) PREFIX=(nice -n -15) ;;
esac
BENCH=("${PREFIX[@]}" taskset -c "$BENCH_CPU" target/release/freshness-bench --json
    --hub-cpus "$SERVER_CPU" --nats-pid "$NATS_PID" --redis-pid "$REDIS_PID"
    --placement "server pinned to cpu$SERVER_CPU, load generator to cpu$BENCH_CPU, priority $PRIO")

# Extra flags for every started hub, e.g. HUB_ARGS=--ephemeral (memory-only
# log, as the peers keep nothing).
for a in ${HUB_ARGS:-}; do BENCH+=("--hub-arg=$a"); done

run() { # name, then bench flags
    local name=$1
    shift
    echo "== $name: ${*}" >&2
    "${BENCH[@]}" "$@" | tee -a "$OUT/$name.jsonl"
}

want() { [[ " $ONLY " == *" $1 "* ]]; }

# Side by side, runs interleaved hub, nats, redis, hub, ...
want b1 && run b1 --workload b1 --target hub,nats,redis --repeat "$REPEAT" --duration 3s
# B2 publishes the same batches to every target: one Publish, one write of
# that many NATS PUBs, one pipeline of that many Redis PUBLISHes.
want b2 && run b2 --workload b2 --target hub,nats,redis --step 2s --batch "${B2_BATCH:-100}" \
    ${B2_NODES:+--nodes "$B2_NODES"}

# The sustainable hub rate at 16 nodes, from B2 when it ran.
RATE16=$(python3 - "$OUT/b2.jsonl" <<'EOF' 2>/dev/null || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(max(r["rate"] for r in rows if r["target"] == "hub" and r["nodes"] == 16))
EOF
)
RATE=()
[ -n "$RATE16" ] && RATE=(--rate "$RATE16")

want b3 && run b3 --workload b3 --nodes 16 "${RATE[@]}"
want b4 && run b4 --workload b4 --nodes 16 --rate 10000
# B5's p99 moves by more than the 10 % it judges from one run to the next:
# several pairs, in alternating order, judged by their median ratio.
want b5 && run b5 --workload b5 --nodes 16 "${RATE[@]}" --repeat "${B5_PAIRS:-3}"
want b6 && run b6 --workload b6 --nodes 1000 --rate 1000
want b7 && run b7 --workload b7 --nodes 10000

echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
cat "$OUT"/*.jsonl >"$OUT/all.jsonl"

# Summary: per configuration, the median over repetitions, and the hub's
# ratio against the best peer.
python3 - "$OUT/all.jsonl" >"$OUT/summary.md" <<'EOF'
import json, statistics, sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = defaultdict(list)
for r in rows:
    if r["workload"] in ("b1", "b2"):
        by[(r["workload"], r["nodes"], r["rate"] if r["workload"] == "b1" else 0, r["target"])].append(r)

def fmt(v, digits=0):
    return "" if v is None else f"{v:.{digits}f}"

def bound(r):
    # Older results carry only the generator's total.
    return r.get("generator_bound", (r.get("loadgen_cpu_cores") or 0) >= 0.9)

def med(rs, k):
    vals = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(vals) if vals else None

print("## B1: completion latency (median of runs), µs")
print()
print("| nodes | rate/s | target | p50 | p99 | p99.9 | ack p99 | publish call p50 | publish call p99 | lost | server CPU ns/delivery | gen_cpu | sub_cpu | pub_cpu | hub p99 / best peer p99 |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
confs = sorted({(n, rate) for (w, n, rate, t) in by if w == "b1"})
for n, rate in confs:
    peers = [med(by[("b1", n, rate, t)], "completion_p99_us") for t in ("nats", "redis") if by.get(("b1", n, rate, t))]
    best = min(peers) if peers else None
    for t in ("hub", "nats", "redis"):
        rs = by.get(("b1", n, rate, t))
        if not rs:
            continue
        p99 = med(rs, "completion_p99_us")
        ratio = f"{p99 / best:.2f}" if t == "hub" and best else ""
        cpu = med(rs, "hub_cpu_ns_per_delivery")
        ack = med(rs, "ack_p99_us")
        c50, c99 = med(rs, "publish_call_p50_us"), med(rs, "publish_call_p99_us")
        print(f"| {n} | {rate} | {t} | {med(rs, 'completion_p50_us'):.0f} | {p99:.0f} | {med(rs, 'completion_p999_us'):.0f} | "
              f"{'' if ack is None else f'{ack:.0f}'} | {fmt(c50)} | {fmt(c99)} | {sum(r['lost'] for r in rs)} | {fmt(cpu)} | "
              f"{med(rs, 'loadgen_cpu_cores') or 0:.2f}{' ‡' if any(bound(r) for r in rs) else ''} | "
              f"{fmt(med(rs, 'subscriber_cpu_cores'), 2)} | {fmt(med(rs, 'publisher_cpu_cores'), 2)} | {ratio} |")
print()
print("‡ the client used at least 90 % of its core in a run, as a whole, its subscribers or its publisher (`generator_bound`): the row measures it as much as the server.")
print("Publish call: Publish → its answer (hub, at the run's ack level); Redis: the call's last PUBLISH reply; NATS answers nothing: the write.")
print()
print("## B2: highest deliveries/s with zero loss and completion p99 within the objective")
print()
print("| nodes | objective µs | target | events/publish | events/s | deliveries/s | p99 µs | server CPU ns/delivery | server cores | gen_cpu | sub_cpu | pub_cpu | hub / best peer |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in sorted({n for (w, n, _, _) in by if w == "b2"}):
    peers = [by[("b2", n, 0, t)][0] for t in ("nats", "redis") if by.get(("b2", n, 0, t))]
    top = max(peers, key=lambda r: r["deliveries_per_s"]) if peers else None
    best = top["deliveries_per_s"] if top else None
    for t in ("hub", "nats", "redis"):
        rs = by.get(("b2", n, 0, t))
        if not rs:
            continue
        r = rs[0]
        ratio = ""
        if t == "hub" and best:
            # A client-bound row is a lower bound of its server: the hub's
            # ratio is then at least (hub bound) or at most (peer bound) this.
            hb, pb = bound(r), bound(top)
            ratio = ("≈ " if hb and pb else "≥ " if hb else "≤ " if pb else "") + f"{r['deliveries_per_s'] / best:.2f}"
        cpu = r.get("hub_cpu_ns_per_delivery")
        print(f"| {n} | {r.get('objective_us')} | {t} | {r.get('events_per_publish') or 'per tick'} | {r['rate']} | "
              f"{r['deliveries_per_s']:.0f} | {r['completion_p99_us']}{' ‡' if bound(r) else ''} | {fmt(cpu)} | "
              f"{fmt(r.get('server_cpu_cores'), 2)} | {fmt(r.get('loadgen_cpu_cores'), 2)} | "
              f"{fmt(r.get('subscriber_cpu_cores'), 2)} | {fmt(r.get('publisher_cpu_cores'), 2)} | {ratio} |")
print()
print("‡ client-bound (see B1): the row's rate is a lower bound of what its server holds.")
print()
print("## B3-B7 (hub)")
print()
for r in rows:
    if r["workload"] in ("b3", "b4", "b5", "b6", "b7"):
        keys = ["workload", "nodes", "stalled_nodes", "rate", "published", "delivered", "lost", "duplicates",
                "order_violations", "resets", "completion_p99_us", "hub_cpu_ns_per_delivery", "hub_peak_rss_bytes"]
        extra = {k: v for k, v in r.items() if k not in keys and k in (
            "convergence_after_end_ms", "entities_not_converged", "publish_retries", "baseline_completion_p99_us",
            "pair", "p99_ratio", "isolation_met", "p99_ratios", "median_p99_ratio", "median_isolation_met", "stalled_status", "storm_live_ms", "storm_caught_up_ms",
            "storm_not_resumed", "hub_bytes_per_idle_node", "server_cpu_cores", "idle_server_cpu_cores",
            "loadgen_cpu_cores", "generator_bound", "publish_retries", "not_applied")}
        print("- " + ", ".join(f"{k}={r.get(k)}" for k in keys) + (", " + json.dumps(extra) if extra else ""))
EOF
cat "$OUT/summary.md"
echo "results in $OUT"
