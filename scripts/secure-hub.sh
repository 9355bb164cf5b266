#!/usr/bin/env bash
# The README's "Securing a hub" on one machine: a CA and certificates made
# with openssl, a token file, a policy; hubs eu and us over mTLS (us
# replicates from eu), hub ap whose certificate is not granted `replicate`;
# then every call the deployment must serve and every call it must refuse,
# each printed with its answer. Stops everything when done.
# Run from the repository root: scripts/secure-hub.sh
# (FRESHNESS_BIN=target/debug uses existing debug binaries, no build).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FRESHNESS_BIN:-}" ]; then
  cargo build --release -q -p freshness-hub -p freshness-client
fi
# Absolute, so that it holds after the cd into the work directory.
bin=$(cd "${FRESHNESS_BIN:-target/release}" && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# --- Certificates: one CA; each hub's names its host and its region (its
# identity when it replicates); a node's names the node.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -keyout ca.key -out ca.pem -subj /CN=freshness-ca 2>/dev/null
cert() { # name, subjectAltName
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf 'subjectAltName=%s\n' "$2" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days 90 -out "$1.pem" -extfile "$1.ext" 2>/dev/null
}
for r in eu us ap; do
  cert "hub-$r" "DNS:localhost,IP:127.0.0.1,URI:spiffe://example.org/hub/$r"
done
cert node-1 "URI:spiffe://example.org/node/1"
cert ops "URI:spiffe://example.org/ops"

# --- Tokens: the file holds only their SHA-256.
WRITER_TOKEN=$(openssl rand -hex 24)
OPS_TOKEN=$(openssl rand -hex 24)
hash() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
{
  echo "writer $(hash "$WRITER_TOKEN")"
  echo "ops $(hash "$OPS_TOKEN")"
} >tokens

# --- The policy: a writer, a node, a peer, an operator.
cat >policy.toml <<'EOF'
[principals]
writer = ["publish:user"]
"spiffe://example.org/node/1" = ["subscribe:user"]
"spiffe://example.org/hub/us" = ["replicate"]
ops = ["status", "subscribe:*"]
EOF

declare -A port=([eu]=50251 [us]=50252 [ap]=50253)
declare -A metrics=([eu]=9664 [us]=9665 [ap]=9666)
for r in eu us ap; do
  peers=()
  [ "$r" = eu ] || peers=(--peer "eu=https://127.0.0.1:${port[eu]}" --peer-ca ca.pem)
  "$bin/freshness-hub" --region "$r" --ephemeral \
    --listen "127.0.0.1:${port[$r]}" --metrics-listen "127.0.0.1:${metrics[$r]}" \
    --tls-cert "hub-$r.pem" --tls-key "hub-$r.key" --tls-client-ca ca.pem \
    --auth-tokens tokens --auth-policy policy.toml "${peers[@]}" 2>"hub-$r.log" &
  pids+=($!)
done

freshctl() { "$bin/freshctl" "$@"; }
hub() { echo "https://127.0.0.1:${port[$1]}"; }
# Every client of an mTLS hub has a certificate; the token, when sent,
# names the principal.
as_ops=(--ca ca.pem --cert ops.pem --key ops.key --token "$OPS_TOKEN")
as_writer=(--ca ca.pem --cert ops.pem --key ops.key --token "$WRITER_TOKEN")
as_node=(--ca ca.pem --cert node-1.pem --key node-1.key)

for r in eu us ap; do
  for _ in $(seq 100); do
    freshctl --hub "$(hub "$r")" "${as_ops[@]}" status --json >/dev/null 2>&1 && break
    sleep 0.1
  done
done
for _ in $(seq 100); do
  freshctl --hub "$(hub us)" "${as_ops[@]}" status --json 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if all(p["connected"] for p in s["peers"]) else 1)' && break
  sleep 0.1
done
echo "hubs eu, us, ap up over mTLS; us replicates from eu"

# A node in us, by its certificate, for namespace user.
freshctl --hub "$(hub us)" "${as_node[@]}" watch --namespace user --node-id node-1 --json >node-us.jsonl 2>node-us.err &
pids+=($!)
sleep 0.5

try() { # what, command...
  local what=$1
  shift
  if out=$("$@" 2>&1); then
    printf '  served:  %-52s %s\n' "$what" "$(echo "$out" | head -1)"
  else
    printf '  refused: %-52s %s\n' "$what" "$(echo "$out" | head -1)"
  fi
}
echo "calls:"
try "writer publishes user:1 in eu" freshctl --hub "$(hub eu)" "${as_writer[@]}" publish user:1 1
try "writer publishes price:1 in eu" freshctl --hub "$(hub eu)" "${as_writer[@]}" publish price:1 1
try "node publishes user:2 (certificate only)" freshctl --hub "$(hub eu)" "${as_node[@]}" publish user:2 1
try "node reads status" freshctl --hub "$(hub eu)" "${as_node[@]}" status --json
try "ops reads status" freshctl --hub "$(hub eu)" "${as_ops[@]}" status --json
try "node watches price" timeout 3 "$bin/freshctl" --hub "$(hub eu)" "${as_node[@]}" watch --namespace price --node-id node-1b
try "a client without a certificate" freshctl --hub "$(hub eu)" --ca ca.pem --token "$OPS_TOKEN" status
try "a plain-text client" freshctl --hub "http://127.0.0.1:${port[eu]}" --token "$OPS_TOKEN" status
try "a client that does not trust the hub's CA" freshctl --hub "$(hub eu)" --ca ops.pem --cert ops.pem --key ops.key --token "$OPS_TOKEN" status

for _ in $(seq 100); do
  grep -q '"user:1"' node-us.jsonl 2>/dev/null && break
  sleep 0.1
done
echo "the node in us (by certificate, user only) saw:"
sed 's/^/  /' node-us.jsonl | grep user || echo "  nothing"
echo "ap's link to eu (its certificate lacks replicate):"
freshctl --hub "$(hub ap)" "${as_ops[@]}" status --json \
  | python3 -c 'import json,sys; [print("  ", p["region"], "connected" if p["connected"] else "down:", p["last_error"]) for p in json.load(sys.stdin)["peers"]]'
echo "denials counted by eu (freshness_auth_denied_total):"
curl -s "http://127.0.0.1:${metrics[eu]}/metrics" | grep '^freshness_auth_denied_total' | grep -v ' 0$' | sed 's/^/  /'
