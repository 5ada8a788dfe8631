//! `qube run` on real Xen (issue 18), in the PV boot of `work`: the agent's channel is a
//! second PV console the daemon serves itself (backend `qubes-console`, the guest's
//! /dev/hvc1, bridged to RUN/agent.sock).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use e2e_tests::{pattern, Ctl};

/// What to show when the agent does not answer: the nodes of both ends, the guest's
/// view of its consoles (from its kernel log on the primary console), the daemon's word.
fn diagnostics(ctl: &Ctl, q: &str) -> String {
    let domid = Command::new("xl")
        .args(["domid", q])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let ls = |p: &str| {
        Command::new("xenstore-ls")
            .args(["-f", p])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("xenstore-ls: {e}"))
    };
    let console =
        std::fs::read_to_string(format!("/var/log/xen/console/guest-{q}.log")).unwrap_or_default();
    let guest: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("hvc") || l.contains("xenbus") || l.contains("agent"))
        .collect();
    let log = std::fs::read_to_string(ctl.root.join("run/daemon.log")).unwrap_or_default();
    let daemon: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("console") || l.contains("agent"))
        .collect();
    format!(
        "domain {domid}\nbackend:\n{}\nfrontend:\n{}\nguest console lines:\n{}\ndaemon:\n{}",
        ls(&format!("/local/domain/0/backend/qubes-console/{domid}")),
        ls(&format!("/local/domain/{domid}/device/console")),
        guest.join("\n"),
        daemon.join("\n")
    )
}

fn run_ok(ctl: &Ctl, q: &str, args: &[&str]) -> String {
    let mut a = vec!["qube", "run", q, "--timeout", "600", "--"];
    a.extend_from_slice(args);
    let out = ctl.output(&a);
    assert!(
        out.status.success(),
        "qube run {args:?} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        diagnostics(ctl, q)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The "done means" on Xen, and a stdin larger than the rings.
pub fn run(ctl: &Ctl, q: &str) {
    let t = Instant::now();
    assert_eq!(run_ok(ctl, q, &["cat", "/etc/hostname"]), format!("{q}\n"));
    println!(
        "qube run on Xen: first answer {:.1?} after the boot report",
        t.elapsed()
    );
    let out = ctl.output(&["qube", "run", q, "--", "sh", "-c", "echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stderr, b"err\n");
    let pass = |input: &[u8]| {
        let mut c = ctl
            .cmd(&["qube", "run", q, "--pass-io", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let data = input.to_vec();
        let w = std::thread::spawn(move || stdin.write_all(&data));
        let out = c.wait_with_output().unwrap();
        w.join().unwrap().unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    assert_eq!(pass(b"hi\n"), b"hi\n");
    // 256 KiB each way through a 1 KiB / 2 KiB ring pair.
    let data = pattern(18, 256 << 10);
    let t = Instant::now();
    let back = pass(&data);
    assert!(
        back == data,
        "{} of {} bytes came back",
        back.len(),
        data.len()
    );
    println!(
        "qube run on Xen: 256 KiB through cat in {:.1?}",
        t.elapsed()
    );
}

/// After a daemon restart the new daemon serves the agent's console again.
pub fn run_after_restart(ctl: &Ctl, q: &str) {
    assert_eq!(run_ok(ctl, q, &["cat", "/etc/hostname"]), format!("{q}\n"));
}
