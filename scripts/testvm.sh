#!/usr/bin/env bash
# Runs a command as root inside a Debian 12 VM under QEMU TCG, optionally as Xen 4.17's dom0.
#
#   scripts/testvm.sh [--xen] [--timeout S] [--mem MiB] [--scratch SIZE] [--scratch-from DIR]
#                     [--share DIR] [--verbose] -- COMMAND...
#
# The VM boots Debian 12's 6.1 kernel (with --xen: Debian 12's Xen 4.17 with that kernel as
# PV dom0) on a cached Debian 12 root (mmdebstrap: xen-utils-4.17, qemu-utils, kmod, ...),
# whose writes are thrown away (QEMU snapshot=on). In the VM: the working tree is mounted
# read-only at /src (9p) and COMMAND runs there; the directory of this build's qubes-ctl
# (target/release, or $QUBES_CTL_BIN's) is first on PATH; a fresh sparse scratch disk
# (--scratch, default 16G) is formatted ext4 and mounted at /scratch, and QUBES_CTL_ROOT
# points into it (dom0's RAM is small); --scratch-from DIR starts it with DIR's contents
# (mke2fs -d on the host: a pool prepared natively instead of under nested TCG). --share DIR is mounted read-only at /share (9p). Modules loaded: loop, dm-mod, nbd, 9p; with --xen
# also the Xen ones, and xenstored, xen-init-dom0 and `xenconsoled --log=guest` run.
# COMMAND's output (stdout+stderr) is printed; the script exits with COMMAND's status,
# 124 on timeout (QEMU is killed) and 125 when the VM failed before COMMAND ended.
#
# Everything fetched or built is cached under $QUBES_TESTVM_CACHE
# (default /var/cache/qubes-ctl-testvm): the root image (~2 min to build once), the kernel
# and, for --xen, Debian 12's QEMU 7.2 unpacked beside the installed QEMU (nothing is
# installed): QEMU >= 9.1's TCG mis-reports control-register reads of nested guests, so
# PVH/HVM domUs of a nested Xen halt there. The installed QEMU runs the plain (non-Xen) VM.
# The Debian mirror is the first one in this machine's apt sources.
set -euo pipefail

XEN=0 TIMEOUT=900 MEM="" SCRATCH=16G VERBOSE=0 SHARE="" SCRATCH_FROM=""
usage() { sed -n '2,5p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --xen) XEN=1 ;;
    --timeout) TIMEOUT=${2:?}; shift ;;
    --mem) MEM=${2:?}; shift ;;
    --scratch) SCRATCH=${2:?}; shift ;;
    --scratch-from) SCRATCH_FROM=$(cd "${2:?}" && pwd) || exit 2; shift ;;
    --share) SHARE=$(cd "${2:?}" && pwd) || exit 2; shift ;;
    --verbose|-v) VERBOSE=1 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "testvm: unknown option $1" >&2; usage ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "testvm: no COMMAND given (after --)" >&2; usage; }

die() { echo "testvm: $*" >&2; exit 125; }
log() { echo "testvm: $*" >&2; }
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, loop-free image building, apt-get download)"

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QUBES_TESTVM_CACHE:-/var/cache/qubes-ctl-testvm}
SUITE=bookworm
# Bump when the root's contents change: a new root is built next to the old one.
ROOT_REV=4
# The libxen* runtime libraries are named for the userspace blkif backend, which links them;
# librados2/librbd1 because qubes-ctl links them for the rbd pool driver; lvm2,
# thin-provisioning-tools and liblvm2cmd for the lvm_thin driver's tests (tests/lvm_thin.rs);
# fio for the Xen disk benchmark (benches/xen/blkif_bench.sh).
ROOT_PKGS="xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils qemu-utils kmod iproute2
  e2fsprogs util-linux procps busybox-static libxenstore4 libxengnttab1 libxenevtchn1
  libxentoollog1 librados2 librbd1 lvm2 thin-provisioning-tools liblvm2cmd2.03 fio"
ROOT_PKGS=$(echo $ROOT_PKGS | tr ' ' ',')

for t in mmdebstrap mke2fs apt-get dpkg cpio gzip depmod modprobe qemu-system-x86_64 busybox timeout; do
  command -v "$t" >/dev/null || die "$t is missing: run scripts/install-deps.sh"
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
# One builder at a time; running VMs only read the cache.
flock 9

apt_mirror() {
  grep -rhoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | awk '{print $2}' | grep -v -- '-security' | head -n1 | sed 's:/*$::' || true
}

# ---- the kernel: Debian 12's current 6.1 ABI (as linux-image-amd64 depends on it) ----
KPKG=$(apt-cache depends "linux-image-amd64/$SUITE" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || die "cannot tell Debian's kernel package (apt-cache depends linux-image-amd64): run apt-get update"
KV=${KPKG#linux-image-}
KEY=$(printf '%s\n' "$ROOT_REV" "$ROOT_PKGS" "$KPKG" | sha256sum | cut -c1-12)
RD=$CACHE/root-$KEY   # root.img, vmlinuz, xen.elf, initrd.cpio.gz

build_root() {
  local mirror tmp tree
  mirror=$(apt_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list{,.d}"
  # Under the lock; a finished mmdebstrap tree is reused if a later step failed.
  tmp=$CACHE/build-$KEY
  tree=$tmp/tree
  local t0=$SECONDS
  if [ ! -f "$tmp/mmdebstrap.done" ]; then
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "building the VM root (once; cached in $RD): mmdebstrap $SUITE from $mirror"
  mmdebstrap --quiet --variant=minbase --include="$ROOT_PKGS" \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$SUITE" "$tree" "deb $mirror $SUITE main" "deb $mirror $SUITE-updates main" \
    >"$tmp/mmdebstrap.log" 2>&1 || { tail -n 30 "$tmp/mmdebstrap.log" >&2; die "mmdebstrap failed (log above)"; }
  touch "$tmp/mmdebstrap.done"
  fi
  rm -f "$tmp"/linux-image-*.deb
  (cd "$tmp" && apt-get download -q "$KPKG" >"$tmp/download.log" 2>&1) \
    || { cat "$tmp/download.log" >&2; die "apt-get download $KPKG failed"; }
  # Not dpkg -x: it would replace merged-/usr's /lib symlink with a directory.
  dpkg-deb --fsys-tarfile "$tmp"/linux-image-*.deb | tar -x --keep-directory-symlink -C "$tree"
  [ -L "$tree/lib" ] || [ ! -L "$tree/usr/lib" ] || die "unpacking the kernel broke the root's /lib"
  rm -f "$tmp"/linux-image-*.deb
  depmod -b "$tree" "$KV"
  mkdir -p "$tree"/src "$tree"/scratch "$tree"/opt/qubes-ctl
  echo testvm > "$tree/etc/hostname"
  # libxl needs this directory (domid history lock); xl.conf defaults are fine.
  mkdir -p "$tree"/var/log/xen/console "$tree"/var/lib/xen
  cp "$tree/boot/vmlinuz-$KV" "$tmp/vmlinuz"
  local xgz
  xgz=$(ls "$tree"/boot/xen-4.17*-amd64.gz 2>/dev/null | head -n1)
  [ -n "$xgz" ] || die "no /boot/xen-4.17*-amd64.gz in the root (xen-hypervisor-4.17-amd64)"
  # QEMU's multiboot loader needs the uncompressed (32-bit ELF) hypervisor.
  zcat "$xgz" > "$tmp/xen.elf"
  build_initrd "$tree" "$tmp/initrd.cpio.gz"
  local size_mb
  size_mb=$(( $(du -sm "$tree" | cut -f1) * 13 / 10 + 512 ))
  mke2fs -q -F -t ext4 -L testvm-root -d "$tree" "$tmp/root.img" "${size_mb}M" \
    || die "mke2fs -d of the root failed"
  rm -rf "$tree"
  rm -rf "$RD"; mv "$tmp" "$RD"
  log "root built in $((SECONDS - t0)) s"
}

# A tiny initramfs: busybox and the modules needed to mount the virtio root, then
# switch_root to the harness init that the per-run archive brings.
build_initrd() {
  local tree=$1 out=$2 ir
  ir=$(dirname "$out")/initrd
  mkdir -p "$ir"/{bin,dev,proc,sys,newroot,mods}
  cp "$(command -v busybox)" "$ir/bin/busybox"
  for a in sh mount umount insmod mkdir cat sleep switch_root cp echo ls; do ln -sf busybox "$ir/bin/$a"; done
  : > "$ir/mods/order"
  for m in virtio_pci virtio_blk crc32c_generic ext4; do
    modprobe -d "$tree" -S "$KV" --show-depends "$m" 2>/dev/null
  done | awk '$1=="insmod"{print $2}' | while read -r ko; do
      local b; b=$(basename "$ko")
      grep -qx "$b" "$ir/mods/order" && continue
      cp "$ko" "$ir/mods/$b"; echo "$b" >> "$ir/mods/order"
    done
  [ -s "$ir/mods/order" ] || die "no modules found for the initramfs (modprobe --show-depends in $tree)"
  cat > "$ir/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /newroot || { echo "TESTVM-FATAL: cannot mount the root disk /dev/vda"; echo o > /proc/sysrq-trigger; }
mount -t tmpfs -o mode=755 run /newroot/run
cp -a /testvm /newroot/run/testvm
mount --move /dev /newroot/dev; mount --move /proc /newroot/proc; mount --move /sys /newroot/sys
exec switch_root /newroot /bin/sh /run/testvm/init
EOF
  chmod +x "$ir/init"
  (cd "$ir" && find . | cpio -R 0:0 -H newc -o 2>/dev/null | gzip -1) > "$out"
  rm -rf "$ir"
}

Q72=$CACHE/qemu72
get_qemu72() {
  local tmp=$CACHE/qemu72.$$
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "fetching Debian 12's QEMU 7.2 (once; unpacked in $Q72, nothing installed)"
  (cd "$tmp" && apt-get download -q "qemu-system-x86/$SUITE" "qemu-system-common/$SUITE" "qemu-system-data/$SUITE" \
    >"$tmp/download.log" 2>&1) || { cat "$tmp/download.log" >&2; die "apt-get download of QEMU 7.2 failed"; }
  for f in "$tmp"/*.deb; do dpkg -x "$f" "$tmp/root"; done
  rm -f "$tmp"/*.deb
  rm -rf "$Q72"; mv "$tmp" "$Q72"
}

[ -f "$RD/root.img" ] && [ -f "$RD/initrd.cpio.gz" ] || build_root
if [ $XEN = 1 ]; then
  [ -x "$Q72/root/usr/bin/qemu-system-x86_64" ] || get_qemu72
  missing=$(ldd "$Q72/root/usr/bin/qemu-system-x86_64" | awk '/not found/{print $1}' | tr '\n' ' ')
  [ -z "$missing" ] || die "QEMU 7.2 ($Q72) needs libraries this host lacks: $missing (apt-get install them)"
fi
flock -u 9

# ---- this run ----
BIN=${QUBES_CTL_BIN:-$REPO/target/release/qubes-ctl}
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release -p qubes-ctl (or set QUBES_CTL_BIN)"
BINDIR=$(cd "$(dirname "$BIN")" && pwd)
RUN=$(mktemp -d /tmp/testvm.XXXXXX)
QPID=""
cleanup() { [ -n "$QPID" ] && kill "$QPID" 2>/dev/null; rm -rf "$RUN"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RUN/arch/testvm"
{
  echo '#!/bin/sh'
  echo 'exec 0</dev/null 2>&1'
  printf '%q ' "$@"; echo
} > "$RUN/arch/testvm/cmd"
# Plain values only: the init sources this file.
cat > "$RUN/arch/testvm/env" <<EOF
TESTVM_XEN=$XEN
TESTVM_SHARE=$([ -n "$SHARE" ] && echo 1 || echo 0)
QUBES_CTL_BIN=/opt/qubes-ctl/$(basename "$BIN")
EOF
cat > "$RUN/arch/testvm/init" <<'EOF'
#!/bin/sh
# The harness init (PID 1, no systemd): prepare, run the command, power off.
export PATH=/opt/qubes-ctl:/usr/lib/xen-4.17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
. /run/testvm/env
export QUBES_CTL_BIN
up() { cut -d' ' -f1 /proc/uptime; }
off() { sync; busybox poweroff -f; echo o > /proc/sysrq-trigger; sleep 60; }
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm; mount -t tmpfs tmpfs /tmp
# udev would make these; Xen's hotplug scripts lock through /dev/stdin.
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mount -o remount,rw / 2>/dev/null
hostname testvm
modprobe -a 9p 9pnet_virtio loop dm_mod dm_thin_pool 2>/dev/null
modprobe nbd nbds_max=32 2>/dev/null
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 src /src ||
   ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 bin /opt/qubes-ctl; then
  echo "TESTVM-FATAL: cannot mount the 9p shares"; off
fi
if [ "$TESTVM_SHARE" = 1 ]; then
  mkdir -p /share
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 share /share \
    || { echo "TESTVM-FATAL: cannot mount the --share directory"; off; }
fi
if [ -b /dev/vdb ]; then
  { [ "${TESTVM_SCRATCH_READY:-0}" = 1 ] || mke2fs -q -t ext4 -E lazy_itable_init=1,nodiscard /dev/vdb; } && mount /dev/vdb /scratch \
    || { echo "TESTVM-FATAL: cannot format/mount the scratch disk"; off; }
  export QUBES_CTL_ROOT=/scratch/qubes-ctl
fi
if [ "$TESTVM_XEN" = 1 ]; then
  modprobe -a xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc xen-blkback xen-netback 2>/dev/null
  mount -t xenfs xenfs /proc/xen || { echo "TESTVM-FATAL: cannot mount xenfs (not running on Xen?)"; off; }
  mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console
  xenstored --pid-file /run/xenstored.pid || { echo "TESTVM-FATAL: xenstored failed"; off; }
  xen-init-dom0 >/run/xen-init-dom0.log 2>&1 || { cat /run/xen-init-dom0.log; echo "TESTVM-FATAL: xen-init-dom0 failed"; off; }
  xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
    || { echo "TESTVM-FATAL: xenconsoled failed"; off; }
fi
echo "TESTVM-READY uptime=$(up)"
cd /src
echo "==== TESTVM COMMAND BEGIN ===="
/bin/sh /run/testvm/cmd
rc=$?
echo "==== TESTVM COMMAND END status=$rc uptime=$(up) ===="
off
EOF
truncate -s "$SCRATCH" "$RUN/scratch.img"
if [ -n "$SCRATCH_FROM" ]; then
  mke2fs -q -F -t ext4 -E lazy_itable_init=1,nodiscard -L scratch -d "$SCRATCH_FROM" "$RUN/scratch.img" \
    || die "mke2fs -d $SCRATCH_FROM for the scratch disk failed"
  echo "TESTVM_SCRATCH_READY=1" >> "$RUN/arch/testvm/env"
fi
(cd "$RUN/arch" && find . | cpio -R 0:0 -H newc -o 2>/dev/null | gzip -1) > "$RUN/run.cpio.gz"
# The kernel unpacks concatenated archives in order: the cached initramfs, then this run's.
cat "$RD/initrd.cpio.gz" "$RUN/run.cpio.gz" > "$RUN/initrd"

# $QUBES_TESTVM_TCG_THREAD=single runs both vCPUs in one host thread (QEMU's default is one
# thread per vCPU): a way to tell races of multi-threaded TCG from other faults.
# $QUBES_TESTVM_SMP: the VM's vCPUs (default 2; with --xen, Xen's physical CPUs).
COMMON=(-accel "tcg,thread=${QUBES_TESTVM_TCG_THREAD:-multi}" -smp "${QUBES_TESTVM_SMP:-2}" -nographic -no-reboot -monitor none -serial stdio -nic none
  -drive "file=$RD/root.img,format=raw,if=virtio,snapshot=on"
  -drive "file=$RUN/scratch.img,format=raw,if=virtio,cache=unsafe,discard=unmap"
  -virtfs "local,path=$REPO,mount_tag=src,security_model=none,readonly=on"
  -virtfs "local,path=$BINDIR,mount_tag=bin,security_model=none,readonly=on")
[ -z "$SHARE" ] || COMMON+=(-virtfs "local,path=$SHARE,mount_tag=share,security_model=none,readonly=on")
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss its
# ticks and panic at boot ("IO-APIC + timer doesn't work"); QEMU's timer is known good.
KARGS="quiet loglevel=4 panic=-1 no_timer_check"
if [ $XEN = 1 ]; then
  MEM=${MEM:-3072}
  DOM0=$(( MEM / 3 )); [ $DOM0 -lt 768 ] && DOM0=768
  export QEMU_MODULE_DIR=$Q72/root/usr/lib/x86_64-linux-gnu/qemu
  QEMU=("$Q72/root/usr/bin/qemu-system-x86_64" -L "$Q72/root/usr/share/qemu" -L /usr/share/seabios -L /usr/share/qemu)
  # +svm,+npt: Debian's Xen has no shadow paging, PVH/HVM domUs need HAP.
  # $QUBES_TESTVM_CPU replaces the CPU model, $QUBES_TESTVM_XEN_ARGS is added to Xen's
  # command line (for trying what makes nested PVH guests reliable: tests/xen/domains.rs).
  QEMU+=(-cpu "${QUBES_TESTVM_CPU:-qemu64,+svm,+npt}" -m "$MEM" -kernel "$RD/xen.elf"
    -append "console=com1 com1=115200,8n1 dom0_mem=${DOM0}M,max:${DOM0}M dom0_max_vcpus=1 noreboot console_timestamps=boot ${QUBES_TESTVM_XEN_ARGS:-}"
    -initrd "$RD/vmlinuz console=hvc0 $KARGS rdinit=/init,$RUN/initrd")
else
  MEM=${MEM:-2048}
  QEMU=(qemu-system-x86_64 -cpu max -m "$MEM" -kernel "$RD/vmlinuz" -initrd "$RUN/initrd"
    -append "console=ttyS0 $KARGS rdinit=/init")
fi

# The console: boot lines go to the log (shown on failure or with --verbose), the
# command's output between the markers to stdout.
CONSOLE=$RUN/console.log
STATUS=$RUN/status
T0=$SECONDS
mkfifo "$RUN/fifo"
(
  inside=0
  while IFS= read -r line; do
    line=${line//$'\r'/}
    printf '%s\n' "$line" >> "$CONSOLE"
    case "$line" in
      *"==== TESTVM COMMAND BEGIN ===="*) inside=1; echo "$SECONDS" > "$RUN/began"; continue ;;
      *"==== TESTVM COMMAND END status="*)
        inside=0; s=${line#*status=}; echo "${s%% *}" > "$STATUS"; continue ;;
      *TESTVM-FATAL*) echo "$line" > "$RUN/fatal" ;;
    esac
    if [ $inside = 1 ] || [ $VERBOSE = 1 ]; then printf '%s\n' "$line"; fi
  done
) < "$RUN/fifo" &
RPID=$!
"${QEMU[@]}" "${COMMON[@]}" </dev/null >"$RUN/fifo" 2>"$RUN/qemu.err" &
QPID=$!
# The hard timeout; QEMU also ends when the VM powers off after the command.
while kill -0 "$QPID" 2>/dev/null; do
  if [ -s "$STATUS" ]; then
    # Give the guest a moment to power off by itself, then stop QEMU.
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
    break
  fi
  if [ -s "$RUN/fatal" ]; then sleep 2; break; fi
  if [ $((SECONDS - T0)) -ge "$TIMEOUT" ]; then
    kill "$QPID" 2>/dev/null || true; sleep 1; kill -9 "$QPID" 2>/dev/null || true
    QPID=""
    wait "$RPID" 2>/dev/null || true
    log "TIMEOUT after ${TIMEOUT}s (QEMU killed); last console lines:"
    tail -n 40 "$CONSOLE" >&2
    exit 124
  fi
  sleep 0.5
done
kill "$QPID" 2>/dev/null || true
wait "$QPID" 2>/dev/null || true
QPID=""
wait "$RPID" 2>/dev/null || true
if [ -s "$STATUS" ]; then
  rc=$(cat "$STATUS")
  boot=$(( $(cat "$RUN/began") - T0 ))
  log "$([ $XEN = 1 ] && echo "Xen dom0" || echo VM) ready in ${boot}s; command exited $rc after $((SECONDS - T0))s in all"
  exit "$rc"
fi
log "the VM ended before the command finished$( [ -s "$RUN/fatal" ] && echo ": $(cat "$RUN/fatal")" )"
[ -s "$RUN/qemu.err" ] && { log "QEMU said:"; cat "$RUN/qemu.err" >&2; }
log "last console lines:"; tail -n 40 "$CONSOLE" >&2
exit 125
