#!/bin/sh
# Runs in dom0 (scripts/testvm.sh --xen -- sh blkback/tests/xen/blkif_guest.sh): boots a
# PV domU (dom0's own kernel, a busybox initramfs) whose only disk is served by
# target/release/examples/blkif_serve from a raw file, under our own backend type
# directory while the kernel's xen-blkback is loaded. Inside the guest: read, write with
# O_DIRECT + fsync, read back, discard. Checked here against the image file.
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
echo "GUEST size $(cat /sys/block/xvda/size)"
echo "GUEST read0 $(dd if=/dev/xvda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/d bs=1M count=4 2>/dev/null
echo "GUEST wrote $(sha256sum /tmp/d | cut -d' ' -f1)"
dd if=/tmp/d of=/dev/xvda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null && echo "GUEST write ok"
echo "GUEST readback $(dd if=/dev/xvda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
blkdiscard -o 33554432 -l 8388608 /dev/xvda && echo "GUEST discard ok"
echo "GUEST done"
poweroff -f
EOF
chmod +x $W/g/init
(cd $W/g && find . | busybox cpio -o -H newc | gzip) > $W/g.cpio.gz
truncate -s 64M $W/disk.img
dd if=/dev/urandom of=$W/disk.img bs=1M count=4 conv=notrunc 2>/dev/null
dd if=/dev/urandom of=$W/disk.img bs=1M seek=32 count=8 conv=notrunc 2>/dev/null
READ0=$(dd if=$W/disk.img bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
cat > $W/g.cfg <<EOF
name="blkt"
type="pv"
kernel="/boot/vmlinuz-$KV"
ramdisk="$W/g.cpio.gz"
memory=256
vcpus=1
extra="console=hvc0 rdinit=/init"
on_poweroff="destroy"
on_crash="destroy"
EOF
xl create -p $W/g.cfg
DOMID=$(xl domid blkt)
RUST_LOG=${RUST_LOG:-info} $BIN "$DOMID" $W/disk.img > $W/serve.out 2> $W/serve.err &
SERVE=$!
i=0; until grep -q ready $W/serve.out; do
  sleep 1; i=$((i+1)); [ $i -lt 60 ] || { cat $W/serve.err; echo "FAIL: backend not ready"; exit 1; }
done
xenstore-ls -f /local/domain/0/backend | grep -v '^/local/domain/0/backend/vbd/' | head -40 || true
T0=$(date +%s)
xl unpause blkt
i=0; while xl domid blkt >/dev/null 2>&1 && [ $i -lt 900 ]; do sleep 2; i=$((i+2)); done
echo "guest ran $(( $(date +%s) - T0 )) s"
LOG=/var/log/xen/console/guest-blkt.log
echo "--- guest console"; grep -av "^\s*$" $LOG | tail -n 60 || true
xl destroy blkt 2>/dev/null || true
i=0; while kill -0 $SERVE 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
kill $SERVE 2>/dev/null || true
echo "--- blkif_serve stderr"; tail -20 $W/serve.err
fail=0
g() { grep -a "GUEST $1" $LOG | tr -d '\r' | tail -n1 | awk '{print $3}'; }
[ "$(g read0)" = "$READ0" ] || { echo "FAIL: guest read $(g read0), image has $READ0"; fail=1; }
WROTE=$(dd if=$W/disk.img bs=1M skip=8 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
[ -n "$(g wrote)" ] && [ "$(g wrote)" = "$WROTE" ] || { echo "FAIL: guest wrote $(g wrote), image has $WROTE"; fail=1; }
[ "$(g readback)" = "$WROTE" ] || { echo "FAIL: readback $(g readback)"; fail=1; }
grep -aq "GUEST discard ok" $LOG || { echo "FAIL: discard"; fail=1; }
# The image backend (blkback::testing::FileDevice) discards by punching holes: the
# discarded 8 MiB read as zeros and no longer take space.
ZERO=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$(dd if=$W/disk.img bs=1M skip=32 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$ZERO" ] \
  || { echo "FAIL: discarded range not zero"; fail=1; }
echo "image uses $(du -k $W/disk.img | cut -f1) KiB (4 MiB + 4 MiB written, 8 MiB discarded)"
[ "$(g size)" = "131072" ] || { echo "FAIL: size $(g size)"; fail=1; }
ls /sys/block | grep -q nbd && [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ] && { echo "FAIL: nbd in use"; fail=1; }
xenstore-ls /local/domain/0/backend/qubes-vbd 2>/dev/null | grep -q . && { echo "FAIL: backend nodes left"; fail=1; }
[ $fail = 0 ] && echo "BLKIF-GUEST-OK"
exit $fail
