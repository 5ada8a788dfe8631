#!/bin/sh
# Installs qubes-ctl as a system service: the binary, the systemd unit (Type=notify),
# shell completions and man pages generated from the binary itself. Run as root from the
# repository after `cargo build --release -p qubes-ctl`:  scripts/install-service.sh
# PREFIX (default /usr/local) and DESTDIR (for packaging) are honoured.
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
BIN=target/release/qubes-ctl
[ -x "$BIN" ] || { echo "$BIN is missing: run cargo build --release -p qubes-ctl first" >&2; exit 1; }

install -D -m 0755 "$BIN" "$DESTDIR$PREFIX/bin/qubes-ctl"
mkdir -p "$DESTDIR/etc/systemd/system"
sed "s|/usr/local/bin/qubes-ctl|$PREFIX/bin/qubes-ctl|" qubes-ctl/systemd/qubes-ctl.service \
    > "$DESTDIR/etc/systemd/system/qubes-ctl.service"
chmod 0644 "$DESTDIR/etc/systemd/system/qubes-ctl.service"

mkdir -p "$DESTDIR$PREFIX/share/bash-completion/completions" \
         "$DESTDIR$PREFIX/share/zsh/site-functions" \
         "$DESTDIR$PREFIX/share/fish/vendor_completions.d"
"$BIN" generate completions bash > "$DESTDIR$PREFIX/share/bash-completion/completions/qubes-ctl"
"$BIN" generate completions zsh > "$DESTDIR$PREFIX/share/zsh/site-functions/_qubes-ctl"
"$BIN" generate completions fish > "$DESTDIR$PREFIX/share/fish/vendor_completions.d/qubes-ctl.fish"
"$BIN" generate man "$DESTDIR$PREFIX/share/man/man1"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed; start it with: systemctl enable --now qubes-ctl"
fi
