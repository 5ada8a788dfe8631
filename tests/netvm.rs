//! Qubes' network with real Debian guests under QEMU: `work` has `sys-net` as its netvm.
//! Starting `work` starts `sys-net` first; `work`'s only NIC is linked to a NIC
//! hot-plugged into `sys-net`; the guest integration configures both from the kernel
//! command line (systemd-networkd), and sys-net routes and masquerades `work`'s traffic
//! out of its uplink (a user-mode NIC standing in for sys-net's physical one). The test
//! listens on the host; `work` reaches it through sys-net only.

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use e2e_tests::{debian_template_package, private_image, wait_for, Ctl};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

const NETVM_RC_LOCAL: &str = r#"#!/bin/sh
echo "QTEST-NETVM-UP host=$(hostname)" > /dev/ttyS0
"#;

/// Sends one line to the test's listener on the host (user-mode networking's 10.0.2.2)
/// with bash's /dev/tcp, retrying while the network comes up.
const CLIENT_RC_LOCAL: &str = r#"#!/bin/bash
port=$(sed -n 's/.*qtest.port=\([0-9]*\).*/\1/p' /proc/cmdline)
result=fail
for i in $(seq 1 120); do
  if (echo "QTEST-NET-FROM-$(hostname)" > /dev/tcp/10.0.2.2/$port) 2>/dev/null; then
    result="ok after $i s"; break
  fi
  sleep 1
done
echo "QTEST-NET $result" > /dev/ttyS0
networkctl --no-pager list > /dev/ttyS0 2>&1
systemctl poweroff
"#;

#[test]
fn a_qube_reaches_the_network_only_through_its_netvm() {
    let ctl = Ctl::new();
    let work = ctl.root.join("w");
    std::fs::create_dir_all(&work).unwrap();
    ctl.ok(&["pool", "init", "--size", "20G"]);
    // The shared template package (built once for all VM tests; vm_boot tests `template
    // build` itself).
    let pkg = debian_template_package();
    ctl.ok(&["template", "import", pkg.to_str().unwrap(), "--name", "deb"]);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();

    ctl.ok(&["qube", "create", "sys-net", "--template", "deb"]);
    ctl.ok(&["qube", "prefs", "sys-net", "provides_network", "true"]);
    ctl.ok(&["qube", "prefs", "sys-net", "kernelopts", "qtest.stay"]);
    ctl.ok(&["qube", "create", "work", "--template", "deb"]);
    ctl.ok(&["qube", "prefs", "work", "netvm", "sys-net"]);
    ctl.ok(&[
        "qube",
        "prefs",
        "work",
        "kernelopts",
        &format!("qtest.port={port}"),
    ]);
    for (q, rc) in [("sys-net", NETVM_RC_LOCAL), ("work", CLIENT_RC_LOCAL)] {
        let img = private_image(&work, q, rc, "64M");
        ctl.ok(&[
            "volume",
            "import",
            &format!("{q}:private"),
            img.to_str().unwrap(),
        ]);
    }

    // Starting work starts its netvm first.
    let started: Value = ctl.json(&["qube", "start", "work"]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(ctl.state("sys-net"), "running");
    let ip = ctl.json(&["qube", "prefs", "work", "ip"])["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ip.starts_with("10.137.0."), "{ip}");
    let net_ip = ctl.json(&["qube", "prefs", "sys-net", "ip"])["ip"].clone();
    assert_ne!(net_ip, ip.as_str());
    // A clone keeps the netvm but not the address.
    ctl.ok(&["qube", "clone", "work", "work-copy"]);
    assert_eq!(
        ctl.json(&["qube", "prefs", "work-copy", "netvm"])["netvm"],
        "sys-net"
    );
    assert_eq!(ctl.json(&["qube", "prefs", "work-copy", "ip"])["ip"], "");
    // A netvm with a running client does not shut down cleanly under it.
    let err = ctl.fails(&["qube", "shutdown", "sys-net"]);
    assert!(
        err.contains("provides network to running qubes work"),
        "{err}"
    );

    let mut got = String::new();
    let start = Instant::now();
    while start.elapsed() < BOOT_TIMEOUT && got.is_empty() {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.read_to_string(&mut got);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
        if ctl.console("work").contains("QTEST-NET fail") {
            break;
        }
    }
    assert!(
        got.contains("QTEST-NET-FROM-work"),
        "nothing from work through sys-net (got {got:?});\nwork console:\n{}\nsys-net console:\n{}",
        ctl.console("work"),
        ctl.console("sys-net")
    );
    wait_for("work to power off and be reaped", BOOT_TIMEOUT, || {
        ctl.state("work") == "halted"
    });
    assert!(ctl.console("work").contains("QTEST-NET ok"));
    ctl.ok(&["qube", "shutdown", "sys-net"]);
    assert_eq!(ctl.state("sys-net"), "halted");
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
    ctl.stop_daemon();
}
