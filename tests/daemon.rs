//! The daemon and its NBD exports against real clients: per-qube sockets (0600) that
//! reach only that qube's volumes, qemu-img/nbdinfo through the exports, and a SIGKILL
//! of the daemon while a client writes: the pool verifies clean, every write acknowledged
//! by a flush survives in the dirty snapshot, and a restarted daemon serves the exports
//! again at the same socket paths.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{daemons_of, pattern, raw_call, socket_of, uri_of, wait_for_exit, Ctl};
use serde_json::Value;

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

fn setup() -> Ctl {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "4G"]);
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, pattern(9, 4 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["qube", "create", "work", "--template", "tpl"]);
    ctl.ok(&["qube", "create", "other", "--template", "tpl"]);
    ctl.ok(&["volume", "resize", "work:private", "64M", "--allow-shrink"]);
    ctl
}

#[test]
fn exports_are_private_to_their_qube_and_work_with_real_clients() {
    let ctl = setup();
    let work = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let other = ctl.json(&["qube", "start", "other", "--hypervisor", "none"]);
    let sock = socket_of(&uri_of(&work, "private"));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "qube sockets are 0600");
    let admin = ctl.admin_socket();
    assert_eq!(
        std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // nbdinfo --list shows exactly this qube's volumes.
    let list = run(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix:///?socket={sock}"),
    ]));
    let list: Value = serde_json::from_str(&list).unwrap();
    let mut names: Vec<String> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["work/private", "work/root", "work/volatile"]);
    // Another qube's export name on this socket: refused.
    let out = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///other/private?socket={sock}"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "work's socket served other's private volume"
    );
    assert_ne!(socket_of(&uri_of(&other, "private")), sock);

    // qemu-img convert into the export and back, compare.
    let src = ctl.root.join("src.img");
    std::fs::write(&src, pattern(5, 64 << 20)).unwrap();
    let uri = uri_of(&work, "private");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    let back = ctl.root.join("back.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
    // Holes show in the map of the (thin, mostly empty) volatile volume.
    let map = run(Command::new("nbdinfo").args(["--map", &uri_of(&work, "volatile")]));
    assert!(map.contains("hole"), "{map}");

    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.ok(&["qube", "shutdown", "other"]);
    assert!(
        !std::path::Path::new(&sock).exists(),
        "the socket goes with the qube"
    );
    // Committed at shutdown.
    let out = ctl.root.join("out.img");
    ctl.ok(&["volume", "export", "work:private", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

#[test]
fn sigkill_of_the_daemon_keeps_flushed_writes_and_serves_again() {
    let ctl = setup();
    let work = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let uri = uri_of(&work, "private");
    let sock = socket_of(&uri);
    // Acknowledged by a flush: must survive.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xa1 0 4M", "-c", "flush"])
        .arg(&uri));
    // A writer hammering the volatile volume while the daemon dies.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args((0..200).flat_map(|i| {
            [
                "-c".to_string(),
                format!("write -P 0x{:02x} {}M 1M", i % 250 + 1, i % 60),
            ]
        }))
        .arg(uri_of(&work, "volatile"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = ctl.daemon_pid();
    // SAFETY: plain kill(2) on a pid we read from the daemon's pid file.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = writer.wait();
    std::thread::sleep(Duration::from_millis(200));

    // The qube is still marked running; its private volume is dirty, its head untouched.
    let info = ctl.json(&["volume", "info", "work:private"]);
    assert_eq!(info["dirty"], true, "{info}");
    let v = ctl.json(&["pool", "verify"]);
    assert_eq!(v["clean"], true, "{v}");

    // A new daemon serves the exports again at the same socket path.
    ctl.ok(&["daemon", "start"]);
    assert!(std::path::Path::new(&sock).exists());
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xa1 0 4M"])
        .arg(&uri));
    ctl.ok(&["qube", "shutdown", "work"]);
    let out = ctl.root.join("out.img");
    ctl.ok(&["volume", "export", "work:private", out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    assert!(
        data[..4 << 20].iter().all(|&b| b == 0xa1),
        "flushed writes are committed at the next stop"
    );
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// After qubes-ctl is rebuilt or upgraded, a daemon started by the old binary is not
/// left serving old code: idle, it is stopped by the next command (and a `qube start`
/// brings up the new one); with qubes running, the user is told how to switch.
#[test]
fn a_daemon_of_another_build_is_replaced_when_idle() {
    let ctl = setup();
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    assert_eq!(started["state"], "running");
    let old_pid = ctl.json(&["daemon", "status"])["pid"].clone();
    // A "new build": the same program as another file.
    let new_bin = ctl.root.join("qubes-ctl-new");
    std::fs::copy(e2e_tests::qubes_ctl_bin(), &new_bin).unwrap();
    let with_new = |args: &[&str]| {
        // A test thread forking while the copy was open for writing holds that
        // descriptor until its exec: ETXTBSY for a moment (a Linux race), not an error.
        let mut tries = 0;
        loop {
            match Command::new(&new_bin)
                .arg("--root")
                .arg(&ctl.root)
                .args(args)
                .env_remove("QUBES_CTL_ROOT")
                .output()
            {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => break r.unwrap(),
            }
        }
    };
    // A qube runs: the old daemon keeps serving it; the user is warned.
    let out = with_new(&["qube", "list"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs another qubes-ctl build"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
    // Idle: the next command retires it and a start brings up the new binary's daemon.
    assert!(with_new(&["qube", "shutdown", "work"]).status.success());
    let out = with_new(&[
        "--format",
        "json",
        "qube",
        "start",
        "work",
        "--hypervisor",
        "none",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_new(&["--format", "json", "daemon", "status"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["daemon"], "running", "{status}");
    assert_ne!(status["pid"], old_pid, "the old daemon still serves");
    let out = with_new(&["qube", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("another qubes-ctl build"),
        "the new daemon is the same build"
    );
    assert!(with_new(&["qube", "shutdown", "work"]).status.success());
    let _ = with_new(&["daemon", "stop"]);
}

/// `daemon status --format json` says how much the daemon serves, and `qube log` shows
/// the daemon's lines about that qube only (the daemon logs to ROOT/run/daemon.log when
/// systemd does not run it).
#[test]
fn daemon_status_figures_and_qube_log() {
    let ctl = setup();
    ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    ctl.json(&["qube", "start", "other", "--hypervisor", "none"]);
    let st = ctl.json(&["daemon", "status"]);
    assert_eq!(st["daemon"], "running", "{st}");
    assert_eq!(st["qubes_served"], 2, "{st}");
    assert!(st["uptime_secs"].is_u64(), "{st}");
    assert_eq!(st["nbd_connections"], 0, "{st}");
    assert!(st["admin_requests_served"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["pool_usage"]["capacity"].as_u64().unwrap() > 0, "{st}");
    assert!(st["pool_usage"]["data_used"].as_u64().unwrap() > 0, "{st}");

    ctl.ok(&["qube", "shutdown", "work"]);
    let log = ctl.json(&["qube", "log", "work"]);
    let lines: Vec<&str> = log["daemon"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("qube started")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("qube stopped")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("qube=work")),
        "another qube's lines in work's log: {lines:?}"
    );
    let human = ctl.ok(&["qube", "log", "other"]);
    assert!(
        human.contains("== console") && human.contains("qube=other"),
        "{human}"
    );
}

/// Runs `cmd` to its end within `secs` (killed and reported otherwise): a request the
/// daemon holds back shows as a failure, not as a hung test.
fn finishes_within(mut cmd: Command, secs: u64, what: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not answer within {secs} s while an import was held back");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One request does not hold back the others: while an import into `other` is stuck on
/// its reader, `work` starts and shuts down, `qube list` and `daemon status` answer, and
/// only one daemon exists; a start of `other` itself waits for the import (requests on
/// one qube are ordered) and then serves the imported data.
#[test]
fn a_held_import_does_not_hold_back_other_qubes() {
    use std::io::Write;
    let ctl = setup();
    ctl.ok(&["volume", "resize", "other:private", "64M", "--allow-shrink"]);
    ctl.ok(&["daemon", "start"]);
    let image = pattern(21, 64 << 20);
    let mut import = ctl
        .cmd(&["volume", "import", "other:private", "-", "--size", "64M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut feed = import.stdin.take().unwrap();
    feed.write_all(&image[..8 << 20]).unwrap();
    feed.flush().unwrap();
    // The daemon is now reading the import (the pipe holds far less than 8 MiB).

    let status = std::time::Instant::now();
    let out = finishes_within(
        ctl.cmd(&["--format", "json", "daemon", "status"]),
        30,
        "daemon status",
    );
    let status = status.elapsed();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"], "running", "{v}");
    let mut start_other = ctl
        .cmd(&["qube", "start", "other", "--hypervisor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finishes_within(
        ctl.cmd(&["qube", "start", "work", "--hypervisor", "none"]),
        60,
        "qube start work",
    );
    let list = finishes_within(
        ctl.cmd(&["--format", "json", "qube", "list"]),
        60,
        "qube list",
    );
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let state = |n: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == n)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("work"), "running", "{list}");
    assert_eq!(state("other"), "halted", "{list}");
    finishes_within(
        ctl.cmd(&["qube", "shutdown", "work"]),
        60,
        "qube shutdown work",
    );
    assert_eq!(daemons_of(&ctl.root), 1, "one daemon serves the root");
    assert!(
        start_other.try_wait().unwrap().is_none(),
        "other started while an import into its volume ran"
    );

    feed.write_all(&image[8 << 20..]).unwrap();
    drop(feed);
    let out = import.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = start_other.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "start of other after the import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = ctl.json(&["volume", "info", "other:private"]);
    let back = ctl.root.join("back.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(info["nbd_uri"].as_str().unwrap())
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == image,
        "other's private differs from the import"
    );
    eprintln!("daemon status answered in {status:?} while the import was held");
    ctl.ok(&["qube", "shutdown", "other"]);
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// One daemon per root: a second `daemon run` refuses at once, naming the first one's pid
/// and the root, even while the first does not answer (stopped); after the first dies by
/// SIGKILL, its stale socket does not keep a new daemon from starting.
#[test]
fn a_second_daemon_on_the_same_root_is_refused() {
    let ctl = setup();
    ctl.ok(&["daemon", "start"]);
    let pid = ctl.daemon_pid();
    // SAFETY: plain kill(2) on the pid the daemon wrote.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = std::time::Instant::now();
    let out = ctl.output(&["daemon", "run"]);
    let took = t.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon ran: {err}");
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains(&*ctl.root.to_string_lossy()),
        "the refusal names the first daemon's pid and the root: {err}"
    );
    // It refused on the lock, not after waiting out the pool lock (20 s).
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(daemons_of(&ctl.root), 1);
    ctl.ok(&["qube", "start", "work", "--hypervisor", "none"]);

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for_exit(pid);
    assert!(
        ctl.admin_socket().exists(),
        "the dead daemon's socket stays"
    );
    ctl.ok(&["daemon", "start"]);
    let list = ctl.json(&["qube", "list"]);
    let work = list
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "work");
    assert_eq!(work.unwrap()["state"], "running", "{list}");
    ctl.ok(&["qube", "shutdown", "work"]);
}

/// The admin protocol is versioned and its errors typed: a request of another version
/// gets an error of kind `protocol` naming both versions and the fix (ping and
/// daemon_stop are answered whatever the version), a failed request a `kind` a script can
/// match; and the CLI facing a daemon of an older protocol that serves qubes says so
/// instead of sending it requests it would misread.
#[test]
fn the_admin_protocol_is_versioned_and_its_errors_typed() {
    let ctl = setup();
    ctl.ok(&["daemon", "start"]);
    let sock = ctl.admin_socket();
    let ping = raw_call(&sock, r#"{"op":"ping"}"#);
    let ours = ping["ok"]["protocol"]
        .as_u64()
        .expect("the ping names the protocol");
    for (line, theirs) in [
        (r#"{"op":"qube_list"}"#.to_string(), 1),
        (
            format!(r#"{{"op":"qube_list","v":{}}}"#, ours + 1),
            ours + 1,
        ),
    ] {
        let r = raw_call(&sock, &line);
        assert_eq!(r["error"]["kind"], "protocol", "{line}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("version {ours}"))
                && msg.contains(&format!("version {theirs}"))
                && msg.contains("qubes-ctl daemon stop"),
            "{msg}"
        );
    }
    let r = raw_call(
        &sock,
        &format!(r#"{{"op":"qube_start","name":"nosuch","hypervisor":"none","v":{ours}}}"#),
    );
    assert_eq!(r["error"]["kind"], "not_found", "{r}");
    let r = raw_call(&sock, &format!(r#"{{"op":"qube_list","v":{ours}}}"#));
    assert!(r["ok"].is_array(), "{r}");
    ctl.ok(&["daemon", "stop"]);

    // A daemon from before the versioned protocol, serving a qube: its ping has no
    // "protocol" and another build.
    std::fs::create_dir_all(ctl.root.join("run")).unwrap();
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let _ = std::io::BufReader::new(&conn).read_line(&mut line);
            let reply = if line.contains(r#""op":"ping""#) {
                r#"{"ok":{"pong":true,"pid":1,"build":"0.0.1-old","served":1}}"#
            } else {
                r#"{"ok":[]}"#
            };
            let _ = conn.write_all(format!("{reply}\n").as_bytes());
        }
    });
    let err = ctl.fails(&["qube", "list"]);
    assert!(
        err.contains("version 1")
            && err.contains(&format!("version {ours}"))
            && err.contains("qubes-ctl daemon stop"),
        "{err}"
    );
}

/// What the daemon creates is its owner's alone from the start: a qube's run directory
/// is 0700 and the files in it 0600, whatever the umask of whoever started the daemon.
#[test]
fn the_daemon_creates_private_run_files() {
    let ctl = setup();
    // A permissive umask in the shell that starts the daemon must not leak into its files.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000 && exec {} --root {} daemon start",
            e2e_tests::qubes_ctl_bin().display(),
            ctl.root.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl.ok(&["qube", "start", "work", "--hypervisor", "none"]);
    let run = ctl.root.join("run/qubes/work");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700, "{}", run.display());
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        assert_eq!(
            mode(&e.path()) & 0o077,
            0,
            "{} is open to others",
            e.path().display()
        );
    }
    assert_eq!(mode(&ctl.root.join("daemon.lock")), 0o600);
    ctl.ok(&["qube", "shutdown", "work"]);
}
