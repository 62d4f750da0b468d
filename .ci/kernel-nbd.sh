#!/usr/bin/env bash
# The kernel's NBD client against cowsnap's NBD server, in a real kernel:
# these machines have no `nbd` module, so the kernel oracle's Linux boots
# under QEMU with its own nbd.ko and a virtio network, and `cowsnap nbd`
# (the netlink code the CSI node plugin uses) runs in it against
# `cowsnap up` on this host (QEMU's user network reaches it at 10.0.2.2).
#
# The guest attaches volumes/v1 as /dev/nbdN, writes through it with
# fsync, and its detach is refused while device-mapper holds the device.
# The host then snapshots the volume, kills `cowsnap up` with SIGKILL and
# starts it again; meanwhile the guest writes more (the kernel holds that
# I/O while the server is gone) and reconnects the same device with
# `cowsnap nbd reconnect`; the held write completes. The host grows the
# volume; the open device takes the new size (`cowsnap nbd resize`) and
# is written past its old end. The device detaches.
# The host checks, over NBD, that the volume holds exactly what the guest
# read back at the end and the snapshot what it read before the restart.
#
# Usage: .ci/kernel-nbd.sh [WORKDIR]
# Env: KC_ORACLE (default ../shared/tools/kernel-oracle next to the repo),
#      KC_CACHE (default target/kc-cache), COWSNAP (default target/debug/cowsnap).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ORACLE=${KC_ORACLE:-$ROOT/../shared/tools/kernel-oracle}
export KC_CACHE=${KC_CACHE:-$ROOT/target/kc-cache}
COWSNAP=${COWSNAP:-$ROOT/target/debug/cowsnap}
W=${1:-$(mktemp -d "$ROOT/target/kernel-nbd.XXXXXX")}
mkdir -p "$W" "$KC_CACHE"
[[ -x $ORACLE/make-initramfs.sh ]] || { echo "kernel-nbd: no kernel oracle at $ORACLE (set KC_ORACLE)" >&2; exit 1; }
[[ -x $COWSNAP ]] || { echo "kernel-nbd: no cowsnap at $COWSNAP (set COWSNAP)" >&2; exit 1; }

# The oracle's kernel and base initramfs (busybox, dmsetup, virtio, dm).
KC_QUIET=1 "$ORACLE/make-initramfs.sh" > /dev/null 2> "$W/make-initramfs.log" \
  || { cat "$W/make-initramfs.log" >&2; exit 1; }
KVER=$(cat "$KC_CACHE/kver")
# The modules it leaves out: nbd, and the virtio network with what it needs.
MODS=$KC_CACHE/kernel-nbd-modules
if [[ ! -e $MODS/.done-$KVER ]]; then
  rm -rf "$MODS"
  mkdir -p "$MODS/dl"
  (cd "$MODS/dl" && apt-get download "linux-image-$KVER" > /dev/null 2>&1) \
    || { echo "kernel-nbd: cannot download linux-image-$KVER" >&2; exit 1; }
  dpkg-deb -x "$MODS"/dl/*.deb "$MODS/dl/root"
  for m in net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/block/nbd; do
    cp "$MODS/dl/root/lib/modules/$KVER/kernel/$m.ko" "$MODS/"
  done
  rm -rf "$MODS/dl"
  touch "$MODS/.done-$KVER"
fi

# cowsnap for the guest, stripped, with the libraries it loads.
ROOTFS=$W/guest-root
mkdir -p "$ROOTFS/files"
cp "$COWSNAP" "$ROOTFS/files/cowsnap"
strip "$ROOTFS/files/cowsnap"
for lib in $(ldd "$COWSNAP" | grep -o '/[^ ]*'); do
  mkdir -p "$ROOTFS$(dirname "$lib")"
  cp -L "$lib" "$ROOTFS$lib"
done
cp "$MODS"/*.ko "$ROOTFS/files/"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URI="nbd://10.0.2.2:$PORT/volumes/v1"
cat > "$ROOTFS/run.sh" <<EOF
set -e
for m in failover net_failover virtio_net nbd; do insmod /files/\$m.ko; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
CS=/files/cowsnap
dev=\$(\$CS nbd attach --backend knbd-test $URI)
n=\${dev#/dev/}
kc_kv DEVICE \$dev
kc_kv SECTORS \$(cat /sys/block/\$n/size)
kc_kv BACKEND \$(cat /sys/block/\$n/backend)
kc_kv LIST "\$(\$CS nbd list | tr '\t' ' ')"
kc_fill \$dev 1048576 4194304 0xab
kc_fill \$dev 0 4096 0x5a
kc_kv SHA1 \$(kc_sha \$dev)
dmsetup create hold --table "0 8 linear \$dev 0"
if \$CS nbd detach \$dev 2> /tmp/err; then kc_kv DETACH_HELD accepted; else kc_kv DETACH_HELD "refused: \$(cat /tmp/err)"; fi
dmsetup remove hold
echo "@@KNBD-RESTART"
# Wait until the kernel sees the server go (the host kills it now).
i=0
until dmesg | grep -q "\$n.*Receive control failed"; do
  i=\$((i + 1)); [ \$i -lt 600 ] || { echo "the connection never died"; exit 1; }
  sleep 0.5
done
kc_kv DEAD yes
# Written while no server serves: the kernel holds it.
kc_fill \$dev 8388608 2097152 0xc3 &
fill=\$!
i=0
until \$CS nbd reconnect --backend knbd-test \$dev $URI 2> /tmp/err; do
  i=\$((i + 1)); [ \$i -lt 240 ] || { cat /tmp/err; exit 1; }
  sleep 0.5
done
kc_kv RECONNECTED "after \$i tries"
wait \$fill
kc_kv HELD_WRITE done
kc_kv SHA2 \$(kc_sha \$dev)
# The host grows the volume to 96 MiB now; the device follows while open.
exec 7< \$dev
echo "@@KNBD-EXPAND"
i=0
until [ "\$(cat /sys/block/\$n/size)" = 196608 ]; do
  i=\$((i + 1)); [ \$i -lt 240 ] || { echo "the device never grew"; exit 1; }
  \$CS nbd resize --backend knbd-test \$dev $URI > /dev/null
  sleep 0.5
done
kc_kv GROWN_SECTORS \$(cat /sys/block/\$n/size)
kc_fill \$dev 96468992 4194304 0x77
kc_kv SHA3 \$(kc_sha \$dev)
exec 7<&-
\$CS nbd detach \$dev
kc_kv AFTER_DETACH_SECTORS \$(cat /sys/block/\$n/size)
kc_kv LIST_AFTER "\$(\$CS nbd list)"
EOF
(cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort | busybox cpio -o -H newc 2> /dev/null) > "$W/initrd"
cat "$KC_CACHE/initramfs.cpio.gz" >> "$W/initrd"

UP_PID="" QEMU_PID=""
cleanup() {
  [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2> /dev/null || true
  [[ -n $UP_PID ]] && kill "$UP_PID" 2> /dev/null || true
  wait 2> /dev/null || true
}
trap cleanup EXIT
start_up() {
  "$COWSNAP" up --data-dir "$W/data" --listen "unix:$W/api.sock" \
    --nbd-listen "127.0.0.1:$PORT" >> "$W/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 1 300); do
    "$COWSNAP" health --addr "unix:$W/api.sock" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  cat "$W/up.log" >&2
  echo "kernel-nbd: cowsnap up did not start" >&2
  exit 1
}
CLI=(--server "unix:$W/api.sock")
start_up
"$COWSNAP" volume create "${CLI[@]}" --size 64m v1 > /dev/null

LOG=$W/guest.log
: > "$LOG"
timeout -k 10 600 qemu-system-x86_64 -accel tcg -cpu max -m 1024 -smp 1 -nodefaults -no-user-config \
  -display none -serial "file:$LOG" -monitor none -no-reboot \
  -kernel "$KC_CACHE/vmlinuz" -initrd "$W/initrd" \
  -append "console=ttyS0 panic=-1 loglevel=1 rdinit=/init kc.ndisks=0" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
  < /dev/null > "$W/qemu.out" 2>&1 &
QEMU_PID=$!

# The guest says when to restart the server.
restarted=no expanded=no
while kill -0 "$QEMU_PID" 2> /dev/null; do
  if [[ $expanded == no ]] && grep -q '^@@KNBD-EXPAND' "$LOG"; then
    "$COWSNAP" volume expand "${CLI[@]}" v1 --size 96m > /dev/null
    expanded=yes
  fi
  if [[ $restarted == no ]] && grep -q '^@@KNBD-RESTART' "$LOG"; then
    "$COWSNAP" snapshot create "${CLI[@]}" v1/s1 > /dev/null
    kill -KILL "$UP_PID"
    wait "$UP_PID" 2> /dev/null || true
    sleep 2
    start_up
    restarted=yes
  fi
  sleep 0.2
done
wait "$QEMU_PID" || true
QEMU_PID=""
tr -d '\r' < "$LOG" > "$W/guest.txt"
awk '/^@@KC-BEGIN/{on=1; next} /^@@KC-END/{on=0} on' "$W/guest.txt"
kv() { sed -n "s/^@@KV $1=//p" "$W/guest.txt" | tail -n1; }
rc=$(sed -n 's/^@@KC-EXIT=\([0-9]*\)@@.*/\1/p' "$W/guest.txt" | tail -n1)

pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
check() { if [[ $2 == "$3" ]]; then ok "$1: $2"; else bad "$1: got '$2', want '$3'"; fi; }

check "the guest script" "${rc:-none}" 0
check "restarted by the host" "$restarted" yes
check "device size in sectors" "$(kv SECTORS)" $((64 << 11))
check "backend label" "$(kv BACKEND)" knbd-test
[[ $(kv DETACH_HELD) == refused:*"in use"* ]] && ok "detach refused while held: $(kv DETACH_HELD)" \
  || bad "detach while held: $(kv DETACH_HELD)"
check "the held write finished after the reconnect" "$(kv HELD_WRITE)" done
check "the device is empty after detach" "$(kv AFTER_DETACH_SECTORS)" 0
check "nothing attached after detach" "$(kv LIST_AFTER)" ""
host_sha() { nbdcopy "nbd://127.0.0.1:$PORT/$1" - | sha256sum | cut -d' ' -f1; }
check "the snapshot holds what the guest read before the restart" "$(host_sha volumes/v1/snapshots/s1)" "$(kv SHA1)"
check "the device grew while open to the volume's new size" "$(kv GROWN_SECTORS)" $((96 << 11))
check "the volume holds what the guest read at the end" "$(host_sha volumes/v1)" "$(kv SHA3)"
[[ -n $(kv SHA1) && $(kv SHA1) != "$(kv SHA2)" ]] && ok "the held write changed the volume" \
  || bad "SHA1 '$(kv SHA1)' SHA2 '$(kv SHA2)'"
echo "kernel-nbd: $pass passed, $fail failed"
if [[ $fail != 0 ]]; then
  echo "--- guest console tail" >&2
  tail -n 40 "$W/guest.txt" >&2
  echo "--- cowsnap up log tail" >&2
  tail -n 20 "$W/up.log" >&2
  exit 1
fi
