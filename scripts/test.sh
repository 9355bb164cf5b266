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

bash "$(dirname "$0")/services.sh"

step "test tools"
# promtool checks the hub's /metrics page (tests/tests/metrics_endpoint.rs)
# and the chart's alert rules; Chromium and chromedriver run the status
# page's browser test. Each is installed only when missing.
bash scripts/install-chromium.sh
bash scripts/install-promtool.sh

step "cargo test --workspace"
exec cargo test --workspace "$@"
