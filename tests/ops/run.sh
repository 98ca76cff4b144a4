#!/usr/bin/env bash
# Entry point of Tally's ops checks (alerts, dashboards, deploy/, live proof
# against a real Prometheus + Alertmanager). Installs what it needs:
#   - Debian's prometheus and prometheus-alertmanager (when root and missing),
#   - the pinned Python packages into target/ops/venv,
# then runs tests/ops/check.py. Exit code non-zero on any failure; the last
# line is "N passed, N failed, N skipped". Arguments go to check.py
# (--static-only, --no-build).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
   || ! command -v prometheus-alertmanager >/dev/null || ! command -v amtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "ops: installing prometheus and prometheus-alertmanager (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
  else
    echo "ops: prometheus/alertmanager missing and not root: the checks that need them will say SKIPPED"
  fi
fi

venv=target/ops/venv
mkdir -p target/ops
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/ops/requirements.txt "$venv/.requirements"; then
  echo "ops: creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/ops/requirements.txt
  cp tests/ops/requirements.txt "$venv/.requirements"
fi

exec "$venv/bin/python" tests/ops/check.py "$@"
