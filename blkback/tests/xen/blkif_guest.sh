#!/bin/sh
# Runs in dom0 (scripts/testvm.sh --xen -- sh blkback/tests/xen/blkif_guest.sh): boots a
# PV domU (dom0's own kernel, a busybox initramfs) whose only disk is served by
# target/release/examples/blkif_serve, under our own backend type directory while the
# kernel's xen-blkback is loaded; twice: from a raw image file, then from a thin pool
# volume. Inside the guest: read, write with O_DIRECT + fsync, read back, write then
# discard 8 MiB. Checked here against the image / the pool volume, and for the pool,
# that the discard freed its chunks.
set -eu
BIN=${BLKIF_SERVE:-/src/target/release/examples/blkif_serve}
W=/scratch/blkif; rm -rf $W; mkdir -p $W/g/bin $W/g/dev $W/g/proc $W/g/sys $W/g/tmp
KV=$(ls /lib/modules | head -n1)
cp /bin/busybox $W/g/bin/busybox
for m in $(modprobe --show-depends xen-blkfront 2>/dev/null | awk '/^insmod/{print $2}'); do
  case $m in *.xz) xz -dc "$m" > $W/g/$(basename "$m" .xz) ;; *) cp "$m" $W/g/ ;; esac
  echo "$(basename "${m%.xz}")" >> $W/g/mods
done
cat > $W/g/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
[ -f /mods ] && for m in $(cat /mods); do insmod /$m; done
i=0; while [ ! -b /dev/xvda ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
h() { sha256sum | cut -d' ' -f1; }
echo "GUEST size $(cat /sys/block/xvda/size)"
if grep -q blkif.kill /proc/cmdline; then
  # The host SIGKILLs the backend once this is flushed: the write must be in the pool.
  dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
  dd if=/tmp/d of=/dev/xvda bs=1M seek=16 oflag=direct conv=fsync 2>/dev/null
  echo "GUEST flushed $(h < /tmp/d)"
  while :; do sleep 60; done
fi
echo "GUEST read0 $(dd if=/dev/xvda bs=1M count=4 iflag=direct 2>/dev/null | h)"
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
echo "GUEST wrote $(h < /tmp/d)"
dd if=/tmp/d of=/dev/xvda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null && echo "GUEST write ok"
echo "GUEST readback $(dd if=/dev/xvda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | h)"
dd if=/dev/urandom of=/dev/xvda bs=1M seek=32 count=8 oflag=direct conv=fsync 2>/dev/null
blkdiscard -o 33554432 -l 8388608 /dev/xvda && echo "GUEST discard ok"
echo "GUEST discarded $(dd if=/dev/xvda bs=1M skip=32 count=8 iflag=direct 2>/dev/null | h)"
echo "GUEST done"
poweroff -f
EOF
chmod +x $W/g/init
(cd $W/g && find . | busybox cpio -o -H newc | gzip) > $W/g.cpio.gz
sha() { sha256sum | cut -d' ' -f1; }
Z4=$(dd if=/dev/zero bs=1M count=4 2>/dev/null | sha)
Z8=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | sha)
fail=0

# run_guest NAME BACKEND-ARGS... ($EXTRA: more kernel arguments; $KILL_AFTER: SIGKILL the
# backend once the guest printed that GUEST line, then destroy the guest): boots the guest on that disk, leaves its console log
# in $W/NAME.log and the backend's stdout in $W/NAME.out.
run_guest() {
  name=$1; shift
  cat > $W/$name.cfg <<EOF
name="$name"
type="pv"
kernel="/boot/vmlinuz-$KV"
ramdisk="$W/g.cpio.gz"
memory=256
vcpus=1
extra="console=hvc0 rdinit=/init ${EXTRA:-}"
on_poweroff="destroy"
on_crash="destroy"
EOF
  xl create -p $W/$name.cfg
  domid=$(xl domid $name)
  RUST_LOG=${RUST_LOG:-info} $BIN "$domid" "$@" > $W/$name.out 2> $W/$name.err &
  serve=$!
  i=0; until grep -q ready $W/$name.out; do
    sleep 1; i=$((i+1))
    [ $i -lt 60 ] || { cat $W/$name.err; echo "FAIL: $name: backend not ready"; xl destroy $name; fail=1; return; }
  done
  t0=$(date +%s)
  xl unpause $name
  log=/var/log/xen/console/guest-$name.log
  i=0; while xl domid $name >/dev/null 2>&1 && [ $i -lt 600 ]; do
    if [ -n "${KILL_AFTER:-}" ] && grep -aq "GUEST $KILL_AFTER" $log 2>/dev/null; then
      kill -9 $serve; echo "$name: backend SIGKILLed"; xl destroy $name; break
    fi
    sleep 2; i=$((i+2))
  done
  echo "$name: guest ran $(( $(date +%s) - t0 )) s"
  xl destroy $name 2>/dev/null || true
  i=0; while kill -0 $serve 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
  kill $serve 2>/dev/null || true
  if [ -z "${KILL_AFTER:-}" ]; then
    wait $serve || { echo "FAIL: $name: blkif_serve exited with an error"; fail=1; }
  fi
  tr -d '\r' < /var/log/xen/console/guest-$name.log > $W/$name.log
  echo "--- $name: guest"; grep -a "GUEST\|blkfront\|panic\|Oops" $W/$name.log || true
  echo "--- $name: blkif_serve"; tail -n 8 $W/$name.err
}
g() { grep -a "GUEST $2" $W/$1.log | tail -n1 | awk '{print $3}'; }
check() { # NAME WHAT GOT WANT
  [ -n "$3" ] && [ "$3" = "$4" ] || { echo "FAIL: $1: $2: got '$3', want '$4'"; fail=1; }
}

# 1. A raw image (the file backend punches holes for discards), with persistent grants
# not offered: every segment by grant copy.
truncate -s 64M $W/disk.img
dd if=/dev/urandom of=$W/disk.img bs=1M count=4 conv=notrunc 2>/dev/null
READ0=$(dd if=$W/disk.img bs=1M count=4 2>/dev/null | sha)
QUBES_BLKIF_PERSISTENT=0 run_guest blkf $W/disk.img
grep -aq "persistent grants: disabled" $W/blkf.log || { echo "FAIL: blkf: blkfront did not report persistent grants disabled"; fail=1; }
check blkf size "$(g blkf size)" 131072
check blkf read0 "$(g blkf read0)" "$READ0"
check blkf wrote "$(g blkf wrote)" "$(dd if=$W/disk.img bs=1M skip=8 count=4 2>/dev/null | sha)"
check blkf readback "$(g blkf readback)" "$(g blkf wrote)"
check blkf discarded "$(g blkf discarded)" "$Z8"
check blkf image-after-discard "$(dd if=$W/disk.img bs=1M skip=32 count=8 2>/dev/null | sha)" "$Z8"

# 2. A thin pool volume: same checks against the pool, and the discard frees chunks
# (mapped = only the 4 MiB written at 8 MiB; the 8 MiB written then discarded are gone).
# Persistent grants offered (the default): blkfront takes them, and the backend moved
# the data between the pool and pages it mapped once, with no copy of its own
# (pwritev/preadv into the mappings: segments_direct).
run_guest blkt --thin $W/pool 64
grep -aq "persistent grants: enabled" $W/blkt.log || { echo "FAIL: blkt: blkfront did not report persistent grants enabled"; fail=1; }
grep -q "persistent=true" $W/blkt.err && grep "blkif device thread done" $W/blkt.err | grep -q "segments_direct=[1-9]" || { echo "FAIL: blkt: no segment moved in place through a persistent mapping"; fail=1; }
check blkt size "$(g blkt size)" 131072
check blkt read0 "$(g blkt read0)" "$Z4"
check blkt wrote "$(g blkt wrote)" "$($BIN --read-thin $W/pool 8388608 4194304 | sha)"
check blkt readback "$(g blkt readback)" "$(g blkt wrote)"
check blkt discarded "$(g blkt discarded)" "$Z8"
check blkt mapped "$(awk '/^mapped/{print $2}' $W/blkt.out)" 4194304

# 3. A flushed write survives a SIGKILL of the backend (FLUSH = pool commit).
EXTRA=blkif.kill KILL_AFTER=flushed run_guest blkk --thin $W/pool 64
check blkk flushed-after-kill "$($BIN --read-thin $W/pool 16777216 4194304 | sha)" "$(g blkk flushed)"
xenstore-rm /local/domain/0/backend/qubes-vbd 2>/dev/null || true

grep -q . /sys/block/nbd0/pid 2>/dev/null && { echo "FAIL: an nbd device is in use"; fail=1; }
pgrep -x qemu-nbd >/dev/null && { echo "FAIL: qemu-nbd runs"; fail=1; }
[ -z "$(xenstore-list /local/domain/0/backend/qubes-vbd 2>/dev/null)" ] || { echo "FAIL: backend nodes left"; fail=1; }
[ $fail = 0 ] && echo "BLKIF-GUEST-OK"
exit $fail
