#!/bin/sh
# Runs in a Xen dom0 (scripts/testvm.sh --xen -- sh blkback/benches/xen/blkif_bench.sh;
# `cargo bench -p blkback --bench blkif_xen` does that): dom0 attaches four disks to
# itself through its own blkfront and times direct I/O on each:
#   blkif   our userspace backend (examples/blkif_serve) on a thin pool volume, with
#           persistent grants (blkfront takes them: data moves by memcpy through pages
#           mapped once)
#   blkcopy the same on a second thin pool with persistent grants not offered
#           (QUBES_BLKIF_PERSISTENT=0): one grant-copy hypercall per run of requests;
#           blkif/blkcopy is what persistent grants buy. (An earlier version of this
#           column, ours on a raw file, put the thin pool's own cost within ~25%.)
#   blkback the kernel's xen-blkback on a loop device over a raw file (Qubes' file path)
#   nbd     today's fallback: the qubes-ctl daemon's NBD export of a qube's private
#           volume -> dom0's kernel NBD client (qemu-nbd --connect) -> xen-blkback
# Each disk is written first (so reads hit data, not holes), then read. Rows: dd's
# sequential 1 MiB and 4 KiB (one request in flight, so per-request cost), write and
# read, O_DIRECT (the rows of the first runs, kept to compare); then fio (libaio,
# O_DIRECT): random 4 KiB write and read at queue depth 1 and 8, 8 s each. dom0 is its
# own guest here (one vCPU runs the benchmark, blkfront and every backend), not a domU.
# Absolute MB/s under nested TCG mean little; the ratios in one run are the figures.
set -eu
BIN=${BLKIF_SERVE:-/src/target/release/examples/blkif_serve}
MIB=${BENCH_MIB:-64}
W=/scratch/bench; rm -rf $W; mkdir -p $W
modprobe xen-blkfront
dd if=/dev/urandom of=/dev/shm/rand bs=1M count=$MIB 2>/dev/null

wait_dev() { i=0; while [ ! -b /dev/$1 ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; [ -b /dev/$1 ] || { echo "BENCH-FAIL: /dev/$1 never appeared"; exit 1; }; }

# a. ours
# Our backends log their counters when a device closes (BENCH stats lines at the end).
export RUST_LOG=blkback=info
$BIN 0 --thin $W/pool $((MIB * 2)) 51712 xvda > $W/blkif.out 2> $W/blkif.err &
SERVE=$!
wait_dev xvda
# r. ours again, grant copy only (no persistent grants offered)
QUBES_BLKIF_PERSISTENT=0 $BIN 0 --thin $W/pool2 $((MIB * 2)) 51760 xvdd > $W/blkcopy.out 2> $W/blkcopy.err &
SERVE_RAW=$!
wait_dev xvdd
# b. kernel blkback over loop
truncate -s $((MIB * 2))M $W/raw.img
LOOP=$(losetup -f --show $W/raw.img)
xl block-attach 0 "format=raw,vdev=xvdb,access=rw,target=$LOOP"
wait_dev xvdb
# c. the daemon's NBD export through the kernel NBD client and blkback
dd if=/dev/urandom of=$W/tpl.img bs=1M count=8 2>/dev/null
export QUBES_CTL_ROOT=$W/qc
qubes-ctl pool init --size 2G > /dev/null
qubes-ctl template create small --from-image $W/tpl.img > /dev/null
qubes-ctl qube create b --class AppVM --template small > /dev/null
qubes-ctl qube start b --hypervisor none > /dev/null
URI=$(qubes-ctl --format json volume info b:private | sed -n 's/.*"nbd_uri": *"\([^"]*\)".*/\1/p')
[ -n "$URI" ] || { echo "BENCH-FAIL: no nbd_uri for b:private"; exit 1; }
qemu-nbd --connect=/dev/nbd0 --format=raw --cache=none "$URI"
xl block-attach 0 "format=raw,vdev=xvdc,access=rw,target=/dev/nbd0"
wait_dev xvdc

now() { date +%s.%N; }
# rate DEV OP BS COUNT -> MB/s
rate() {
  dev=$1 op=$2 bs=$3 n=$4
  t0=$(now)
  if [ $op = write ]; then
    dd if=/dev/shm/rand of=/dev/$dev bs=$bs count=$n oflag=direct conv=fsync 2>/dev/null
  else
    dd if=/dev/$dev of=/dev/null bs=$bs count=$n iflag=direct 2>/dev/null
  fi
  t1=$(now)
  awk -v t0=$t0 -v t1=$t1 -v bs=$bs -v n=$n 'BEGIN{
    m = bs; if (bs ~ /k$/) m = substr(bs,1,length(bs)-1)*1024; else if (bs ~ /M$/) m = substr(bs,1,length(bs)-1)*1048576;
    printf "%.2f", m*n/1e6/(t1-t0) }'
}
# fio DEV RW QD -> MB/s (random 4 KiB over the written area, 8 s)
fio_rate() {
  fio --name=b --filename=/dev/$1 --rw=$2 --bs=4k --size=${MIB}M --ioengine=libaio \
      --iodepth=$3 --direct=1 --runtime=8 --time_based --randrepeat=0 --minimal 2>/dev/null |
    awk -F';' -v rw=$2 '{ kib = (rw == "randread") ? $7 : $48; printf "%.2f", kib * 1024 / 1e6 }'
}
K4=$((MIB * 64))   # 4 KiB blocks in a quarter of the area
DEVS="xvda xvdd xvdb xvdc"
echo "BENCH fairness: every disk starts unwritten (our thin volumes and the NBD one unallocated, the loop device's raw file sparse); seq-1M-write, the first row, writes the area on each, so every later row, the domU's included, runs over written data on all four"
echo "BENCH rows: MB/s, dd O_DIRECT, $MIB MiB for 1 MiB rows, $((MIB / 4)) MiB for 4 KiB rows; fio random 4 KiB over $MIB MiB, 8 s"
printf 'BENCH %-22s %10s %10s %10s %10s\n' row blkif blkcopy blkback nbd
for row in "seq-1M-write write 1M $MIB" "seq-1M-read read 1M $MIB" \
           "seq-4K-write write 4k $((K4 / 4))" "seq-4K-read read 4k $((K4 / 4))"; do
  set -- $row
  line=$1
  for d in $DEVS; do line="$line $(rate $d $2 $3 $4)"; done
  set -- $line
  printf 'BENCH %-22s %10s %10s %10s %10s\n' $1 $2 $3 $4 $5
  echo "$line" >> $W/rows
done
if command -v fio >/dev/null; then
  for row in "fio-rand-4K-write-qd1 randwrite 1" "fio-rand-4K-read-qd1 randread 1" \
             "fio-rand-4K-write-qd8 randwrite 8" "fio-rand-4K-read-qd8 randread 8"; do
    set -- $row
    line=$1
    for d in $DEVS; do line="$line $(fio_rate $d $2 $3)"; done
    set -- $line
    printf 'BENCH %-22s %10s %10s %10s %10s\n' $1 $2 $3 $4 $5
    echo "$line" >> $W/rows
  done
else
  echo "BENCH fio is not in this root (scripts/testvm.sh ROOT_PKGS): no random rows"
fi
awk 'function r(a, b) { return b > 0 ? a / b : 0 }
  {printf "BENCH %-22s blkif/blkback %.2f  blkif/nbd %.2f  blkcopy/blkback %.2f  blkif/blkcopy %.2f\n", $1, r($2,$4), r($2,$5), r($3,$4), r($2,$3)}' $W/rows

# ---- The same four backends, for fio inside a PV domU ----
# dom0 as its own frontend (above) runs the benchmark, blkfront and the backend on one
# vCPU: every request of a userspace backend switches address spaces twice there, which
# the kernel's blkback (a kthread) never does. A domU is the real case: its blkfront on
# its own vCPU, dom0 running only the backends. The domU boots dom0's kernel with an
# initramfs of busybox, fio and xen-blkfront, runs the fio rows and prints them on its
# console; dom0 reads them from xenconsoled's log.
xl block-detach 0 xvdc >/dev/null 2>&1 || true
xl block-detach 0 xvdb >/dev/null 2>&1 || true
for dev in 51712 51760; do
  xenstore-write /local/domain/0/backend/qubes-vbd/0/$dev/state 5 2>/dev/null || true
done
sleep 2; kill $SERVE $SERVE_RAW 2>/dev/null || true
wait $SERVE $SERVE_RAW 2>/dev/null || true
for dev in 51712 51760; do
  xenstore-rm /local/domain/0/backend/qubes-vbd/0/$dev 2>/dev/null || true
  xenstore-rm /local/domain/0/device/vbd/$dev 2>/dev/null || true
done
U=$W/domu; mkdir -p $U/bin $U/dev $U/proc $U/sys $U/tmp
cp /bin/busybox /usr/bin/fio $U/bin/
for l in $(ldd /usr/bin/fio | awk '/=> \//{print $3} /^\t\//{print $1}'); do
  mkdir -p $U$(dirname $l); cp -L $l $U$l
done
for m in $(modprobe --show-depends xen-blkfront 2>/dev/null | awk '/^insmod/{print $2}'); do
  case $m in *.xz) xz -dc "$m" > $U/$(basename "$m" .xz) ;; *) cp "$m" $U/ ;; esac
  echo "$(basename "${m%.xz}")" >> $U/mods
done
cat > $U/init <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/shm; mount -t tmpfs shm /dev/shm; mount -t tmpfs tmp /tmp
for m in \$(cat /mods); do insmod /\$m; done
for d in xvda xvdd xvdb xvdc; do
  i=0; while [ ! -b /dev/\$d ] && [ \$i -lt 120 ]; do sleep 1; i=\$((i+1)); done
  [ -b /dev/\$d ] || echo "BENCHU-FAIL /dev/\$d never appeared"
done
row() {
  name=\$1; shift; line=\$name
  for d in xvda xvdd xvdb xvdc; do
    line="\$line \$(fio --name=b --thread --filename=/dev/\$d --ioengine=libaio --direct=1 --minimal "\$@" 2>/dev/null |
      awk -F';' '{ printf "%.2f", (\$7 + \$48) * 1024 / 1e6 }')"
  done
  echo "BENCHU \$line"
}
row seq-1M-write --rw=write --bs=1M --size=${MIB}M --iodepth=4 --end_fsync=1
row seq-1M-read --rw=read --bs=1M --size=${MIB}M --iodepth=4
row rand-4K-write-qd1 --rw=randwrite --bs=4k --size=${MIB}M --iodepth=1 --runtime=6 --time_based --randrepeat=0
row rand-4K-read-qd1 --rw=randread --bs=4k --size=${MIB}M --iodepth=1 --runtime=6 --time_based --randrepeat=0
row rand-4K-write-qd8 --rw=randwrite --bs=4k --size=${MIB}M --iodepth=8 --runtime=6 --time_based --randrepeat=0
row rand-4K-read-qd8 --rw=randread --bs=4k --size=${MIB}M --iodepth=8 --runtime=6 --time_based --randrepeat=0
echo BENCHU-DONE
sync; poweroff -f
EOF
chmod +x $U/init
(cd $U && find . | busybox cpio -o -H newc 2>/dev/null) > $W/domu.cpio
cat > $W/domu.cfg <<EOF
name = "benchu"
type = "pv"
kernel = "/boot/vmlinuz-$(uname -r)"
ramdisk = "$W/domu.cpio"
extra = "console=hvc0 quiet"
memory = 768
vcpus = 1
on_poweroff = "destroy"
disk = [ "format=raw,vdev=xvdb,access=rw,target=$LOOP", "format=raw,vdev=xvdc,access=rw,target=/dev/nbd0" ]
EOF
ULOG=/var/log/xen/console/guest-benchu.log; rm -f $ULOG
xl create -p $W/domu.cfg > $W/xl-create.log 2>&1 || { echo "BENCH-FAIL: xl create -p of the domU:"; cat $W/xl-create.log; exit 1; }
D=$(xl domid benchu)
$BIN $D --thin $W/pool $((MIB * 2)) 51712 xvda > $W/u-blkif.out 2> $W/u-blkif.err &
USERVE=$!
QUBES_BLKIF_PERSISTENT=0 $BIN $D --thin $W/pool2 $((MIB * 2)) 51760 xvdd > $W/u-blkcopy.out 2> $W/u-blkcopy.err &
USERVE_RAW=$!
i=0; until grep -q ready $W/u-blkif.out && grep -q ready $W/u-blkcopy.out; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "BENCH-FAIL: blkif_serve for the domU not ready"; cat $W/u-blkif.err $W/u-blkcopy.err; exit 1; }
  sleep 1
done
xl unpause benchu
i=0; until grep -q 'BENCHU-DONE' $ULOG 2>/dev/null; do
  i=$((i+1))
  if [ $i -gt 1200 ] || ! xl domid benchu >/dev/null 2>&1; then
    echo "BENCH-FAIL: the domU did not finish its rows; console tail:"; tail -n 30 $ULOG; exit 1
  fi
  sleep 1
done
if grep -q BENCHU-FAIL $ULOG; then echo "BENCH-FAIL: in the domU:"; grep BENCHU-FAIL $ULOG; exit 1; fi
echo "BENCH domU (PV, 1 vCPU) fio libaio O_DIRECT: seq 1 MiB qd4 over $MIB MiB, random 4 KiB 6 s each"
printf 'BENCH %-22s %10s %10s %10s %10s\n' domU-row blkif blkcopy blkback nbd
tr -d '\r' < $ULOG | sed -n 's/^BENCHU \([a-z].*\)$/\1/p' > $W/urows
awk '{printf "BENCH domU-%-17s %10s %10s %10s %10s\n", $1, $2, $3, $4, $5}' $W/urows
awk 'function r(a, b) { return b > 0 ? a / b : 0 }
  {printf "BENCH domU-%-17s blkif/blkback %.2f  blkif/nbd %.2f  blkcopy/blkback %.2f  blkif/blkcopy %.2f\n", $1, r($2,$4), r($2,$5), r($3,$4), r($2,$3)}' $W/urows
xl destroy benchu >/dev/null 2>&1 || true
# Let the backends see the domain go and log their counters.
i=0; while [ $i -lt 15 ] && ! { grep -q 'device thread done' $W/u-blkif.err && grep -q 'device thread done' $W/u-blkcopy.err; }; do sleep 1; i=$((i+1)); done
kill $USERVE $USERVE_RAW 2>/dev/null || true

# The device threads' counters (blkif/blkcopy in dom0, then in the domU): requests,
# passes over the ring, wake-ups by a kick, spin hits, notifications, volume calls,
# the thread's CPU time.
for f in blkif blkcopy u-blkif u-blkcopy; do
  sed -n "s/.*blkif device thread done \(.*\)/BENCH stats $f: \1/p" $W/$f.err
done
qemu-nbd --disconnect /dev/nbd0 >/dev/null 2>&1 || true
qubes-ctl qube shutdown b --kill >/dev/null 2>&1 || true
losetup -d $LOOP 2>/dev/null || true
echo "BENCH-OK"
