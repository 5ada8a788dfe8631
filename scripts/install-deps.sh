#!/usr/bin/env bash
# Installs the host packages the build and the tests use. Idempotent; safe to re-run.
# The Debian mirror is read from this machine's own apt sources (never hard-coded), and
# bookworm-backports is enabled on that same mirror for QEMU 10 and e2fsprogs 1.47.2.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-deps: run as root (apt-get)" >&2; exit 1; }

stamp=/var/lib/qubes-ctl-deps.v5
if [ -f "$stamp" ] && [ "${1:-}" != "--force" ]; then exit 0; fi

mirror=$(grep -rhoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
mirror=${mirror%/}
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if [ -n "$mirror" ] && ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/backports.sources <<SRC
Types: deb
URIs: ${mirror}
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# qemu-block-extra: QEMU's rbd driver (the rbd benchmark's reference). ceph-*: the one-node
# cluster of scripts/ceph-micro.sh; librbd-dev/librados-dev: storage/rbd-sys's bindgen.
# distribution-gpg-keys: Fedora's signing keys for recipes/fedora (GPG-checked builds).
apt-get install -y -qq -t "${codename}-backports" \
  qemu-system-x86 qemu-utils qemu-block-extra e2fsprogs distribution-gpg-keys >/dev/null
apt-get install -y -qq \
  libnbd-bin nbdkit fio python3-libnbd \
  mmdebstrap debian-archive-keyring fakeroot \
  rpm createrepo-c dnf gnupg \
  xfsprogs btrfs-progs zstd util-linux \
  clang libclang-dev libxen-dev liblvm2-dev pkg-config \
  linux-image-amd64 busybox-static cpio socat tmux kmod \
  ceph-mon ceph-osd ceph-mgr ceph-common librbd-dev librados-dev >/dev/null
touch "$stamp"
