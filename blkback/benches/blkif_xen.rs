//! The Xen disk paths side by side, on real Xen: `scripts/testvm.sh --xen` boots Xen 4.17
//! with a Debian dom0 under QEMU TCG and runs `benches/xen/blkif_bench.sh` there, which
//! attaches four disks (our userspace blkif backend on a thin volume with persistent
//! grants and on a second one with grant copy only,
//! the kernel's xen-blkback on a loop device over a raw file, the daemon's NBD export
//! through the kernel NBD client and xen-blkback) first to dom0 itself (dd rows and fio
//! random rows), then to a PV domU that runs fio (the real case: the frontend on its
//! own vCPU). About 23 min on a host at load 17.
//!
//!   cargo build --release -p qubes-ctl
//!   cargo build --release -p blkback --example blkif_serve
//!   cargo bench -p blkback --bench blkif_xen
//!
//! Not part of `cargo test` (a nested Xen boot takes minutes). `BENCH_MIB` sets the area.

use std::path::Path;
use std::process::Command;

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` run of benches does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("blkif_xen: run with `cargo bench -p blkback --bench blkif_xen`");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for need in [
        "target/release/examples/blkif_serve",
        "target/release/qubes-ctl",
    ] {
        assert!(
            repo.join(need).exists(),
            "{need} is missing: cargo build --release -p qubes-ctl && cargo build --release -p blkback --example blkif_serve"
        );
    }
    let mib = std::env::var("BENCH_MIB").unwrap_or_else(|_| "64".into());
    let out = Command::new(repo.join("scripts/testvm.sh"))
        .args(["--xen", "--timeout", "2700", "--"])
        .args(["env", &format!("BENCH_MIB={mib}")])
        .args(["sh", "blkback/benches/xen/blkif_bench.sh"])
        .current_dir(repo)
        .output()
        .expect("running scripts/testvm.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text.lines().filter(|l| l.starts_with("BENCH")) {
        println!("{l}");
    }
    assert!(
        out.status.success() && text.contains("BENCH-OK"),
        "the benchmark failed ({}):\n{text}",
        out.status
    );
}
