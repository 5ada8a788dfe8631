//! The blkif backend with a real Xen guest: `scripts/testvm.sh --xen` boots Xen 4.17 with
//! a Debian dom0 under QEMU TCG; there `blkback/tests/xen/blkif_guest.sh` boots a PV domU
//! whose only disk is served by the `blkif_serve` example (built by `cargo test`), first
//! from a raw image, then from a thin pool volume, while the kernel's xen-blkback is
//! loaded. Checked: read, O_DIRECT write + fsync, read back and discard, byte for byte
//! against the image and the pool; the discard freed the pool's chunks (mapped bytes);
//! a clean 4 -> 5 -> 6 close at guest poweroff; a flushed write survives a SIGKILL of the
//! backend; no backend nodes, qemu-nbd or nbd device left. About 3.5 min (plus the
//! harness's one-time root image build).

use std::path::Path;
use std::process::Command;

#[test]
fn a_pv_guest_reads_writes_and_discards_through_the_userspace_backend() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let serve = repo.join("target/release/examples/blkif_serve");
    assert!(
        serve.exists(),
        "{} is missing: run `cargo test --release -p blkback` (it builds the example)",
        serve.display()
    );
    let out = Command::new(repo.join("scripts/testvm.sh"))
        .args(["--xen", "--timeout", "900", "--"])
        .args(["sh", "blkback/tests/xen/blkif_guest.sh"])
        .current_dir(repo)
        .output()
        .expect("running scripts/testvm.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("BLKIF-GUEST-OK"),
        "guest test failed ({}):\n{text}",
        out.status
    );
}
