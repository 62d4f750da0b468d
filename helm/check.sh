#!/usr/bin/env bash
# The chart's checks, offline (run by .ci/run after the build):
#   1. helm/tools/check.py: helm lint --strict and helm template with the
#      default values and each set in helm/values/, every object validated
#      (kubernetes-validate for Kubernetes 1.37.0; the snapshot custom
#      resources against helm/schemas/; ServiceMonitor with npm's
#      @kubernetes-models/prometheus-operator), the bad values in
#      helm/values/bad/ refused by values.schema.json, deploy/manifests/
#      equal to the default render;
#   2. helm/tools/drift.py: the rendered cowsnap containers run with their
#      rendered command, args and environment against target/debug/cowsnap.
# helm/tools/helm.py uses a helm binary from PATH, else helm-python-sdk.
#
# Usage: helm/check.sh [WORKDIR]
# Env: COWSNAP (default target/debug/cowsnap), NODE_MODULES_DIR (where
#      @kubernetes-models/prometheus-operator is installed; default: installed
#      into WORKDIR/npm by this script with npm).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${1:-$(mktemp -d /tmp/cowsnap-helm.XXXXXX)}
mkdir -p "$W"
export COWSNAP=${COWSNAP:-$ROOT/target/debug/cowsnap}
if [[ -z ${NODE_MODULES_DIR:-} ]]; then
  mkdir -p "$W/npm"
  echo '{"private": true, "type": "module"}' > "$W/npm/package.json"
  (cd "$W/npm" && npm install --no-audit --no-fund --silent @kubernetes-models/prometheus-operator@6.0.0) \
    > "$W/npm.log" 2>&1 || { cat "$W/npm.log"; exit 1; }
  export NODE_MODULES_DIR=$W/npm/node_modules
fi
python3 "$ROOT/helm/tools/check.py" "$W/rendered"
python3 "$ROOT/helm/tools/drift.py" "$W/rendered"
