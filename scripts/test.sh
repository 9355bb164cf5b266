#!/usr/bin/env bash
# The whole test suite, on a fresh machine too (README's second command;
# .ci/run calls it): starts what the tests talk to when it is not running,
# installs the tools they drive when they are missing, then runs
# `cargo test --workspace` with any arguments given.
#
#   Redis        127.0.0.1:6379 (the agent's tests)
#   PostgreSQL   127.0.0.1:5432, database `test` (the outbox relay's tests)
#   nats-server  127.0.0.1:4222 with JetStream (tests that kill NATS start
#                their own on free ports)
#   promtool, Chromium and chromedriver (the metrics page, the chart's
#   rules, the status page's browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "redis (the agent's tests use 127.0.0.1:6379)"
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
step "postgresql"
# The outbox relay's tests use the machine's PostgreSQL (127.0.0.1:5432,
# database `test`); start it if it is not running.
if ! pg_isready -h 127.0.0.1 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for _ in $(seq 50); do pg_isready -h 127.0.0.1 -q && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1

step "nats-server with JetStream (127.0.0.1:4222)"
# The JetStream log's tests start nats-server processes of their own on free
# ports (they kill them); the machine's shared one on 4222 serves the rest.
# Installed and started only when missing.
if ! command -v nats-server >/dev/null 2>&1; then
    apt-get install -y nats-server >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y nats-server >/dev/null; }
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    nats_dir=$(mktemp -d)
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$nats_dir" >"$nats_dir/nats.log" 2>&1 &
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
fi
(exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null

step "test tools"
# promtool checks the hub's /metrics page (tests/tests/metrics_endpoint.rs)
# and the chart's alert rules; Chromium and chromedriver run the status
# page's browser test. Each is installed only when missing.
bash scripts/install-chromium.sh
bash scripts/install-promtool.sh

step "cargo test --workspace"
exec cargo test --workspace "$@"
