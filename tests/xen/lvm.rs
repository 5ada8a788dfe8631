//! `QUBES_XEN_TEST_ONLY=lvm` (by hand): an `lvm_thin` pool in dom0 (a loop-backed VG,
//! device-mapper of dom0's kernel) runs a Xen qube two ways:
//! - `QUBES_XEN_DISKS=phy`, as Qubes gives LVM volumes: each volume's own LV
//!   (`/dev/VG/vm-lw-private-snap`, ...) is a `backendtype=phy` disk of dom0's kernel
//!   blkback (backend nodes under `backend/vbd`, none under our `qubes-vbd`);
//! - the default userspace blkif backend, which serves the same LVs from the pool.
//!
//! Each boot writes its marker to /rw; after each shutdown the marker is in lw:private,
//! no `-snap` LV is left and the pool verifies clean.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use e2e_tests::Ctl;

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn lv_names(vg: &str) -> Vec<String> {
    sh(&format!("lvs --noheadings -o lv_name {vg}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn private_marker(lc: &Ctl, qube: &str) -> Option<String> {
    let img = Path::new("/scratch/lw-private.img");
    lc.ok(&[
        "volume",
        "export",
        &format!("{qube}:private"),
        img.to_str().unwrap(),
    ]);
    let m = super::ext4_cat(img, "/marker");
    let _ = std::fs::remove_file(img);
    m
}

fn after_shutdown(lc: &Ctl, qube: &str, marker: &str) {
    assert_eq!(lc.state(qube), "halted");
    assert_eq!(private_marker(lc, qube).as_deref(), Some(marker));
    let lvs = lv_names("xenvg");
    assert!(!lvs.iter().any(|l| l.ends_with("-snap")), "{lvs:?}");
    assert_eq!(lc.json(&["pool", "verify"])["clean"], true);
}

pub fn lvm_thin_on_xen(ctl: &Ctl) {
    let t = Instant::now();
    // No udev in the harness: LVM makes the device nodes itself; only loop devices hold
    // PVs (as tests/lvm_thin.rs sets it up).
    std::fs::write(
        "/etc/lvm/lvmlocal.conf",
        "activation {\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}\ndevices {\n obtain_device_list_from_udev = 0\n global_filter = [ \"a|^/dev/loop|\", \"r|.*|\" ]\n}\n",
    )
    .unwrap();
    sh(
        "truncate -s 8G /scratch/xenvg.img && d=$(losetup -f --show /scratch/xenvg.img) && \
        vgcreate -q xenvg $d && lvcreate -q --type thin-pool -L 6G -n pool xenvg",
    );
    let lc = Ctl::at(Path::new("/scratch/lvm-root"));
    lc.ok(&[
        "pool",
        "init",
        "--driver",
        "lvm_thin",
        "--volume-group",
        "xenvg",
        "--thin-pool",
        "pool",
    ]);
    ctl.ok(&[
        "volume",
        "export",
        "work:private",
        "/scratch/work-private.img",
    ]);
    let t_import = Instant::now();
    // The host put the package in the share (QUBES_XEN_TEST_ONLY=lvm).
    lc.ok(&["template", "import", "/share/debian.qtpl"]);
    println!(
        "template import into lvm_thin in dom0: {:.0?}",
        t_import.elapsed()
    );
    lc.ok(&[
        "qube",
        "create",
        "lw",
        "--class",
        "AppVM",
        "--template",
        "debian-12-minimal",
    ]);
    lc.ok(&[
        "volume",
        "import",
        "lw:private",
        "/scratch/work-private.img",
    ]);
    lc.ok(&["qube", "prefs", "lw", "virt_mode", "pv"]);
    lc.ok(&["qube", "prefs", "lw", "kernelopts", "qtest.stay"]);
    let before = private_marker(&lc, "lw");
    println!(
        "lvm_thin pool in dom0 with the template and lw: {:.0?}",
        t.elapsed()
    );
    super::step("lvm-pool", t);

    // 1. QUBES_XEN_DISKS=phy: the daemon reads it, so it starts with it.
    let t = Instant::now();
    e2e_tests::run_ok(lc.cmd(&["daemon", "start"]).env("QUBES_XEN_DISKS", "phy"));
    let (r, _, took) = super::boot(&lc, "lw");
    assert!(r.contains("host=lw "), "{r}");
    let d = super::blkif::domid("lw");
    let vbds = super::blkif::list(&format!("/local/domain/0/backend/vbd/{d}"));
    assert_eq!(vbds.len(), 3, "dom0's blkback serves three disks: {vbds:?}");
    for v in &vbds {
        let params = super::blkif::read(&format!("/local/domain/0/backend/vbd/{d}/{v}/params"))
            .unwrap_or_default();
        assert!(params.starts_with("/dev/xenvg/vm-lw-"), "{v}: {params}");
    }
    assert_eq!(
        super::blkif::list(&format!("/local/domain/0/backend/qubes-vbd/{d}")),
        Vec::<String>::new(),
        "nothing from our userspace backend"
    );
    assert_eq!(super::attached_nbd_devices(), Vec::<String>::new());
    lc.ok(&["qube", "shutdown", "lw", "--timeout", "600"]);
    let first = match before.as_deref() {
        None => 1,
        Some(n) => n.parse::<u32>().unwrap() + 1,
    };
    after_shutdown(&lc, "lw", &first.to_string());
    println!(
        "lw on LVM with phy disks: boot {took:.0?}, whole {:.0?}",
        t.elapsed()
    );
    super::step("lvm-phy", t);

    // 2. The default: our blkif backend serving the LVs.
    let t = Instant::now();
    lc.ok(&["daemon", "stop"]);
    let (r, _, took) = super::boot(&lc, "lw");
    assert!(r.contains(&format!("rw={first} ")), "{r}");
    super::blkif::assert_served_by_blkif("lw");
    lc.ok(&["qube", "shutdown", "lw", "--timeout", "600"]);
    after_shutdown(&lc, "lw", &(first + 1).to_string());
    lc.ok(&["daemon", "stop"]);
    println!(
        "lw on LVM with blkif disks: boot {took:.0?}, whole {:.0?}",
        t.elapsed()
    );
    super::step("lvm-blkif", t);
}
