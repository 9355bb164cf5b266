#!/usr/bin/env bash
# Checks the Helm chart helm/freshness-hub without a helm binary or a cluster:
# Helm's own linter and template engine (the helm-python-sdk package embeds
# Helm's Go SDK) and the Kubernetes OpenAPI schemas (kubernetes-validate).
# Needs python3 and, on the first run only, PyPI; the virtualenv is kept in
# .venv-chart/ and reused while the pinned requirements do not change.
#
#   scripts/check-chart.sh [--kube-version 1.31.0 ...]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHECK_CHART_VENV:-$root/.venv-chart}"
requirements=(
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "PyYAML>=6"
  "tomli>=2; python_version < '3.11'"
)
stamp="$venv/.requirements"

if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$(printf '%s\n' "${requirements[@]}")" ]]; then
  echo "check-chart: preparing $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
  printf '%s\n' "${requirements[@]}" >"$stamp"
fi

exec "$venv/bin/python" "$root/scripts/check_chart.py" "$root/helm/freshness-hub" "$@"
