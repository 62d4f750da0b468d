#!/usr/bin/env bash
# The CSI community's conformance suite (csi-sanity) against
# `cowsnap up --csi-endpoint`, twice: volumes of mount access type, then of
# block access type, each run on a fresh data dir with real staging and
# target directories. Fails on any failed spec; prints the summary line of
# each run and every spec skipped at run time with the reason csi-sanity
# gave.
#
# Usage: .ci/csi-sanity.sh [WORKDIR]
# Env: CSI_SANITY (default ../shared/tools/csi-sanity/csi-sanity next to the
#      repo), COWSNAP (default target/debug/cowsnap),
#      CSI_SANITY_VOLUME_SIZE (bytes, default 64 MiB; expansion specs grow
#      volumes to twice that).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SANITY=${CSI_SANITY:-$ROOT/../shared/tools/csi-sanity/csi-sanity}
COWSNAP=${COWSNAP:-$ROOT/target/debug/cowsnap}
SIZE=${CSI_SANITY_VOLUME_SIZE:-$((64 << 20))}
# Not on tmpfs: the engine uses O_DIRECT.
mkdir -p "$ROOT/target"
W=${1:-$(mktemp -d "$ROOT/target/csi-sanity.XXXXXX")}
mkdir -p "$W"
[[ -x $SANITY ]] || { echo "csi-sanity: not found at $SANITY (set CSI_SANITY)" >&2; exit 1; }
[[ -x $COWSNAP ]] || { echo "csi-sanity: no cowsnap at $COWSNAP (set COWSNAP)" >&2; exit 1; }

# Skipped on purpose, with the reason (passed to --ginkgo.skip): none.
SKIPS=()

UP_PID=""
stop_up() {
  if [[ -n $UP_PID ]]; then
    kill -TERM "$UP_PID" 2> /dev/null || true
    wait "$UP_PID" 2> /dev/null || true
    UP_PID=""
  fi
}
trap stop_up EXIT

failed=0
for type in mount block; do
  d=$W/$type
  mkdir -p "$d"
  sock=$d/csi.sock
  "$COWSNAP" up --data-dir "$d/data" --listen "unix:$d/api.sock" \
    --nbd-listen "unix:$d/nbd.sock" --csi-endpoint "unix://$sock" \
    --kubelet-dir "$d" > "$d/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 1 600); do
    [[ -S $sock ]] && break
    kill -0 "$UP_PID" 2> /dev/null || { cat "$d/up.log" >&2; echo "cowsnap up died" >&2; exit 1; }
    sleep 0.1
  done
  [[ -S $sock ]] || { cat "$d/up.log" >&2; echo "no CSI socket at $sock" >&2; exit 1; }
  args=()
  for s in ${SKIPS[@]+"${SKIPS[@]}"}; do args+=("--ginkgo.skip=$s"); done
  rc=0
  "$SANITY" --csi.endpoint="unix://$sock" \
    --csi.testvolumesize="$SIZE" --csi.testvolumeexpandsize="$((SIZE * 2))" \
    --csi.testvolumeaccesstype="$type" \
    --csi.mountdir="$d/mount" --csi.stagingdir="$d/staging" \
    "${args[@]}" --ginkgo.v --ginkgo.no-color > "$d/sanity.log" 2>&1 || rc=$?
  stop_up
  echo "--- csi-sanity, $type access type:"
  grep -E '^Ran [0-9]+ of [0-9]+ Specs' "$d/sanity.log" || true
  grep -E '^(SUCCESS|FAIL)!' "$d/sanity.log" || true
  if ((${#SKIPS[@]})); then printf 'skipped on purpose: %s\n' "${SKIPS[@]}"; fi
  # Specs csi-sanity itself skipped at run time, with its reason.
  python3 - "$d/sanity.log" <<'PY'
import re, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
for i, l in enumerate(lines):
    if l.startswith("S [SKIPPED]") and i + 1 < len(lines):
        reason = next((m.group(1) for x in lines[i + 2:i + 12]
                       if (m := re.match(r"\s+\[SKIPPED\] (.*)", x))), "(no reason given)")
        print(f"skipped at run time: {lines[i + 1].strip()} -- {reason}")
PY
  if [[ $rc != 0 ]]; then
    echo "csi-sanity failed with the $type access type (exit $rc); its log follows" >&2
    cat "$d/sanity.log" >&2
    failed=1
  fi
done
exit $failed
