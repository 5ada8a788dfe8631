#!/usr/bin/env bash
# The test command: installs what the tests need, then format check, clippy, all tests.
# Usage: sudo scripts/test.sh        (root: loop devices, mounts and apt are used)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (release: the storage property tests and the VM boots need the speed)"
cargo build --release -p qubes-ctl -p guest-agent
cargo test --workspace --release -- --test-threads=2
