#!/usr/bin/env bash
# Three regions on one machine: hubs eu, us and ap in full mesh on loopback,
# a watching node in each, writers in each region, and the proof that every
# node converges on the newest version. Stops everything when done (or on
# Ctrl-C). Run from the repository root: scripts/three-regions.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p freshness-hub -p freshness-client
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

declare -A port=([eu]=50151 [us]=50152 [ap]=50153)
declare -A metrics=([eu]=9564 [us]=9565 [ap]=9566)

for r in eu us ap; do
  peers=()
  for p in eu us ap; do
    [ "$p" = "$r" ] || peers+=(--peer "$p=http://127.0.0.1:${port[$p]}")
  done
  "$bin/freshness-hub" --region "$r" --hub-id "hub-$r" --data-dir "$work/data-$r" \
    --listen "127.0.0.1:${port[$r]}" --metrics-listen "127.0.0.1:${metrics[$r]}" \
    "${peers[@]}" 2>"$work/hub-$r.log" &
  pids+=($!)
done

hub() { echo "http://127.0.0.1:${port[$1]}"; }

# Wait until every hub's links to its two peers are up.
for r in eu us ap; do
  for _ in $(seq 100); do
    if "$bin/freshctl" --hub "$(hub "$r")" status --json 2>/dev/null \
      | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["peers"])==2 and all(p["connected"] for p in s["peers"]) else 1)'; then
      break
    fi
    sleep 0.1
  done
done
echo "three hubs up, in full mesh"

for r in eu us ap; do
  "$bin/freshctl" --hub "$(hub "$r")" watch --namespace user --node-id "node-$r" --json >"$work/node-$r.jsonl" 2>/dev/null &
  pids+=($!)
done
sleep 0.5

echo "writers: user:1 v1 in eu, v3 in ap, v2 in us (too late: superseded everywhere)"
"$bin/freshctl" --hub "$(hub eu)" publish user:1 1
"$bin/freshctl" --hub "$(hub ap)" publish user:1 3 --ack global
"$bin/freshctl" --hub "$(hub us)" publish user:1 2

for r in eu us ap; do
  for _ in $(seq 100); do
    last=$(grep '"user:1"' "$work/node-$r.jsonl" | tail -n 1 || true)
    case "$last" in *'"version":3'*) break ;; esac
    sleep 0.05
  done
  echo "node-$r saw: $(grep '"user:1"' "$work/node-$r.jsonl" | python3 -c 'import json,sys; print(", ".join("v%d from %s" % (e["version"], e["origin"]) for e in map(json.loads, sys.stdin)))')"
done
echo
"$bin/freshctl" --hub "$(hub eu)" status
