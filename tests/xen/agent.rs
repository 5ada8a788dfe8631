//! `qube run` and `qube console` on real Xen (issue 18), in the PV boot of `work`: the
//! agent's channel is a second PV console the daemon serves itself (backend
//! `qubes-console`, the guest's /dev/hvc1, bridged to RUN/agent.sock); the console is
//! `xl console` behind the one-client lock, on a pty the test holds the master of.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The issue's "done means" on Xen, and a stdin larger than the rings.
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
    // A `qube run` killed mid-command: a console has no hangup, so the agent learns of
    // it only from the next session, which must go through at once (the old command
    // ended), not wait out its handshake.
    let mut c = ctl
        .cmd(&["qube", "run", q, "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(5));
    let _ = c.kill();
    let _ = c.wait();
    let t = Instant::now();
    let out = ctl.output(&["qube", "run", q, "--timeout", "120", "--", "echo", "next"]);
    assert!(
        out.status.success() && out.stdout == b"next\n",
        "the run after a killed one: {out:?}\n{}",
        diagnostics(ctl, q)
    );
    println!(
        "qube run on Xen: the run after a killed one answered in {:.1?}",
        t.elapsed()
    );
}

/// After a daemon restart the new daemon serves the agent's console again.
pub fn run_after_restart(ctl: &Ctl, q: &str) {
    assert_eq!(run_ok(ctl, q, &["cat", "/etc/hostname"]), format!("{q}\n"));
}

/// A pty pair: the master (ours) and the slave's path.
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two new fds; the name, termios and winsize pointers may
    // be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and belong to nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// `qube console` on a pty this test holds the master of: a second client is refused,
/// root's autologin gives a prompt, a command runs, Ctrl-] detaches and the qube runs
/// on. Returns what went wrong, with what the terminal and the guest's console showed
/// (the caller asserts once the other steps ran).
pub fn console(ctl: &Ctl, q: &str) -> Result<Duration, String> {
    // Under a loaded nested TCG host the guest's getty on hvc0 comes up minutes after
    // its rc.local report: wait for it (through the agent) rather than for a prompt.
    let getty = |_: ()| {
        ctl.output(&[
            "qube",
            "run",
            q,
            "--",
            "systemctl",
            "is-active",
            "serial-getty@hvc0.service",
        ])
        .stdout
            == b"active\n"
    };
    let deadline = Instant::now() + Duration::from_secs(900);
    while !getty(()) {
        if Instant::now() > deadline {
            return Err("the guest's serial-getty@hvc0 never became active".into());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let t0 = Instant::now();
    let (master, slave) = openpty();
    /// Killed and reaped however this ends (a failure returns early).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = ctl
        .cmd(&["qube", "console", q])
        .env("TERM", "vt100")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .expect("qubes-ctl qube console");
    let mut child = Reap(child);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut rd = master.try_clone().unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        // EIO once the last slave fd closes.
        while let Ok(n) = rd.read(&mut b) {
            if n == 0 {
                break;
            }
            s.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    let mut wr = master;
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let fail = |what: &str, text: String| {
        let log = std::fs::read_to_string(format!("/var/log/xen/console/guest-{q}.log"))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let shown: String = text
            .chars()
            .rev()
            .take(1500)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        // The agent can tell what the guest runs on its console.
        let g = ctl.output(&[
            "qube", "run", q, "--timeout", "60", "--", "sh", "-c",
            "cat /proc/cmdline; cat /sys/class/tty/console/active; \
             systemctl list-units --all --no-pager '*getty*'; \
             systemctl status --no-pager serial-getty@hvc0 2>&1 | tail -n 15; \
             ls /etc/systemd/system/getty.target.wants /run/systemd/generator/getty.target.wants 2>&1",
        ]);
        format!(
            "{what}; the terminal showed {shown:?}; the guest's console log ends:\n{}\nin the guest:\n{}{}",
            tail.join("\n"),
            String::from_utf8_lossy(&g.stdout),
            String::from_utf8_lossy(&g.stderr)
        )
    };
    let until = |what: &str, f: &mut dyn FnMut() -> bool| -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !f() {
            if Instant::now() > deadline {
                return Err(fail(&format!("timed out waiting for {what}"), text()));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    };
    let lock = ctl.root.join("run/qubes").join(q).join("console.lock");
    // The lock file holds the pid of the process that holds the lock.
    let pid = child.0.id().to_string();
    until("qube console to take the lock", &mut || {
        std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == pid)
    })?;
    let e = ctl.fails(&["qube", "console", q]);
    if !e.contains("already attached") {
        return Err(format!("a second client was not refused: {e}"));
    }
    until("a root shell prompt on the console", &mut || {
        let _ = wr.write_all(b"\r");
        std::thread::sleep(Duration::from_secs(1));
        text().contains(&format!("root@{q}"))
    })?;
    wr.write_all(b"echo QCON-$((6*7))\r").unwrap();
    until("the command's output on the console", &mut || {
        text().contains("QCON-42")
    })?;
    wr.write_all(&[0x1d]).unwrap();
    let mut status = None;
    until("Ctrl-] to detach", &mut || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    })?;
    let status = status.unwrap();
    if !status.success() {
        return Err(fail(&format!("qube console exited {status}"), text()));
    }
    if ctl.state(q) != "running" {
        return Err("detaching stopped the qube".into());
    }
    // The lock went with the client: a new one may attach.
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    // SAFETY: flock(2) on an fd `f` owns and keeps open for the call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err("the console lock is still held after the detach".into());
    }
    Ok(t0.elapsed())
}
