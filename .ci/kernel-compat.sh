#!/usr/bin/env bash
# COW devices written by cowsnap's engine, judged by the real kernel: each case
# writes through `cowsnap io` (origin writes that copy-on-write, snapshot
# writes, overflow, merge), then the kernel oracle boots Linux under QEMU and
# activates dm-snapshot on the result. The kernel must read exactly the
# expected snapshot content (computed independently here from the writes), and
# print the same `dmsetup status` as `cowsnap cow status`.
#
# Usage: .ci/kernel-compat.sh [WORKDIR]
# Env: KC_ORACLE (default ../shared/tools/kernel-oracle next to the repo),
#      KC_CACHE (default target/kc-cache), COWSNAP (default target/release/cowsnap).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORACLE=${KC_ORACLE:-$ROOT/../shared/tools/kernel-oracle}
export KC_CACHE=${KC_CACHE:-$ROOT/target/kc-cache}
COWSNAP=${COWSNAP:-$ROOT/target/release/cowsnap}
W=${1:-$(mktemp -d "$ROOT/target/kc-compat.XXXXXX")}
mkdir -p "$W" "$KC_CACHE"
if [[ ! -x $ORACLE/check-cow.sh ]]; then
  echo "kernel-compat: the kernel oracle is not at $ORACLE (set KC_ORACLE)" >&2
  exit 1
fi
pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# apply FILE OFFSET LENGTH BYTE: what a write of BYTE over [OFFSET, OFFSET+LENGTH) leaves.
apply() {
  python3 - "$@" <<'PY'
import sys
path, off, n, b = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0), int(sys.argv[4], 0)
with open(path, 'r+b') as f:
    f.seek(off); f.write(bytes([b]) * n)
PY
}

# case NAME CHUNK ORIGIN_SIZE COW_SIZE EXPECT(match|invalid) -- then lines "origin|snap OFF LEN BYTE" on stdin
case_run() {
  local name=$1 chunk=$2 osize=$3 csize=$4 expect=$5 d=$W/$1
  mkdir -p "$d"
  head -c "$osize" /dev/urandom > "$d/origin.img"
  cp "$d/origin.img" "$d/expected.img"
  truncate -s "$csize" "$d/cow.img"
  "$COWSNAP" cow create --chunk-sectors "$chunk" "$d/cow.img" > /dev/null
  local tgt off len byte
  while read -r tgt off len byte; do
    [[ -z $tgt || $tgt == \#* ]] && continue
    if [[ $tgt == origin ]]; then
      "$COWSNAP" io --origin "$d/origin.img" --cow "$d/cow.img" -c "write -P $byte $off $len" > /dev/null || true
    else
      "$COWSNAP" io --origin "$d/origin.img" --cow "$d/cow.img" --snapshot 1 -c "write -P $byte $off $len" > /dev/null || true
      apply "$d/expected.img" "$off" "$len" "$byte"
    fi
  done
  run_kernel "$name" "$d" "$chunk" "$expect"
}

run_kernel() {
  local name=$1 d=$2 chunk=$3 expect=$4 rc=0
  KC_QUIET=1 "$ORACLE/check-cow.sh" "$d/origin.img" "$d/cow.img" "$(sha "$d/expected.img")" "$chunk" \
    > "$d/kernel.txt" 2> "$d/kernel.err" || rc=$?
  local kstatus ours
  kstatus=$(sed -n 's/^STATUS=//p' "$d/kernel.txt")
  ours=$("$COWSNAP" cow status --origin "$d/origin.img" "$d/cow.img" 2>/dev/null || true)
  case $expect in
    match)
      [[ $rc == 0 ]] && ok "$name: the kernel reads the expected snapshot" \
        || bad "$name: check-cow exit $rc: $(tr '\n' ' ' < "$d/kernel.txt")"
      [[ $kstatus == "$ours" ]] && ok "$name: status '$ours'" \
        || bad "$name: kernel status '$kstatus', cowsnap '$ours'" ;;
    invalid)
      [[ $rc == 3 ]] && ok "$name: the kernel sees the snapshot Invalid" \
        || bad "$name: check-cow exit $rc (want 3): $(tr '\n' ' ' < "$d/kernel.txt")"
      [[ $ours == *"snapshot Invalid" ]] && ok "$name: cowsnap status '$ours'" \
        || bad "$name: cowsnap status '$ours'" ;;
  esac
}

echo "== kernel-compat: cowsnap writes, the kernel reads (oracle $ORACLE)"
case_run c8-mixed 8 8M 16M match <<'S'
origin 0 65536 0xa1
origin 1048576 4096 0xa2
origin 2093056 12288 0xa3
snap 12288 1000 0x5a
snap 3145728 8192 0x5b
origin 3145728 16384 0xa4
origin 8384512 4096 0xa5
S
case_run c32-area-spill 32 32M 40M match <<'S'
origin 0 20971520 0xb1
snap 40960 512 0xb2
S
case_run c16-area-exactly-full 16 8M 16M match <<'S'
origin 0 4194304 0xc1
S
case_run c8-overflow 8 4M 65536 invalid <<'S'
origin 0 1048576 0xd1
S
# Merge: the origin rolled back to the snapshot; the kernel then reads the
# emptied COW as a snapshot equal to the origin.
d=$W/c8-merged; mkdir -p "$d"; cp "$W/c8-mixed/origin.img" "$W/c8-mixed/cow.img" "$d/"
"$COWSNAP" cow merge --origin "$d/origin.img" "$d/cow.img" -q > /dev/null
cmp -s "$d/origin.img" "$W/c8-mixed/expected.img" && ok "c8-merged: the origin holds the snapshot's content" \
  || bad "c8-merged: the origin differs from the snapshot's content"
cp "$d/origin.img" "$d/expected.img"
run_kernel c8-merged "$d" 8 match

# Chunks allocated before a crash and never committed are used again: drop
# the records of origin chunks 10-19 from the COW (as if the power went
# before their commit; the origin was not written then either), and write
# those chunks and ten others again. The ten holes take the first ten, so the
# highest COW chunk is 75 (next_free 76, 608 sectors), not 85.
d=$W/c8-reused-holes; mkdir -p "$d"
head -c 8M /dev/urandom > "$d/origin.img"; cp "$d/origin.img" "$d/expected.img"
truncate -s 16M "$d/cow.img"
"$COWSNAP" cow create --chunk-sectors 8 "$d/cow.img" > /dev/null
"$COWSNAP" io --origin "$d/origin.img" --cow "$d/cow.img" -c "write -P 0xe1 0 262144" > /dev/null
python3 - "$d" <<'PY'
import struct, sys
d = sys.argv[1]
with open(d + '/cow.img', 'r+b') as f:
    f.seek(4096); area = f.read(4096)
    recs = [struct.unpack_from('<QQ', area, i * 16) for i in range(256)]
    recs = [r for r in recs if r != (0, 0) and not 10 <= r[0] < 20]
    out = b''.join(struct.pack('<QQ', *r) for r in recs)
    f.seek(4096); f.write(out + bytes(4096 - len(out)))
with open(d + '/expected.img', 'rb') as e, open(d + '/origin.img', 'r+b') as o:
    e.seek(40960); o.seek(40960); o.write(e.read(40960))
PY
"$COWSNAP" io --origin "$d/origin.img" --cow "$d/cow.img" -c "write -P 0xe2 40960 40960" -c "write -P 0xe3 409600 40960" > /dev/null
run_kernel c8-reused-holes "$d" 8 match
[[ $("$COWSNAP" cow status --origin "$d/origin.img" "$d/cow.img") == *" 608/"* ]] \
  && ok "c8-reused-holes: the ten holes were used again (608 sectors allocated)" \
  || bad "c8-reused-holes: holes not used again: $("$COWSNAP" cow status --origin "$d/origin.img" "$d/cow.img")"

echo "kernel-compat: $pass passed, $fail failed"
[[ $fail == 0 ]]
