//! The `rbd` driver's NBD export against QEMU's own rbd driver, on one ceph-micro
//! cluster in one run: fio's nbd engine against (a) the daemon's export of a qube's
//! private volume (an RBD image) and (b) `qemu-nbd --image-opts driver=rbd,...` on the
//! same image once the qube is shut down (the daemon holds the image's exclusive lock
//! while the qube runs). Both use librbd's default cache (writethrough until the first
//! flush, then writeback; qemu-nbd's default cache mode asks for the same). Rows:
//! sequential 1 MiB write and read, random 4 KiB write and read at queue depth 1 and 8.
//!
//! Then clone-to-usable: an AppVM start (`qube start --hypervisor none`: the root
//! recreated as a clone of the template's snapshot, private and volatile readied, the
//! exports up) against `rbd clone` of the same snapshot from the CLI.
//!
//! `cargo bench -p e2e-tests --bench rbd_fio` (run `cargo build --release -p qubes-ctl`
//! first). `BENCH_MIB` (default 256) sets the area; `FIO_SECS` (default 8) the random
//! rows' time.

use std::process::Command;
use std::time::Instant;

use e2e_tests::{ceph_micro, rbd_root};
use serde_json::Value;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fio job against an NBD URI; MB/s (read + write).
fn fio(uri: &str, args: &[&str]) -> f64 {
    let out = Command::new("fio")
        .args(["--name=b", "--ioengine=nbd", "--minimal"])
        .arg(format!("--uri={uri}"))
        .args(args)
        .output()
        .expect("running fio (apt-get install fio)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {args:?} on {uri}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Vec<&str> = text.trim().split(';').collect();
    // Terse v3: field 7 is read KiB/s, 48 write KiB/s.
    let kib: f64 = f[6].parse::<f64>().unwrap() + f[47].parse::<f64>().unwrap();
    kib * 1024.0 / 1e6
}

fn rows(uri: &str, mib: u64, secs: u64) -> Vec<(String, f64)> {
    let size = format!("--size={mib}M");
    let rt = format!("--runtime={secs}");
    let mut v = Vec::new();
    for (name, extra) in [
        ("seq-1M-write", vec!["--rw=write", "--bs=1M", "--iodepth=4"]),
        ("seq-1M-read", vec!["--rw=read", "--bs=1M", "--iodepth=4"]),
        (
            "rand-4K-write-qd1",
            vec!["--rw=randwrite", "--bs=4k", "--iodepth=1", "--time_based"],
        ),
        (
            "rand-4K-read-qd1",
            vec!["--rw=randread", "--bs=4k", "--iodepth=1", "--time_based"],
        ),
        (
            "rand-4K-write-qd8",
            vec!["--rw=randwrite", "--bs=4k", "--iodepth=8", "--time_based"],
        ),
        (
            "rand-4K-read-qd8",
            vec!["--rw=randread", "--bs=4k", "--iodepth=8", "--time_based"],
        ),
    ] {
        let mut args: Vec<&str> = vec![&size];
        args.extend(extra.iter().copied());
        if name.starts_with("rand") {
            args.push(&rt);
        }
        // Every write row ends with a flush and counts it: librbd's writeback cache
        // would otherwise absorb a row's writes and bill the next row for them.
        if name.contains("write") {
            args.push("--end_fsync=1");
        }
        v.push((name.to_string(), fio(uri, &args)));
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` run of benches does not.
    if !std::env::args().any(|a| a == "--bench") {
        println!("rbd_fio: run with `cargo bench -p e2e-tests --bench rbd_fio`");
        return;
    }
    let mib = env_u64("BENCH_MIB", 256);
    let secs = env_u64("FIO_SECS", 8);
    let c = ceph_micro::ceph();
    let ns = ceph_micro::fresh_namespace();
    let ctl = rbd_root(&ns, "bench");
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, e2e_tests::pattern(1, 64 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["qube", "create", "b", "--template", "tpl"]);

    // (a) the daemon's export.
    let started: Value = ctl.json(&["qube", "start", "b", "--hypervisor", "none"]);
    let uri = started["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "private")
        .expect("a private volume")["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let ours = rows(&uri, mib, secs);
    ctl.ok(&["qube", "shutdown", "b"]);

    // (b) qemu-nbd through QEMU's rbd driver, on the same image at rest.
    let image = "qubes_b~private";
    let sock = ctl.root.join("qemu-nbd.sock");
    let opts = format!(
        "driver=rbd,pool={},namespace={ns},image={image},conf={},user={}",
        c.pool,
        c.conf.display(),
        ceph_micro::CEPH_ID
    );
    let mut qemu = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "--image-opts", &opts])
        .arg(format!("--socket={}", sock.display()))
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils qemu-block-extra)");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed().as_secs() < 60,
            "qemu-nbd did not open {image} in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let qemu_uri = format!("nbd+unix:///?socket={}", sock.display());
    let theirs = rows(&qemu_uri, mib, secs);
    let _ = qemu.kill();
    let _ = qemu.wait();

    println!("rbd_fio: fio nbd engine, {mib} MiB area, random rows {secs} s each, MB/s");
    println!(
        "{:<20} {:>12} {:>12} {:>8}",
        "row", "ours(rbd)", "qemu-nbd", "ratio"
    );
    for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
        println!(
            "{name:<20} {a:>12.1} {b:>12.1} {:>8.2}",
            if *b > 0.0 { a / b } else { 0.0 }
        );
    }

    // Clone-to-usable: an AppVM start against `rbd clone` of the template's snapshot.
    let mut starts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        ctl.ok(&["qube", "start", "b", "--hypervisor", "none"]);
        starts.push(t.elapsed().as_secs_f64() * 1e3);
        ctl.ok(&["qube", "shutdown", "b"]);
    }
    // The driver removes its snapshot once the clone exists (clone v2 keeps it in the
    // trash); the CLI clones from a snapshot of the same image made for it.
    let tpl_root = format!("{}/{ns}/qubes_tpl~root", c.pool);
    let snapped = Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args(["snap", "create", &format!("{tpl_root}@bench")])
        .status()
        .unwrap()
        .success();
    let mut clones = Vec::new();
    if snapped {
        let snap = "bench";
        for i in 0..5 {
            let t = Instant::now();
            let st = Command::new("rbd")
                .arg("-c")
                .arg(&c.conf)
                .args(["clone", "--rbd-default-clone-format", "2"])
                .arg(format!("{tpl_root}@{snap}"))
                .arg(format!("{}/{ns}/bench-clone-{i}", c.pool))
                .status()
                .unwrap();
            clones.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(st.success(), "rbd clone");
        }
    }
    println!(
        "clone-to-usable (median of 5): qube start (AppVM, --hypervisor none) {:.0} ms, `rbd clone` CLI {}",
        median(starts),
        if clones.is_empty() {
            format!("(rbd snap create {tpl_root}@bench failed)")
        } else {
            format!("{:.0} ms", median(clones))
        }
    );
    ctl.stop_daemon();
}
