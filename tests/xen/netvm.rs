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
//! - beyond sys-net: dom0 has a bridge `xenbr0` (10.0.2.2/24, a DHCP server on it:
//!   the test's stand-in for the LAN of sys-net's physical NIC, addressed as QEMU's
//!   user-mode network is); sys-net, a netvm without a netvm, gets its uplink there
//!   from the controller (a vif with dom0 as backend, Xen's `vif-bridge`), configured
//!   by DHCP; the client reaches a TCP listener of this test in dom0, which sees the
//!   connection come from sys-net's uplink address (sys-net routed and masqueraded it;
//!   dom0 has no route to the qubes network, so nothing else could answer);
//! - `qube shutdown net-client`: the client's domain goes, sys-net's kernel drops
//!   `vifD.0` and its udev rule removes the backend's xenstore directory (what `xl devd`
//!   does in a Qubes netvm; dom0's libxl waits for it); then sys-net shuts down and its
//!   uplink leaves dom0's bridge.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
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

/// dom0's side of sys-net's uplink network.
const BRIDGE: &str = "xenbr0";
const DOM0_UPLINK_IP: &str = "10.0.2.2";
const UPLINK_PORT: u16 = 7778;

/// dom0's stand-in for the LAN of sys-net's physical NIC: the bridge the controller
/// puts sys-net's uplink vif on, with an address and a DHCP server (busybox udhcpd),
/// addressed as QEMU's user-mode network is. Returns the DHCP server.
fn dom0_uplink_network() -> Child {
    let sh = |cmd: &str| {
        let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(&format!(
        "ip link add {BRIDGE} type bridge forward_delay 0 && \
         ip addr add {DOM0_UPLINK_IP}/24 dev {BRIDGE} && ip link set {BRIDGE} up"
    ));
    let conf = "/run/udhcpd-uplink.conf";
    std::fs::write(
        conf,
        format!(
            "start 10.0.2.15\nend 10.0.2.31\ninterface {BRIDGE}\n\
             lease_file /run/udhcpd-uplink.leases\noption subnet 255.255.255.0\n\
             option router {DOM0_UPLINK_IP}\n"
        ),
    )
    .unwrap();
    std::fs::write("/run/udhcpd-uplink.leases", "").unwrap();
    Command::new("busybox")
        .args(["udhcpd", "-f", conf])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("busybox udhcpd in dom0")
}

/// A TCP listener in dom0 on the uplink network: each connection's first line and its
/// peer address go to the channel, and the peer gets its own address back.
fn dom0_listener() -> mpsc::Receiver<(SocketAddr, String)> {
    let l = TcpListener::bind((DOM0_UPLINK_IP, UPLINK_PORT)).expect("listening in dom0");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
            let peer = c.peer_addr().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&c).read_line(&mut line);
            let _ = writeln!(c, "dom0 saw {}", peer.ip());
            if tx.send((peer, line.trim().to_string())).is_err() {
                return;
            }
        }
    });
    rx
}

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
    let mut dhcpd = dom0_uplink_network();
    let seen = dom0_listener();
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
    let t_up = Instant::now();
    let uplink_ip = beyond_the_netvm(ctl, root, net_domid, &seen);
    println!(
        "net-client -> dom0 {DOM0_UPLINK_IP}:{UPLINK_PORT} through sys-net (seen from {uplink_ip}) in {:.0?}",
        t_up.elapsed()
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
    // libxl ran vif-bridge offline: the uplink left dom0's bridge with the domain.
    wait_for(
        "sys-net's uplink vif to leave dom0",
        Duration::from_secs(120),
        || !Path::new(&format!("/sys/class/net/vif{net_domid}.0")).exists(),
    );
    let _ = dhcpd.kill();
    let _ = dhcpd.wait();
    let v = ctl.json(&["pool", "verify"]);
    assert_eq!(v["clean"], true, "{v}");
    step("netvm-shutdown", t);
}

/// The client's traffic beyond sys-net: sys-net's uplink is a vif served by dom0 on
/// its bridge, configured by DHCP; the client reaches dom0's listener, which sees the
/// connection come from sys-net's uplink address (routed and masqueraded by sys-net).
/// Returns that address.
fn beyond_the_netvm(
    ctl: &Ctl,
    root: &Path,
    net_domid: u32,
    seen: &mpsc::Receiver<(SocketAddr, String)>,
) -> String {
    let mac = ctl.json(&["qube", "prefs", "sys-net", "ip"])["ip"]
        .as_str()
        .and_then(|ip| ip.rsplit('.').next()?.parse::<u8>().ok())
        .map(|n| format!("00:16:3e:5e:6c:{n:02x}"))
        .unwrap();
    let cfg = std::fs::read_to_string(root.join("run/qubes/sys-net/xl.cfg")).unwrap();
    let vif = format!("vif = [ \"bridge={BRIDGE},mac={mac}\" ]");
    assert!(cfg.contains(&vif), "sys-net's uplink: {vif} in\n{cfg}");
    let port = format!("/sys/class/net/{BRIDGE}/brif/vif{net_domid}.0");
    assert!(
        Path::new(&port).exists(),
        "libxl's vif-bridge put sys-net's uplink on {BRIDGE} ({port})"
    );
    // Nothing in dom0 routes to the qubes network: only sys-net's NAT can bring the
    // client's packets here and the answers back.
    let routes = Command::new("ip").args(["-4", "route"]).output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(!routes.contains("10.137."), "dom0's routes: {routes}");
    // sys-net's uplink address, from dom0's DHCP server.
    let mut uplink_ip = None;
    wait_for(
        "sys-net's uplink to get its DHCP lease",
        Duration::from_secs(600),
        || {
            uplink_ip = run(ctl, "sys-net", &["hostname", "-I"]).and_then(|a| {
                a.split_whitespace()
                    .find(|a| a.starts_with("10.0.2."))
                    .map(str::to_string)
            });
            uplink_ip.is_some()
        },
    );
    let uplink_ip = uplink_ip.unwrap();
    let connect = format!(
        "exec 3<>/dev/tcp/{DOM0_UPLINK_IP}/{UPLINK_PORT} && echo from-$(hostname) >&3 && cat <&3"
    );
    let t = Instant::now();
    let mut got = None;
    while t.elapsed() < Duration::from_secs(600) {
        got = run(ctl, "net-client", &["bash", "-c", &connect]);
        if got.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let got = got.unwrap_or_else(|| {
        panic!(
            "net-client did not reach dom0's {DOM0_UPLINK_IP}:{UPLINK_PORT} through sys-net; \
             sys-net's routes: {:?}; its nft ruleset: {:?}",
            run(ctl, "sys-net", &["ip", "-4", "route"]),
            run(ctl, "sys-net", &["nft", "list", "ruleset"]),
        )
    });
    let (peer, line) = seen
        .recv_timeout(Duration::from_secs(60))
        .expect("dom0's listener saw the connection");
    assert_eq!(line, "from-net-client", "the client's own connection");
    assert_eq!(
        peer.ip().to_string(),
        uplink_ip,
        "dom0 sees sys-net's uplink address: sys-net masqueraded the client"
    );
    assert_eq!(got.trim(), format!("dom0 saw {uplink_ip}"));
    uplink_ip
}
