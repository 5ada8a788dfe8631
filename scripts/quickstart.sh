#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build the Debian minimal
# template from its recipe, create a qube on it and start it (QEMU here, Xen where present).
# Usage: sudo scripts/quickstart.sh [QUBE_NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
qube=${1:-work}
bash scripts/install-deps.sh
cargo build --release -p qubes-ctl -p guest-agent
ctl=${CARGO_TARGET_DIR:-target}/release/qubes-ctl
# The embedded default pool lives under the user's data directory
# (/var/lib/qubes-ctl for root); it is created on first use.
$ctl template build recipes/debian/minimal.toml --name debian-12-minimal
$ctl qube list | grep -q "^$qube " || $ctl qube create "$qube" --class AppVM --template debian-12-minimal --label blue
$ctl qube list | grep -q "^$qube .*running" || $ctl qube start "$qube"
$ctl qube list
echo "console: $ctl qube console $qube (Ctrl-] detaches)    run: $ctl qube run $qube -- cat /etc/hostname    shut down: $ctl qube shutdown $qube"
