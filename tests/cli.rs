//! Every CLI command end to end, without a VM: pool, templates from images, qubes of every
//! class, volumes (import/export/revert/resize/config/discard), and the exports a started
//! qube gets (`--hypervisor none`), driven through the real binary.

use std::process::Command;

use e2e_tests::{pattern, uri_of, Ctl};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn write_image(path: &std::path::Path, seed: u64, len: usize) -> Vec<u8> {
    let data = pattern(seed, len);
    std::fs::write(path, &data).unwrap();
    data
}

fn export(ctl: &Ctl, vol: &str) -> Vec<u8> {
    let out = ctl.root.join("export.img");
    ctl.ok(&["volume", "export", vol, out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

fn revisions(v: &Value) -> Vec<String> {
    v["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// qemu-io against an NBD URI: runs the given commands, asserts success.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let out = c.output().expect("qemu-io (install qemu-utils)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-io {cmds:?} on {uri}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {stdout}"
    );
    assert!(!stdout.contains("failed"), "qemu-io {cmds:?}: {stdout}");
    stdout
}

#[test]
fn pool_templates_qubes_and_volumes_end_to_end() {
    let ctl = Ctl::new();
    // Nothing yet: a clear error naming the fix.
    let err = ctl.fails(&["pool", "info"]);
    assert!(err.contains("pool init"), "{err}");

    let info = ctl.json(&["pool", "init", "--chunk-size", "64K", "--size", "4G"]);
    assert_eq!(info["chunk_size"], 64 * 1024);
    assert_eq!(ctl.json(&["pool", "info"])["capacity"], 4u64 << 30);
    let err = ctl.fails(&["pool", "init"]);
    assert!(err.contains("already exists"), "{err}");

    // A template from a raw image.
    let img = ctl.root.join("tpl.img");
    let tpl_data = write_image(&img, 1, 8 * MIB as usize);
    let t = ctl.json(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(t["name"], "tpl");
    let list = ctl.json(&["template", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let root_export = export(&ctl, "tpl:root");
    assert_eq!(
        &root_export[..tpl_data.len()],
        &tpl_data[..],
        "template root holds the image"
    );
    assert!(root_export[tpl_data.len()..].iter().all(|&b| b == 0));

    // Name validation.
    for bad in ["../evil", "a/b", "x\ny", "-rf", "", ".hidden"] {
        let err = ctl.fails(&["qube", "create", "--template", "tpl", "--", bad]);
        assert!(err.contains("name"), "{bad:?}: {err}");
    }
    let err = ctl.fails(&["qube", "create", "w", "--template", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");

    // An AppVM on it.
    let q = ctl.json(&[
        "qube",
        "create",
        "work",
        "--class",
        "AppVM",
        "--template",
        "tpl",
        "--label",
        "blue",
    ]);
    assert_eq!(q["class"], "AppVM");
    assert_eq!(q["label"], "blue");
    assert_eq!(q["state"], "halted");
    let vols = ctl.json(&["volume", "list", "work"]);
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root", "private", "volatile"]);
    assert_eq!(vols[0]["config"]["source"], "tpl:root");
    assert_eq!(vols[1]["size"], 2u64 << 30, "Qubes' default private size");
    assert_eq!(vols[2]["size"], 10u64 << 30, "Qubes' default volatile size");

    // Resize (shrink needs the flag), import, export, revert byte for byte.
    let err = ctl.fails(&["volume", "resize", "work:private", "64M"]);
    assert!(err.contains("allow-shrink"), "{err}");
    ctl.ok(&["volume", "resize", "work:private", "64M", "--allow-shrink"]);
    assert_eq!(
        ctl.json(&["volume", "info", "work:private"])["size"],
        64 * MIB
    );

    let a = ctl.root.join("a.img");
    let a_data = write_image(&a, 2, 64 * MIB as usize);
    ctl.ok(&["volume", "import", "work:private", a.to_str().unwrap()]);
    assert_eq!(export(&ctl, "work:private"), a_data);
    let b = ctl.root.join("b.img");
    let b_data = write_image(&b, 3, 64 * MIB as usize);
    ctl.ok(&["volume", "config", "work:private", "revisions_to_keep", "2"]);
    ctl.ok(&["volume", "import", "work:private", b.to_str().unwrap()]);
    assert_eq!(export(&ctl, "work:private"), b_data);
    let info = ctl.json(&["volume", "info", "work:private"]);
    assert!(
        !revisions(&info).is_empty(),
        "import keeps the old head as a revision: {info}"
    );
    ctl.ok(&["volume", "revert", "work:private"]);
    assert_eq!(
        export(&ctl, "work:private"),
        a_data,
        "revert restores the previous contents byte for byte"
    );
    // The revert itself can be undone: the head it replaced is a revision now.
    ctl.ok(&["volume", "revert", "work:private"]);
    assert_eq!(
        export(&ctl, "work:private"),
        b_data,
        "a revert can be undone"
    );
    // Import from stdin.
    let out = ctl
        .cmd(&["volume", "import", "work:private", "-"])
        .stdin(std::fs::File::open(&a).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(export(&ctl, "work:private"), a_data);
    // revisions_to_keep 0 keeps none after the next commit.
    ctl.ok(&["volume", "config", "work:private", "revisions_to_keep", "0"]);
    ctl.ok(&["volume", "import", "work:private", b.to_str().unwrap()]);
    assert!(revisions(&ctl.json(&["volume", "info", "work:private"])).is_empty());
    let err = ctl.fails(&[
        "volume",
        "config",
        "work:private",
        "revisions_to_keep",
        "many",
    ]);
    assert!(err.contains("revisions_to_keep"), "{err}");
    let err = ctl.fails(&["volume", "info", "work:nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = ctl.fails(&["volume", "info", "work"]);
    assert!(err.contains("QUBE:VOLUME"), "{err}");

    // Start with the `none` hypervisor: volumes exported over NBD by the daemon.
    ctl.ok(&["volume", "config", "work:private", "revisions_to_keep", "1"]);
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    assert_eq!(started["state"], "running");
    let priv_uri = uri_of(&started, "private");
    let root_uri = uri_of(&started, "root");
    assert!(
        priv_uri.starts_with("nbd+unix:///work/private?socket="),
        "{priv_uri}"
    );
    assert_eq!(
        ctl.json(&["volume", "info", "work:private"])["nbd_uri"],
        priv_uri.as_str()
    );
    assert_eq!(ctl.state("work"), "running");
    // With no guest there is nothing to pause.
    let err = ctl.fails(&["qube", "pause", "work"]);
    assert!(err.contains("hypervisor none"), "{err}");
    // Nor a console to attach to, nor an agent to run commands in.
    let err = ctl.fails(&["qube", "console", "work"]);
    assert!(err.contains("hypervisor none"), "{err}");
    let err = ctl.fails(&["qube", "run", "work", "--", "true"]);
    assert!(err.contains("hypervisor none"), "{err}");
    // Revert/import/remove of a running qube are refused.
    assert!(ctl
        .fails(&["volume", "revert", "work:private"])
        .contains("shut it down"));
    assert!(ctl.fails(&["qube", "remove", "work"]).contains("running"));
    // The AppVM's root is the template's, writable, and its writes vanish at stop.
    qemu_io(&root_uri, &["write -P 0x5a 0 64k", "flush"]);
    let got = qemu_io(&root_uri, &["read -v 0 16"]);
    assert!(got.contains("5a 5a"), "{got}");
    qemu_io(&priv_uri, &["write -P 0x77 1M 1M", "flush"]);
    ctl.ok(&["qube", "shutdown", "work"]);
    assert_eq!(ctl.state("work"), "halted");
    let err = ctl.fails(&["qube", "unpause", "work"]);
    assert!(err.contains("not running"), "{err}");
    let err = ctl.fails(&["qube", "console", "work"]);
    assert!(
        err.contains("not running") && err.contains("--log"),
        "{err}"
    );
    ctl.ok(&["qube", "console", "work", "--log"]);
    let err = ctl.fails(&["qube", "run", "work", "--no-autostart", "--", "true"]);
    assert!(err.contains("--no-autostart"), "{err}");
    assert_eq!(ctl.state("work"), "halted");
    let p = export(&ctl, "work:private");
    assert!(
        p[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0x77),
        "private writes are committed at stop"
    );
    assert_eq!(
        &export(&ctl, "tpl:root")[..tpl_data.len()],
        &tpl_data[..],
        "the template root is untouched"
    );
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let got = qemu_io(&uri_of(&started, "root"), &["read -v 0 16"]);
    assert!(
        !got.contains("5a 5a"),
        "root writes are discarded at stop: {got}"
    );
    qemu_io(
        &uri_of(&started, "private"),
        &["read -P 0x77 1M 1M", "write -P 0x88 1M 1M", "flush"],
    );
    ctl.ok(&["qube", "shutdown", "work"]);
    let p = export(&ctl, "work:private");
    assert!(p[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0x88));
    // The previous private state is a revision: revert brings it back, byte for byte.
    ctl.ok(&["volume", "revert", "work:private"]);
    let p = export(&ctl, "work:private");
    assert!(p[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0x77));

    // Prefs.
    ctl.ok(&["qube", "prefs", "work", "memory", "800"]);
    assert_eq!(
        ctl.json(&["qube", "prefs", "work", "memory"])["memory"],
        "800"
    );
    assert!(ctl
        .fails(&["qube", "prefs", "work", "label", "pink"])
        .contains("label"));
    assert!(ctl
        .fails(&["qube", "prefs", "work", "colour", "x"])
        .contains("unknown property"));
    // Network prefs follow Qubes' rules.
    let err = ctl.fails(&["qube", "prefs", "work", "netvm", "nosuch"]);
    assert!(err.contains("does not exist"), "{err}");
    ctl.ok(&["qube", "create", "net", "--template", "tpl"]);
    let err = ctl.fails(&["qube", "prefs", "work", "netvm", "net"]);
    assert!(err.contains("provides_network true"), "{err}");
    ctl.ok(&["qube", "prefs", "net", "provides_network", "true"]);
    ctl.ok(&["qube", "prefs", "work", "netvm", "net"]);
    assert_eq!(
        ctl.json(&["qube", "prefs", "work", "netvm"])["netvm"],
        "net"
    );
    ctl.ok(&["qube", "prefs", "work", "provides_network", "true"]);
    let err = ctl.fails(&["qube", "prefs", "net", "netvm", "work"]);
    assert!(err.contains("loop"), "{err}");
    let err = ctl.fails(&["qube", "prefs", "net", "provides_network", "false"]);
    assert!(err.contains("netvm of work"), "{err}");
    let err = ctl.fails(&["qube", "prefs", "work", "ip", "10.0.0.1"]);
    assert!(err.contains("read-only"), "{err}");
    let err = ctl.fails(&["qube", "remove", "net"]);
    assert!(err.contains("netvm of work"), "{err}");
    ctl.ok(&["qube", "prefs", "work", "netvm", "none"]);
    ctl.ok(&["qube", "prefs", "work", "provides_network", "false"]);
    ctl.ok(&["qube", "remove", "net"]);

    // Clone, StandaloneVM, DispVM.
    ctl.ok(&["qube", "clone", "work", "work2"]);
    assert_eq!(export(&ctl, "work2:private"), export(&ctl, "work:private"));
    ctl.ok(&[
        "qube",
        "create",
        "sa",
        "--class",
        "StandaloneVM",
        "--template",
        "tpl",
    ]);
    ctl.ok(&["qube", "prefs", "work", "template_for_dispvms", "true"]);
    ctl.ok(&[
        "qube",
        "create",
        "disp1",
        "--class",
        "DispVM",
        "--template",
        "work",
    ]);
    let started = ctl.json(&["qube", "start", "disp1", "--hypervisor", "none"]);
    qemu_io(
        &uri_of(&started, "private"),
        &["write -P 0x33 0 64k", "flush"],
    );
    ctl.ok(&["qube", "shutdown", "disp1"]);
    let started = ctl.json(&["qube", "start", "disp1", "--hypervisor", "none"]);
    let got = qemu_io(&uri_of(&started, "private"), &["read -v 0 16"]);
    assert!(
        !got.contains("33 33 33 33"),
        "nothing a DispVM writes survives: {got}"
    );
    let disp_run = ctl.root.join("run/qubes/disp1");
    assert!(disp_run.exists(), "{} while disp1 runs", disp_run.display());
    ctl.ok(&["qube", "shutdown", "disp1"]);
    assert!(
        !disp_run.exists(),
        "a DispVM leaves no run directory behind: {}",
        disp_run.display()
    );

    // A template in use cannot go; the error names the users.
    let err = ctl.fails(&["template", "remove", "tpl"]);
    assert!(err.contains("work"), "{err}");
    for q in ["disp1", "work2", "work", "sa"] {
        ctl.ok(&["qube", "remove", q]);
    }
    ctl.ok(&["template", "remove", "tpl"]);
    assert!(ctl.json(&["qube", "list"]).as_array().unwrap().is_empty());

    let v = ctl.json(&["pool", "verify"]);
    assert_eq!(v["clean"], true, "{v}");
    ctl.stop_daemon();
}
