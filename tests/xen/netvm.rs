//! Qubes' network on real Xen, run in dom0 by `in_dom0` after the other boots: `sys-net`
//! (provides_network) and `net-client`, whose netvm it is, both PV.
//!
//! - `qube start net-client` starts sys-net first (as Qubes does) and creates the
//!   client's domain only once sys-net's kernel serves vif backends (its guest
//!   integration loads xen-netback and writes `data/qubes-net-backend`: libxl gives the
//!   backend 10 s); sys-net's userspace boot and the client's boot overlap from there;
//! - the client's xl.cfg has `vif = ['backend=sys-net,mac=...,ip=...']`; libxl builds
//!   the backend in sys-net's xenstore directory; sys-net's udev rule configures
//!   `vifD.0` (its address, a host route to the client) and writes
//!   `hotplug-status = connected`, so netback connects (backend state 4);
//! - the client's NIC comes up with the address the controller assigned and it reaches
//!   a TCP service sys-net runs (`systemd-socket-activate`, answering with its hostname)
//!   over the vif; sys-net refuses to shut down while its client runs;
//! - `qube shutdown net-client`: the client's domain goes, sys-net's kernel drops
//!   `vifD.0` and its udev rule removes the backend's xenstore directory (what `xl devd`
//!   does in a Qubes netvm; dom0's libxl waits for it); then sys-net shuts down.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{private_image, wait_for, Ctl};

use super::domains::{read, wait_reports};
use super::{step, xl};

/// sys-net's job: a TCP service on port 7777 that answers each connection with the
/// qube's name, then its report.
const NETVM_RC_LOCAL: &str = r#"#!/bin/sh
setsid systemd-socket-activate -l 7777 --accept --inetd hostname < /dev/null > /dev/null 2>&1 &
echo "QTEST host=$(hostname) listening" > /dev/console
echo "QTEST-DONE host=$(hostname)" > /dev/console
"#;

const CLIENT_RC_LOCAL: &str = r#"#!/bin/sh
echo "QTEST host=$(hostname) up" > /dev/console
echo "QTEST-DONE host=$(hostname)" > /dev/console
"#;

const PORT: u16 = 7777;

/// Host side: the two qubes and their private volumes (with their jobs) in the pool
/// dom0 gets.
pub fn prepare(ctl: &Ctl, share: &Path) {
    for (q, rc) in [("sys-net", NETVM_RC_LOCAL), ("net-client", CLIENT_RC_LOCAL)] {
        ctl.ok(&[
            "qube",
            "create",
            q,
            "--class",
            "AppVM",
            "--template",
            "debian-12-minimal",
        ]);
        let img = private_image(share, q, rc, "64M");
        ctl.ok(&[
            "volume",
            "import",
            &format!("{q}:private"),
            img.to_str().unwrap(),
        ]);
        let _ = std::fs::remove_file(&img);
    }
}

fn xenstore(op: &str, path: &str) -> Option<String> {
    let o = Command::new(op).arg(path).output().expect(op);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn domid(qube: &str) -> u32 {
    let (ok, out) = xl(&["domid", qube]);
    assert!(ok, "xl domid {qube}: {out}");
    out.trim().parse().expect("xl domid prints a number")
}

/// `qube run` with its output; `None` when the command failed.
fn run(ctl: &Ctl, qube: &str, args: &[&str]) -> Option<String> {
    let mut a = vec!["qube", "run", qube, "--timeout", "600", "--"];
    a.extend_from_slice(args);
    let out = ctl.output(&a);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netvm_and_client(ctl: &Ctl, root: &Path) {
    let t = Instant::now();
    ctl.ok(&["qube", "prefs", "sys-net", "provides_network", "true"]);
    ctl.ok(&["qube", "prefs", "net-client", "netvm", "sys-net"]);
    for q in ["sys-net", "net-client"] {
        ctl.ok(&["qube", "prefs", q, "virt_mode", "pv"]);
        let _ = std::fs::remove_file(format!("/var/log/xen/console/guest-{q}.log"));
    }
    let started = ctl.json(&["qube", "start", "net-client", "--hypervisor", "xen"]);
    assert_eq!(started["state"], "running", "{started}");
    println!(
        "qube start net-client (sys-net first, until it serves vifs) returned in {:.0?}",
        t.elapsed()
    );
    assert_eq!(ctl.state("sys-net"), "running", "the netvm started first");
    let net_ip = ctl.json(&["qube", "prefs", "sys-net", "ip"])["ip"]
        .as_str()
        .map(str::to_string)
        .filter(|ip| ip.starts_with("10.137.0."))
        .expect("sys-net's address, assigned at its start");
    let client_ip = ctl.json(&["qube", "prefs", "net-client", "ip"])["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        client_ip.starts_with("10.137.0.") && client_ip != net_ip,
        "{client_ip}"
    );
    let last: u8 = client_ip.rsplit('.').next().unwrap().parse().unwrap();
    let cfg = std::fs::read_to_string(root.join("run/qubes/net-client/xl.cfg")).unwrap();
    let vif = format!("vif = [ \"backend=sys-net,mac=00:16:3e:5e:6c:{last:02x},ip={client_ip}\" ]");
    assert!(cfg.contains(&vif), "{vif} in\n{cfg}");
    let (net_domid, client_domid) = (domid("sys-net"), domid("net-client"));
    let be = format!("/local/domain/{net_domid}/backend/vif/{client_domid}/0");
    assert_eq!(
        xenstore("xenstore-read", &format!("{be}/ip")).as_deref(),
        Some(client_ip.as_str()),
        "libxl built the vif backend in sys-net's directory"
    );
    let err = ctl.fails(&["qube", "shutdown", "sys-net"]);
    assert!(
        err.contains("provides network to running qubes net-client"),
        "{err}"
    );

    let logs: Vec<(&str, std::path::PathBuf)> = ["sys-net", "net-client"]
        .into_iter()
        .map(|q| (q, format!("/var/log/xen/console/guest-{q}.log").into()))
        .collect();
    let guests: Vec<(&str, &Path)> = logs.iter().map(|(q, l)| (*q, l.as_path())).collect();
    wait_reports(&guests, t);
    // The vif connected: netback goes to state 4 only after hotplug-status = connected.
    wait_for(
        "sys-net's vif backend to connect (state 4)",
        Duration::from_secs(300),
        || xenstore("xenstore-read", &format!("{be}/state")).as_deref() == Some("4"),
    );
    // The client reaches sys-net's service over the vif, and nothing else answers on
    // that address: sys-net's hostname comes back.
    let connect = format!("exec 3<>/dev/tcp/{net_ip}/{PORT} && cat <&3");
    let t_net = Instant::now();
    let mut got = None;
    while t_net.elapsed() < Duration::from_secs(600) {
        got = run(ctl, "net-client", &["bash", "-c", &connect]);
        if got.as_deref().map(str::trim) == Some("sys-net") {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    assert_eq!(
        got.as_deref().map(str::trim),
        Some("sys-net"),
        "net-client reached sys-net:{PORT}; client's network: {:?}; sys-net's: {:?}\nclient console tail:\n{}\nsys-net console tail:\n{}",
        run(ctl, "net-client", &["networkctl", "--no-pager", "status"]),
        run(ctl, "sys-net", &["networkctl", "--no-pager", "status"]),
        read(&logs[1].1).lines().rev().take(30).collect::<Vec<_>>().join("\n"),
        read(&logs[0].1).lines().rev().take(30).collect::<Vec<_>>().join("\n"),
    );
    println!(
        "net-client -> sys-net:{PORT} answered {:.0?} after both reports",
        t_net.elapsed()
    );
    let addrs = run(ctl, "net-client", &["hostname", "-I"]).expect("hostname -I");
    assert!(
        addrs.split_whitespace().any(|a| a == client_ip),
        "net-client's NIC has {client_ip}: {addrs}"
    );
    let vif = format!("vif{client_domid}.0");
    assert_eq!(
        run(
            ctl,
            "sys-net",
            &["cat", &format!("/sys/class/net/{vif}/carrier")]
        )
        .as_deref()
        .map(str::trim),
        Some("1"),
        "sys-net's {vif} has its carrier"
    );
    step("netvm-client", t);

    // The client's shutdown takes its vif away; then the netvm may go.
    let t = Instant::now();
    ctl.ok(&["qube", "shutdown", "net-client", "--timeout", "600"]);
    assert_eq!(ctl.state("net-client"), "halted");
    assert!(
        !xl(&["list", "net-client"]).0,
        "net-client's domain is gone"
    );
    println!("qube shutdown net-client took {:.0?}", t.elapsed());
    wait_for(
        "sys-net to remove the vif backend's xenstore directory",
        Duration::from_secs(120),
        || {
            xenstore(
                "xenstore-exists",
                &format!("/local/domain/{net_domid}/backend/vif/{client_domid}"),
            )
            .is_none()
        },
    );
    assert_eq!(
        xenstore(
            "xenstore-exists",
            &format!("/local/domain/{client_domid}/device/vif")
        ),
        None,
        "the client's frontend is gone"
    );
    assert_eq!(
        run(ctl, "sys-net", &["ls", "/sys/class/net"])
            .unwrap_or_default()
            .split_whitespace()
            .find(|i| *i == vif),
        None,
        "sys-net's {vif} is gone"
    );
    assert_eq!(ctl.state("sys-net"), "running");
    ctl.ok(&["qube", "shutdown", "sys-net", "--timeout", "600"]);
    assert_eq!(ctl.state("sys-net"), "halted");
    let v = ctl.json(&["pool", "verify"]);
    assert_eq!(v["clean"], true, "{v}");
    step("netvm-shutdown", t);
}
