#!/usr/bin/env bash
# regenerate.sh [--only NAME,...] [--work DIR]
#
# Recreates the kernel-written golden COW images (NAME.cow.gz) and manifest.json with the
# kernel oracle: a real Debian kernel under qemu (TCG) runs dm-snapshot on the images.
# Not run in CI. About 15-45 s per kernel run, 15 runs. See README.md.
#
# Env: KC_ORACLE  the kernel-oracle directory (default: ../../../../shared/tools/kernel-oracle
#                 from the repository, i.e. shared/ beside the work tree, else
#                 /work/shared/tools/kernel-oracle)
#      KC_CACHE   its kernel/initramfs cache (default /tmp/kc/cache; the tool's own .cache
#                 is used when the oracle directory is writable and KC_CACHE is set empty)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${KC_ORACLE:-} ]]; then
  for d in "$HERE/../../../../shared/tools/kernel-oracle" /work/shared/tools/kernel-oracle; do
    [[ -x $d/kernel-writes.sh ]] && { KC_ORACLE=$(cd "$d" && pwd); break; }
  done
fi
[[ -n ${KC_ORACLE:-} && -x $KC_ORACLE/kernel-writes.sh ]] ||
  { echo "regenerate.sh: set KC_ORACLE to the kernel-oracle directory" >&2; exit 2; }
export KC_ORACLE
export KC_CACHE=${KC_CACHE-/tmp/kc/cache}
[[ -n $KC_CACHE ]] || export KC_CACHE=$KC_ORACLE/.cache
mkdir -p "$KC_CACHE"
# Builds the kernel/initramfs cache on first use (downloads the Debian kernel package).
"$KC_ORACLE/make-initramfs.sh" >&2
export KC_QUIET=${KC_QUIET:-0}
exec python3 "$HERE/golden.py" regenerate "$@"
