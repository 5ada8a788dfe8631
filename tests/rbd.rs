//! The `rbd` pool driver through the real CLI and daemons, on a ceph-micro cluster: two
//! roots (two machines) on one Ceph pool and namespace share templates and qubes, a qube
//! runs on one machine at a time (the refusal names the machine holding it), a SIGKILLed
//! daemon restarted on its machine breaks its own stale lock and serves the qube on with
//! its flushed writes, a clone chain deeper than 5 is flattened in the background, and
//! a Debian qube whose root, private and volatile are RBD images boots under QEMU.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{
    ceph_micro, debian_template_package, ext4_cat, pattern, rbd_root, uri_of, wait_for, Ctl,
};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io commands against an NBD export; fails the test if any does.
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c.arg(uri));
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmds:?} on {uri}: {out}"
    );
}

/// The whole content of an export (nbdcopy to a file).
fn read_export(uri: &str, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join("read-export.img");
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn template_from_image(ctl: &Ctl, name: &str, seed: u64) -> Vec<u8> {
    let img = ctl.root.join(format!("{name}.img"));
    let data = pattern(seed, 4 * MIB);
    std::fs::write(&img, &data).unwrap();
    ctl.ok(&[
        "template",
        "create",
        name,
        "--from-image",
        img.to_str().unwrap(),
    ]);
    data
}

fn kill9(pid: i32) {
    // SAFETY: plain kill(2) on a pid read from the daemon's pid file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // SAFETY: kill(pid, 0) only checks whether the process still exists.
    wait_for(
        "the killed daemon to exit",
        Duration::from_secs(30),
        || unsafe { libc::kill(pid, 0) != 0 },
    );
}

#[test]
fn two_machines_share_templates_and_a_qube_runs_on_one_at_a_time() {
    let t0 = Instant::now();
    let ns = ceph_micro::fresh_namespace();
    let a = rbd_root(&ns, "a");
    let b = rbd_root(&ns, "b");
    assert_eq!(b.json(&["pool", "info"])["driver"], "rbd");

    // A template made on A is B's too, and an AppVM of B's runs on it.
    let tpl = template_from_image(&a, "tpl", 1);
    let names: Vec<Value> = b.json(&["template", "list"]).as_array().unwrap().clone();
    assert!(
        names.iter().any(|t| t["name"] == "tpl"),
        "B does not list A's template: {names:?}"
    );
    b.ok(&["qube", "create", "app", "--template", "tpl"]);
    let app = b.json(&["qube", "start", "app", "--hypervisor", "none"]);
    let root = read_export(&uri_of(&app, "root"), &b.root);
    assert_eq!(
        &root[..tpl.len()],
        &tpl[..],
        "B's AppVM root is not A's template"
    );
    b.ok(&["qube", "shutdown", "app"]);

    // A qube running on A is refused on B, with the machine named and the way out said.
    a.ok(&["qube", "create", "work", "--template", "tpl"]);
    let work = a.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let private = uri_of(&work, "private");
    qemu_io(&private, &["write -P 0x5a 0 1M", "flush"]);
    let err = b.fails(&["qube", "start", "work", "--hypervisor", "none"]);
    assert!(
        err.contains("machine a"),
        "B's refusal does not name machine a: {err}"
    );
    assert!(err.contains("stop the qube there"), "no way out in: {err}");
    // B's attempt took nothing from A: its qube's volumes serve on.
    qemu_io(
        &private,
        &["read -P 0x5a 0 1M", "write -P 0x5b 1M 1M", "flush"],
    );
    let root = read_export(&uri_of(&work, "root"), &a.root);
    assert_eq!(&root[..tpl.len()], &tpl[..], "A's running root changed");
    assert_eq!(a.state("work"), "running");

    // Shut down on A, it starts on B with A's writes.
    a.ok(&["qube", "shutdown", "work"]);
    let on_b = b.json(&["qube", "start", "work", "--hypervisor", "none"]);
    qemu_io(
        &uri_of(&on_b, "private"),
        &["read -P 0x5a 0 1M", "read -P 0x5b 1M 1M"],
    );
    b.ok(&["qube", "shutdown", "work"]);

    // A's daemon SIGKILLed while the qube runs, after a flushed write.
    let work = a.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let private = uri_of(&work, "private");
    qemu_io(&private, &["write -P 0xa1 0 4M", "flush"]);
    kill9(a.daemon_pid());
    let err = b.fails(&["qube", "start", "work", "--hypervisor", "none"]);
    assert!(err.contains("machine a"), "{err}");
    let info = a.json(&["volume", "info", "work:private"]);
    assert_eq!(info["dirty"], true, "{info}");
    // Restarted on A (same machine, same root): it breaks its dead self's lock and
    // serves the dirty volume on, at the same socket, with the flushed bytes.
    let t = Instant::now();
    a.ok(&["daemon", "start"]);
    eprintln!("daemon restart after SIGKILL took {:?}", t.elapsed());
    assert_eq!(a.state("work"), "running");
    qemu_io(
        &private,
        &["read -P 0xa1 0 4M", "write -P 0xa2 4M 1M", "flush"],
    );
    // The live A holds it again: B is still refused.
    let err = b.fails(&["qube", "start", "work", "--hypervisor", "none"]);
    assert!(err.contains("machine a"), "{err}");
    a.ok(&["qube", "shutdown", "work"]);
    let on_b = b.json(&["qube", "start", "work", "--hypervisor", "none"]);
    qemu_io(
        &uri_of(&on_b, "private"),
        &["read -P 0xa1 0 4M", "read -P 0xa2 4M 1M"],
    );
    b.ok(&["qube", "shutdown", "work"]);
    for ctl in [&a, &b] {
        let v = ctl.json(&["pool", "verify"]);
        assert_eq!(v["clean"], true, "{v}");
    }
    eprintln!("two-machine test took {:?}", t0.elapsed());
}

/// `rbd info` of the volume `key`'s image in namespace `ns` (ceph-micro's admin user).
fn rbd_info(ns: &str, key: &str) -> Value {
    let c = ceph_micro::ceph();
    let image = format!("qubes_{}", key.replace('/', "~").replace('@', "="));
    let out = run(Command::new("rbd")
        .arg("-c")
        .arg(&c.conf)
        .args([
            "info",
            "--format",
            "json",
            "--pool",
            &c.pool,
            "--namespace",
            ns,
        ])
        .arg(&image));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rbd info {image}: {e}: {out}"))
}

/// Each start of a qube clones its private volume (`private@run`, a clone of the head it
/// replaces at stop), so six start/stop cycles make a chain of six clones: the sixth is
/// deeper than Cinder's 5 and is flattened in the background, while the guest's export
/// serves on with every byte.
#[test]
fn a_clone_chain_deeper_than_five_is_flattened_in_the_background() {
    let t0 = Instant::now();
    let ns = ceph_micro::fresh_namespace();
    let a = rbd_root(&ns, "solo");
    template_from_image(&a, "tpl", 2);
    a.ok(&["qube", "create", "deep", "--template", "tpl"]);
    a.ok(&["volume", "resize", "deep:private", "16M", "--allow-shrink"]);
    for cycle in 1..=6u8 {
        let started = a.json(&["qube", "start", "deep", "--hypervisor", "none"]);
        let uri = uri_of(&started, "private");
        // One MiB per cycle, each at its own offset: every layer of the chain holds data.
        let off = format!("{}M", cycle - 1);
        qemu_io(&uri, &[&format!("write -P {cycle} {off} 1M"), "flush"]);
        let run = rbd_info(&ns, "deep/private@run");
        if cycle < 6 {
            assert!(
                run.get("parent").is_some(),
                "a chain of {cycle} was flattened (the limit is 5): {run}"
            );
            a.ok(&["qube", "shutdown", "deep"]);
            continue;
        }
        // The sixth: flattened while the qube runs.
        let t = Instant::now();
        while rbd_info(&ns, "deep/private@run").get("parent").is_some() {
            if t.elapsed() > Duration::from_secs(120) {
                let log =
                    std::fs::read_to_string(a.root.join("run/daemon.log")).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("flatten") || l.contains("depth"))
                    .collect();
                panic!("the 6-deep clone is not flattened after 120 s; daemon log: {lines:#?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("flattened {:?} after the start", t.elapsed());
        let reads: Vec<String> = (1..=6u8)
            .map(|c| format!("read -P {c} {}M 1M", c - 1))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        qemu_io(&uri, &reads);
        qemu_io(&uri, &["write -P 7 6M 1M", "flush"]);
        a.ok(&["qube", "shutdown", "deep"]);
    }
    // The head is the flattened image now; a new start clones it afresh (depth 1).
    let head = rbd_info(&ns, "deep/private");
    assert!(head.get("parent").is_none(), "{head}");
    let started = a.json(&["qube", "start", "deep", "--hypervisor", "none"]);
    let reads: Vec<String> = (1..=7u8)
        .map(|c| format!("read -P {c} {}M 1M", c - 1))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&uri_of(&started, "private"), &reads);
    a.ok(&["qube", "shutdown", "deep"]);
    assert_eq!(a.json(&["pool", "verify"])["clean"], true);
    eprintln!("flatten test took {:?}", t0.elapsed());
}

/// The shared Debian template imported into the cluster; `work` on it boots under QEMU
/// from three RBD volumes served by the daemon over NBD (`qube run` autostarts it and
/// waits for its agent); what the guest writes to /rw is in work:private after the
/// shutdown, and its root was a layered clone of the template's.
#[test]
fn a_qube_boots_under_qemu_from_rbd_volumes() {
    let t0 = Instant::now();
    let ns = ceph_micro::fresh_namespace();
    let a = rbd_root(&ns, "boot");
    let pkg = debian_template_package();
    let t = Instant::now();
    a.ok(&["template", "import", pkg.to_str().unwrap(), "--name", "deb"]);
    eprintln!("template import into RBD took {:?}", t.elapsed());
    a.ok(&["qube", "create", "work", "--template", "deb"]);

    let t = Instant::now();
    let out = a.output(&[
        "qube",
        "run",
        "work",
        "--timeout",
        "1200",
        "--",
        "sh",
        "-c",
        "echo from-rbd > /rw/marker && sync && cat /etc/hostname && findmnt -no SOURCE /",
    ]);
    eprintln!("qube run (boot from RBD) took {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.console("work")
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("work"), "{stdout}");
    assert!(
        lines.next().is_some_and(|l| l.starts_with("/dev/vd")),
        "the root is a virtio disk (the NBD export of the RBD clone): {stdout}"
    );
    // While it runs, the root is an RBD clone of the template's image.
    let root = rbd_info(&ns, "work/root");
    assert!(
        root.get("parent").is_some(),
        "work's root is not a layered clone: {root}"
    );

    a.ok(&["qube", "shutdown", "work"]);
    assert_eq!(a.state("work"), "halted");
    let img = a.root.join("private.img");
    a.ok(&["volume", "export", "work:private", img.to_str().unwrap()]);
    assert_eq!(ext4_cat(&img, "/marker").as_deref(), Some("from-rbd"));
    assert_eq!(a.json(&["pool", "verify"])["clean"], true);
    a.stop_daemon();
    eprintln!("RBD boot test took {:?}", t0.elapsed());
}
