#!/usr/bin/env bash
# Installs promtool (Debian's `prometheus` package), which the chart check
# uses to check the alert rules, unless it is already there.
set -euo pipefail
if command -v promtool >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
