#!/usr/bin/env bash
# The README's walk-through of the offline tools, on sparse files in
# ./cowsnap-demo: a COW store created, an origin write copied on write, the
# snapshot read back unchanged, status/check/delta/export, and a merge that
# rolls the origin back.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
C=${COWSNAP:-$ROOT/target/release/cowsnap}
D=${1:-./cowsnap-demo}
mkdir -p "$D" && cd "$D"
rm -f origin.img cow.img snap.raw
run() { echo "+ cowsnap $*"; "$C" "$@"; }
truncate -s 64M origin.img
truncate -s 16M cow.img
run cow create --chunk-sectors 8 cow.img
run io --origin origin.img --cow cow.img -c 'write -P 0xab 0 1m'
run io --origin origin.img --cow cow.img --snapshot 1 -c 'read -P 0 0 1m'
run io --origin origin.img --cow cow.img -c 'read -P 0xab 0 1m'
run cow status --origin origin.img cow.img
run cow check --origin origin.img cow.img
run cow delta --origin origin.img cow.img
run cow export --origin origin.img cow.img -o snap.raw
run cow merge --origin origin.img cow.img
run io --origin origin.img -c 'read -P 0 0 1m'
echo "demo done: the origin is back to the snapshot's content (files in $PWD)"
