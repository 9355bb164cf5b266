#!/usr/bin/env bash
# Installs `promtool` (Debian package `prometheus`) when it is missing: the
# metrics test checks the hub's /metrics page with Prometheus' own parser.
# Needs root and apt-get; does nothing when promtool is already there.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Only the package's tools are wanted, not its server: a policy-rc.d that
# refuses every service start keeps the install from starting one.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
