#!/usr/bin/env bash
# Starts what the tests talk to when it is not running: redis-server
# (127.0.0.1:6379), PostgreSQL (127.0.0.1:5432, database `test`) and
# nats-server with JetStream (127.0.0.1:4222). Called by .ci/run and by
# scripts/test.sh.
set -euo pipefail
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

