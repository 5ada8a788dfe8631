#!/bin/sh
# Runs in a Xen dom0 (scripts/testvm.sh --xen -- sh blkback/benches/xen/blkif_bench.sh;
# `cargo bench -p blkback --bench blkif_xen` does that): dom0 attaches three disks to
# itself through its own blkfront and times direct I/O on each with dd:
#   blkif   our userspace backend (examples/blkif_serve) on a thin pool volume
#   blkback the kernel's xen-blkback on a loop device over a raw file (Qubes' file path)
#   nbd     today's fallback: the qubes-ctl daemon's NBD export of a qube's private
#           volume -> dom0's kernel NBD client (qemu-nbd --connect) -> xen-blkback
# Each disk is written first (so reads hit data, not holes), then read. fio is not in the
# harness root, so the rows are dd's: sequential 1 MiB and sequential 4 KiB (one request
# in flight, so per-request cost), write and read, O_DIRECT. Absolute MB/s under nested
# TCG mean little; the ratios in one run are the figures.
set -eu
BIN=${BLKIF_SERVE:-/src/target/release/examples/blkif_serve}
MIB=${BENCH_MIB:-64}
W=/scratch/bench; rm -rf $W; mkdir -p $W
modprobe xen-blkfront
dd if=/dev/urandom of=/dev/shm/rand bs=1M count=$MIB 2>/dev/null

wait_dev() { i=0; while [ ! -b /dev/$1 ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; [ -b /dev/$1 ] || { echo "BENCH-FAIL: /dev/$1 never appeared"; exit 1; }; }

# a. ours
$BIN 0 --thin $W/pool $((MIB * 2)) 51712 xvda > $W/blkif.out 2> $W/blkif.err &
SERVE=$!
wait_dev xvda
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
    printf "%.1f", m*n/1e6/(t1-t0) }'
}
K4=$((MIB * 64))   # 4 KiB blocks in a quarter of the area
echo "BENCH rows: MB/s, dd O_DIRECT, $MIB MiB for 1 MiB rows, $((MIB / 4)) MiB for 4 KiB rows"
printf 'BENCH %-22s %10s %10s %10s\n' row blkif blkback nbd
for row in "seq-1M-write write 1M $MIB" "seq-1M-read read 1M $MIB" \
           "seq-4K-write write 4k $((K4 / 4))" "seq-4K-read read 4k $((K4 / 4))"; do
  set -- $row
  a=$(rate xvda $2 $3 $4); b=$(rate xvdb $2 $3 $4); c=$(rate xvdc $2 $3 $4)
  printf 'BENCH %-22s %10s %10s %10s\n' $1 $a $b $c
  echo "$1 $a $b $c" >> $W/rows
done
awk '{printf "BENCH %-22s blkif/blkback %.2f  blkif/nbd %.2f\n", $1, $2/$3, $2/$4}' $W/rows

xl block-detach 0 xvdc >/dev/null 2>&1 || true
qemu-nbd --disconnect /dev/nbd0 >/dev/null 2>&1 || true
qubes-ctl qube shutdown b --kill >/dev/null 2>&1 || true
xl block-detach 0 xvdb >/dev/null 2>&1 || true
losetup -d $LOOP 2>/dev/null || true
xenstore-write /local/domain/0/backend/qubes-vbd/0/51712/state 5 2>/dev/null || true
sleep 2; kill $SERVE 2>/dev/null || true
echo "BENCH-OK"
