//! The CLI and daemon under a hostile user's probe (issue 14) and killed creations (issue
//! 13.1): file modes, descriptors instead of paths for the daemon, imports that cannot
//! commit a cut-off stream, refusals under a running qube, a damaged superblock slot
//! reported, a broken qube that does not keep the others from being served, names that
//! fit socket paths, waiting for the pool lock, a frozen daemon, EPIPE, a full host
//! filesystem. No VM is booted (`--hypervisor none`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{pattern, stderr_of, Ctl};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A pool with a template `tpl` (4 MiB image) and an AppVM `work` whose private volume
/// is 16 MiB.
fn setup() -> Ctl {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "2G"]);
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, pattern(1, 4 * MIB)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["qube", "create", "work", "--template", "tpl"]);
    ctl.ok(&["volume", "resize", "work:private", "16M", "--allow-shrink"]);
    ctl
}

fn export(ctl: &Ctl, vol: &str) -> Vec<u8> {
    let out = ctl.root.join("export.img");
    ctl.ok(&["volume", "export", vol, out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Issue 14.1: pool files 0600 and directories 0700 from the start; an existing tree
/// with looser modes is repaired on open, with a warning. (Old code: 0644 / 0755.)
#[test]
fn pool_files_are_private_and_repaired_on_open() {
    let ctl = setup();
    let pool = ctl.root.join("pool");
    for d in [
        ctl.root.clone(),
        pool.clone(),
        ctl.root.join("run"),
        ctl.root.join("cache"),
        ctl.root.join("kernels"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in ["pool.data", "pool.meta"] {
        assert_eq!(mode(&pool.join(f)), 0o600, "{f}");
    }
    // A tree made by an older version: repaired, with a warning naming the file.
    std::fs::set_permissions(&ctl.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&pool, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        pool.join("pool.data"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = ctl.output(&["qube", "list"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("warning") && err.contains("pool.data"),
        "the repair is reported: {err}"
    );
    assert_eq!(mode(&ctl.root), 0o700);
    assert_eq!(mode(&pool), 0o700);
    assert_eq!(mode(&pool.join("pool.data")), 0o600);
    // Said once: the next command finds nothing to repair.
    let out = ctl.output(&["qube", "list"]);
    assert!(!stderr_of(&out).contains("warning"), "{}", stderr_of(&out));
}

/// Issue 14.2 and 14.12: with a daemon running, `volume export` writes through a
/// descriptor the CLI opened: `/dev/stdout` is the caller's stdout (the daemon's log is
/// untouched), files are not world-readable, `/dev/null` and a FIFO work. (Old code: the
/// daemon opened the path itself and replaced its own log with the image; /dev/null
/// failed with a bare EINVAL.)
#[test]
fn daemon_writes_exports_through_the_callers_descriptor() {
    let ctl = setup();
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    assert_eq!(started["state"], "running");
    let log = ctl.root.join("run/daemon.log");
    let log_before = std::fs::read_to_string(&log).unwrap();
    assert!(log_before.contains("pid"), "{log_before}");

    let out = ctl
        .cmd(&["volume", "export", "tpl:root", "/dev/stdout"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(out.stdout.len(), 4 * MIB, "the image went to our stdout");
    assert_eq!(out.stdout, pattern(1, 4 * MIB));
    let log_after = std::fs::read(&log).unwrap();
    assert!(
        log_after.starts_with(log_before.as_bytes()) && log_after.len() < MIB,
        "the daemon's log is untouched"
    );

    let file = ctl.root.join("out.img");
    ctl.ok(&["volume", "export", "tpl:root", file.to_str().unwrap()]);
    assert_eq!(
        mode(&file) & 0o077,
        0,
        "an exported disk is not world-readable"
    );
    assert_eq!(std::fs::read(&file).unwrap(), pattern(1, 4 * MIB));

    ctl.ok(&["volume", "export", "tpl:root", "/dev/null"]);
    let fifo = ctl.root.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    ctl.ok(&["volume", "export", "tpl:root", fifo.to_str().unwrap()]);
    assert_eq!(reader.join().unwrap(), pattern(1, 4 * MIB));

    // Template packages too: the CLI writes FILE.partial and renames it.
    let pkg = ctl.root.join("tpl.qtpl");
    ctl.ok(&["template", "export", "tpl", pkg.to_str().unwrap()]);
    ctl.ok(&[
        "template",
        "import",
        pkg.to_str().unwrap(),
        "--name",
        "copy",
    ]);
    assert_eq!(export(&ctl, "copy:root"), pattern(1, 4 * MIB));
    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.stop_daemon();
}

/// Issue 14.3 and 14.4: an import from a stream needs its size up front and must deliver
/// exactly that; a cut-off stream is refused with nothing committed. (Old code: a pipe
/// through /dev/stdin imported 0 bytes; a cut-off stdin was committed short.)
#[test]
fn stream_imports_take_the_size_first_and_refuse_short_input() {
    let ctl = setup();
    let before = export(&ctl, "work:private");
    let revs_before = ctl.json(&["volume", "info", "work:private"])["revisions"].clone();
    let data = pattern(5, 8 * MIB);
    let import = |args: &[&str], input: &[u8]| {
        let mut child = ctl
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // The CLI may refuse before reading: a broken pipe here is fine.
        let _ = stdin.write_all(input);
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    // A pipe without --size: refused, naming the way out.
    for path in ["-", "/dev/stdin"] {
        let out = import(&["volume", "import", "work:private", path], &data);
        assert!(
            !out.status.success(),
            "{path}: accepted a stream without --size"
        );
        assert!(stderr_of(&out).contains("--size"), "{}", stderr_of(&out));
    }
    // Cut off part-way: refused, the volume and its revisions as they were.
    let out = import(
        &["volume", "import", "work:private", "-", "--size", "8M"],
        &data[..3 * MIB],
    );
    assert!(!out.status.success(), "a short stream was committed");
    assert!(
        stderr_of(&out).contains("ended after"),
        "{}",
        stderr_of(&out)
    );
    // Longer than announced: refused too.
    let mut longer = data.clone();
    longer.extend_from_slice(b"more");
    let out = import(
        &[
            "volume",
            "import",
            "work:private",
            "/dev/stdin",
            "--size",
            "8M",
        ],
        &longer,
    );
    assert!(!out.status.success(), "extra input was ignored");
    assert_eq!(
        export(&ctl, "work:private"),
        before,
        "nothing was committed"
    );
    assert_eq!(
        ctl.json(&["volume", "info", "work:private"])["revisions"],
        revs_before
    );
    // The whole stream: imported, byte for byte, through a pipe and a FIFO.
    let out = import(
        &[
            "volume",
            "import",
            "work:private",
            "/dev/stdin",
            "--size",
            "8M",
        ],
        &data,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(export(&ctl, "work:private"), data);
    let fifo = ctl.root.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let data2 = pattern(6, 8 * MIB);
    let writer = {
        let (fifo, d) = (fifo.clone(), data2.clone());
        std::thread::spawn(move || std::fs::write(fifo, d).unwrap())
    };
    ctl.ok(&[
        "volume",
        "import",
        "work:private",
        fifo.to_str().unwrap(),
        "--size",
        "8M",
    ]);
    writer.join().unwrap();
    assert_eq!(export(&ctl, "work:private"), data2);
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// Issue 14.5 and 14.7: shrinking or discarding under a running qube is refused (its
/// client would lose data past the end; its running snapshot would vanish), also with
/// the daemon stopped while the qube is marked running. (Old code accepted both.)
#[test]
fn shrink_and_discard_are_refused_under_a_running_qube() {
    let ctl = setup();
    ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    let err = ctl.fails(&["volume", "resize", "work:private", "8M", "--allow-shrink"]);
    assert!(err.contains("shut it down"), "{err}");
    assert_eq!(
        ctl.json(&["volume", "info", "work:private"])["size"],
        16 * MIB as u64
    );
    let err = ctl.fails(&["volume", "discard", "work:private"]);
    assert!(err.contains("shut it down"), "{err}");
    ctl.ok(&["daemon", "stop"]);
    let err = ctl.fails(&["volume", "discard", "work:private"]);
    assert!(err.contains("shut it down"), "{err}");
    // Growing a running qube's volume stays possible.
    ctl.ok(&["volume", "resize", "work:private", "32M"]);
    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.ok(&["volume", "resize", "work:private", "8M", "--allow-shrink"]);
    ctl.stop_daemon();
}

/// Issue 14.7: a daemon that cannot serve one qube serves the others and reports that
/// one (log, `qube list`). (Old code: the daemon exited and served nobody.)
#[test]
fn one_broken_qube_does_not_keep_the_others_from_being_served() {
    let ctl = setup();
    ctl.ok(&["qube", "create", "k", "--template", "tpl"]);
    ctl.json(&["qube", "start", "k", "--hypervisor", "none"]);
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    ctl.ok(&["daemon", "stop"]);
    // k's socket path is taken by something else: it cannot be served again.
    let sock = ctl.root.join("run/qubes/k/nbd.sock");
    let _ = std::fs::remove_file(&sock);
    std::fs::write(&sock, b"not a socket").unwrap();
    ctl.ok(&["daemon", "start"]);
    let log = std::fs::read_to_string(ctl.root.join("run/daemon.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("not serving the qube") && l.contains("qube=k")),
        "{log}"
    );
    assert_eq!(ctl.state("k"), "broken");
    assert_eq!(ctl.state("work"), "running");
    let uri = started["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "private")
        .unwrap()["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x42 0 64k", "-c", "flush"])
        .arg(&uri)
        .output()
        .expect("qemu-io (install qemu-utils)");
    assert!(out.status.success(), "{}", stderr_of(&out));
    ctl.ok(&["qube", "shutdown", "work"]);
    std::fs::remove_file(&sock).unwrap();
    ctl.ok(&["qube", "shutdown", "k", "--kill"]);
    assert_eq!(ctl.state("k"), "halted");
    ctl.stop_daemon();
}

/// Issue 14.8: a template in use is not replaced by `template create` or `template
/// import` without `--replace`; with it, the old root stays as a revision. (Old code
/// replaced it silently.)
#[test]
fn an_in_use_template_is_replaced_only_when_asked() {
    let ctl = setup();
    let other = ctl.root.join("other.img");
    std::fs::write(&other, pattern(2, 64 << 10)).unwrap();
    let err = ctl.fails(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        other.to_str().unwrap(),
    ]);
    assert!(err.contains("--replace") && err.contains("work"), "{err}");
    ctl.ok(&[
        "template",
        "create",
        "t2",
        "--from-image",
        other.to_str().unwrap(),
    ]);
    let pkg = ctl.root.join("t2.qtpl");
    ctl.ok(&["template", "export", "t2", pkg.to_str().unwrap()]);
    let err = ctl.fails(&["template", "import", pkg.to_str().unwrap(), "--name", "tpl"]);
    assert!(err.contains("--replace"), "{err}");
    assert_eq!(
        ctl.json(&["template", "info", "tpl"])["root_size"],
        4 * MIB as u64,
        "the refused replacements left the root alone"
    );
    ctl.ok(&[
        "template",
        "import",
        pkg.to_str().unwrap(),
        "--name",
        "tpl",
        "--replace",
    ]);
    let info = ctl.json(&["template", "info", "tpl"]);
    assert_eq!(info["root_size"], 64 << 10);
    assert!(
        !info["revisions"].as_array().unwrap().is_empty(),
        "the old root is a revision: {info}"
    );
}

/// Issue 14.9: stdout closed early is not a panic. (Old code: "failed printing to
/// stdout", exit 101.)
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let ctl = setup();
    for i in 0..20 {
        ctl.ok(&["qube", "create", &format!("q{i}"), "--template", "tpl"]);
    }
    for args in [
        &["qube", "list"][..],
        &["qube", "create", "late", "--template", "tpl"][..],
    ] {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fds[0] is the read end we own; closing it makes writes fail with EPIPE.
        unsafe { libc::close(fds[0]) };
        // SAFETY: fds[1] is an open descriptor we own; the File takes it over.
        let w = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let out = ctl
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(w)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
    assert_eq!(ctl.state("late"), "halted", "the command did its work");
}

/// Issue 14.10: names as Qubes allows them (31 bytes, not `dom0`), and a qube with the
/// longest name starts under a long root: socket paths stay short. (Old code: 120-byte
/// names accepted; a long root made `qube start` fail on the socket path.)
#[test]
fn names_follow_qubes_and_sockets_fit_under_any_root() {
    let base = tempfile::Builder::new()
        .prefix("qc")
        .tempdir_in("/tmp")
        .unwrap();
    let root = base.path().join("r".repeat(90));
    let ctl = Ctl::at(&root);
    ctl.ok(&["pool", "init", "--size", "1G"]);
    let img = base.path().join("t.img");
    std::fs::write(&img, pattern(3, MIB)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    let err = ctl.fails(&["qube", "create", &"a".repeat(32), "--template", "tpl"]);
    assert!(err.contains("too long"), "{err}");
    let err = ctl.fails(&["qube", "create", "dom0", "--template", "tpl"]);
    assert!(err.contains("reserved"), "{err}");
    let err = ctl.fails(&["qube", "clone", "tpl", &"b".repeat(40)]);
    assert!(err.contains("too long"), "{err}");
    let name = "n".repeat(31);
    ctl.ok(&["qube", "create", &name, "--template", "tpl"]);
    let started = ctl.json(&["qube", "start", &name, "--hypervisor", "none"]);
    for v in started["volumes"].as_array().unwrap() {
        let uri = v["nbd_uri"].as_str().unwrap();
        let sock = uri.split("socket=").nth(1).unwrap();
        assert!(sock.len() <= 107, "{sock}");
        assert!(std::path::Path::new(sock).exists(), "{sock}");
    }
    ctl.ok(&["qube", "shutdown", &name]);
    ctl.stop_daemon();
    let run = root.join("run");
    let target = std::fs::read_link(&run).expect("ROOT/run points at the short run directory");
    // The root moved to a short path (copied to another machine, renamed): its `run` link
    // now points at the old path's directory, or nowhere. It must keep working. (Found
    // on real Xen: a pool prepared under a long host path failed in dom0 with
    // "creating ROOT/run: File exists".)
    std::fs::remove_dir_all(&target).unwrap();
    let short = base.path().join("s");
    std::fs::rename(&root, &short).unwrap();
    let moved = Ctl::at(&short);
    moved.ok(&["pool", "info"]);
    assert!(short.join("run").is_dir() && !short.join("run").is_symlink());
    moved.json(&["qube", "start", &name, "--hypervisor", "none"]);
    moved.ok(&["qube", "shutdown", &name]);
    moved.stop_daemon();
    drop(base);
}

/// Issue 14.11: parallel commands without a daemon wait for the pool lock; one that
/// waits too long names the holder as a plain pid. (Old code: most failed at once with
/// "pid Some(N)".)
#[test]
fn parallel_commands_wait_for_the_pool_lock() {
    let ctl = setup();
    let children: Vec<_> = (0..12)
        .map(|i| {
            ctl.cmd(&["qube", "create", &format!("p{i}"), "--template", "tpl"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    // tpl, work and the twelve.
    assert_eq!(ctl.json(&["qube", "list"]).as_array().unwrap().len(), 14);

    // We hold the lock, as another qubes-ctl would.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctl.root.join("pool/lock"))
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    // SAFETY: flock(2) on a descriptor we own, open for the whole call.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0);
    std::fs::write(ctl.root.join("pool/lock"), std::process::id().to_string()).unwrap();
    let out = ctl
        .cmd(&["qube", "list"])
        .env("QUBES_CTL_LOCK_TIMEOUT", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("process {}", std::process::id())) && !err.contains("Some("),
        "{err}"
    );
    drop(lock);
    ctl.ok(&["qube", "list"]);
}

/// Issue 14.12: a stopped (SIGSTOP) daemon does not hang the CLI: it fails in bounded
/// time naming the daemon's pid. (Old code waited forever.)
#[test]
fn a_frozen_daemon_is_named_not_waited_for() {
    let ctl = setup();
    ctl.ok(&["daemon", "start"]);
    let pid = ctl.daemon_pid();
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut child = ctl
        .cmd(&["qube", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    let status = status.expect("the CLI hung on a stopped daemon");
    assert!(!status.success());
    let err = stderr_of(&out);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    ctl.stop_daemon();
}

/// The other side of a frozen daemon: one busy with a long request (here an import
/// waiting for its input) still answers `daemon status`, so it is not taken for frozen.
#[test]
fn a_busy_daemon_still_answers() {
    let ctl = setup();
    ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    ctl.ok(&["qube", "create", "idle", "--template", "tpl"]);
    let mut import = ctl
        .cmd(&["volume", "import", "idle:private", "-", "--size", "1M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon now holds its controller, reading our (still empty) pipe.
    std::thread::sleep(Duration::from_secs(1));
    let mut status = ctl
        .cmd(&["--format", "json", "daemon", "status"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while status.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered = status.try_wait().unwrap().is_some();
    if !answered {
        let _ = status.kill();
    }
    let mut stdin = import.stdin.take().unwrap();
    stdin.write_all(&pattern(8, MIB)).unwrap();
    drop(stdin);
    let out = import.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(answered, "daemon status hung on a busy daemon");
    let v: Value = serde_json::from_slice(&status.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(v["daemon"], "running", "{v}");
    assert_eq!(v["qubes_served"], 1, "{v}");
    assert_eq!(export(&ctl, "idle:private"), pattern(8, MIB));
    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.stop_daemon();
}

/// Issue 14.12: empty images are not templates; errors do not repeat themselves.
#[test]
fn empty_images_are_refused_and_errors_say_things_once() {
    let ctl = setup();
    let empty = ctl.root.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    for img in [empty.to_str().unwrap(), "/proc/self/status"] {
        let err = ctl.fails(&["template", "create", "e", "--from-image", img]);
        assert!(err.contains("empty"), "{img}: {err}");
    }
    assert!(ctl
        .fails(&["template", "info", "e"])
        .contains("does not exist"));
    for args in [
        &["volume", "export", "nosuch:private", "/dev/null"][..],
        &["volume", "revert", "work:root"][..],
        &["qube", "remove", "tpl"][..],
        &["template", "create", "x", "--from-image", "/nonexistent"][..],
    ] {
        let err = ctl.fails(args);
        let msg = err.trim().trim_start_matches("qubes-ctl: error: ");
        let parts: Vec<&str> = msg.split(": ").collect();
        for w in parts.windows(2) {
            assert_ne!(w[0], w[1], "{args:?} repeats itself: {err}");
        }
        for (i, p) in parts.iter().enumerate() {
            if p.len() > 12 {
                assert!(
                    !parts[i + 1..].iter().any(|q| q == p),
                    "{args:?} says {p:?} twice: {err}"
                );
            }
        }
    }
}

/// Issue 14.6: one damaged superblock slot: the pool opens on the other one and says so
/// (stderr, `pool info`), `pool verify` reports the slot; with both damaged the error
/// names a real way out. (Old code: silent fallback, "clean"; both bad: "run pool
/// verify", which failed the same way.)
#[test]
fn a_damaged_superblock_slot_is_reported() {
    let ctl = setup();
    let gen = ctl.json(&["pool", "info"])["generation"].as_u64().unwrap();
    let pool = ctl.root.join("pool");
    let copy = |name: &str| {
        let r = ctl.root.join(name);
        std::fs::create_dir_all(r.join("pool")).unwrap();
        for f in ["pool.meta", "pool.data"] {
            let st = Command::new("cp")
                .arg("--sparse=always")
                .arg(pool.join(f))
                .arg(r.join("pool").join(f))
                .status()
                .unwrap();
            assert!(st.success());
        }
        Ctl::at(&r)
    };
    let flip = |c: &Ctl, offset: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(c.root.join("pool/pool.meta"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x56], offset).unwrap();
    };
    let slot0 = copy("s0");
    flip(&slot0, 3224);
    let slot1 = copy("s1");
    flip(&slot1, 4096 + 3224);
    let mut fell_back = 0;
    for c in [&slot0, &slot1] {
        let out = c.output(&["--format", "json", "pool", "info"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        let g = info["generation"].as_u64().unwrap();
        if g < gen {
            fell_back += 1;
            assert!(
                info["warnings"].to_string().contains("superblock"),
                "{info}"
            );
            assert!(
                stderr_of(&out).contains("superblock"),
                "{}",
                stderr_of(&out)
            );
        }
        // The commit in use is sound; the damaged slot is a warning.
        let out = c.output(&["pool", "verify"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("clean, with warnings") && text.contains("warning: superblock slot"),
            "verify calls a damaged slot clean: {text}"
        );
    }
    assert_eq!(fell_back, 1, "exactly one slot holds the newest commit");
    let both = copy("both");
    flip(&both, 3224);
    flip(&both, 4096 + 3224);
    let err = both.fails(&["pool", "info"]);
    assert!(err.contains("Restore pool.meta"), "{err}");
    assert!(!err.contains("run `qubes-ctl pool verify`"), "{err}");
}

/// Issue 13.1: a `template create` killed at any instant leaves the template absent or
/// complete, never an empty usable one. (Old code: about half the kills left a template
/// with an empty root and no fingerprint that qubes could be created on.)
#[test]
fn a_killed_template_create_leaves_nothing_half_made() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "2G"]);
    let img = ctl.root.join("big.img");
    std::fs::write(&img, pattern(7, 64 * MIB)).unwrap();
    // Kills spread over twice the time a whole create takes: some land inside it.
    let t0 = Instant::now();
    ctl.ok(&[
        "template",
        "create",
        "ref",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    let whole = t0.elapsed();
    let mut complete = 0;
    for i in 0..12u64 {
        let name = format!("t{i}");
        let mut child = ctl
            .cmd(&[
                "template",
                "create",
                &name,
                "--from-image",
                img.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole * (i as u32 + 1) / 6);
        let _ = child.kill();
        let _ = child.wait();
        let list = ctl.json(&["template", "list"]);
        if let Some(t) = list.as_array().unwrap().iter().find(|t| t["name"] == name) {
            assert_eq!(t["size"], 64 * MIB as u64, "half-made template: {t}");
            assert_eq!(t["fingerprint"].as_str().unwrap().len(), 64, "{t}");
            complete += 1;
        } else {
            let err = ctl.fails(&["qube", "create", "k", "--template", &name]);
            assert!(err.contains("does not exist"), "{err}");
        }
    }
    eprintln!("{complete} of 12 killed creates had completed (a whole one: {whole:?})");
    assert!(complete < 12, "no kill landed inside a create");
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// Runs `args(i)` `rounds` times, each killed with SIGKILL after a delay spread over
/// twice `whole` (the time an uninterrupted run takes), then calls `check(i)`.
fn kill_rounds(
    ctl: &Ctl,
    rounds: u32,
    whole: Duration,
    args: impl Fn(u32) -> Vec<String>,
    mut check: impl FnMut(u32),
) {
    for i in 0..rounds {
        let a = args(i);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut child = ctl
            .cmd(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole * (i + 1) / (rounds / 2));
        let _ = child.kill();
        let _ = child.wait();
        check(i);
    }
}

/// Issue 13.1's sweep, for the other operations that make a new object: a killed
/// `template import` leaves the template absent or whole (its fingerprint the
/// package's), and a killed `qube clone` leaves the clone absent (its name free again,
/// no volume left behind) or whole (every volume at its size). The pool verifies clean
/// after every round.
#[test]
fn killed_imports_and_clones_leave_nothing_half_made() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "2G"]);
    let img = ctl.root.join("big.img");
    std::fs::write(&img, pattern(11, 64 * MIB)).unwrap();
    let img = img.to_str().unwrap().to_string();
    ctl.ok(&["template", "create", "ref", "--from-image", &img]);
    let list = ctl.json(&["template", "list"]);
    let fingerprint = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ref")
        .unwrap()["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fingerprint.len(), 64, "{list}");
    let pkg = ctl.root.join("ref.qtpl");
    let pkg = pkg.to_str().unwrap().to_string();
    ctl.ok(&["template", "export", "ref", &pkg]);

    // template import
    let t0 = Instant::now();
    ctl.ok(&["template", "import", &pkg, "--name", "whole"]);
    let whole = t0.elapsed();
    let mut complete = 0;
    kill_rounds(
        &ctl,
        10,
        whole,
        |i| {
            ["template", "import", &pkg, "--name", &format!("i{i}")]
                .map(String::from)
                .to_vec()
        },
        |i| {
            let name = format!("i{i}");
            let list = ctl.json(&["template", "list"]);
            if let Some(t) = list.as_array().unwrap().iter().find(|t| t["name"] == name) {
                assert_eq!(t["size"], 64 * MIB as u64, "half-imported template: {t}");
                assert_eq!(t["fingerprint"], fingerprint.as_str(), "{t}");
                complete += 1;
            } else {
                let err = ctl.fails(&["qube", "create", "k", "--template", &name]);
                assert!(err.contains("does not exist"), "{err}");
            }
            assert_eq!(
                ctl.json(&["pool", "verify"])["clean"],
                true,
                "after import {i}"
            );
        },
    );
    eprintln!("{complete} of 10 killed imports had completed (a whole one: {whole:?})");
    assert!(complete < 10, "no kill landed inside an import");

    // qube clone of a StandaloneVM whose root and private are written
    ctl.ok(&[
        "qube",
        "create",
        "src",
        "--class",
        "StandaloneVM",
        "--template",
        "ref",
    ]);
    let src_vols = ctl.json(&["volume", "list", "src"]);
    let sizes: Vec<(String, Value)> = src_vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let n = v["name"].as_str().unwrap();
            (n.to_string(), v["size"].clone())
        })
        .collect();
    assert!(!sizes.is_empty(), "{src_vols}");
    let t0 = Instant::now();
    ctl.ok(&["qube", "clone", "src", "whole-clone"]);
    let whole = t0.elapsed();
    kill_rounds(
        &ctl,
        10,
        whole,
        |i| {
            ["qube", "clone", "src", &format!("c{i}")]
                .map(String::from)
                .to_vec()
        },
        |i| {
            let name = format!("c{i}");
            let qubes = ctl.json(&["qube", "list"]);
            let present = qubes.as_array().unwrap().iter().any(|q| q["name"] == name);
            if present {
                let vols = ctl.json(&["volume", "list", &name]);
                for (v, size) in &sizes {
                    let got = vols
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|x| x["name"] == v.as_str())
                        .unwrap_or_else(|| panic!("clone {name} lacks {v}: {vols}"));
                    assert_eq!(&got["size"], size, "{got}");
                }
            } else {
                let all = ctl.json(&["volume", "list"]);
                assert!(
                    !all.as_array().unwrap().iter().any(|x| x["qube"] == name),
                    "a killed clone {name} left volumes: {all}"
                );
                ctl.ok(&["qube", "clone", "src", &name]);
            }
            assert_eq!(
                ctl.json(&["pool", "verify"])["clean"],
                true,
                "after clone {i}"
            );
        },
    );
}

/// Issue 13.3 (CLI) and 14.13: on a small host filesystem, `pool init` warns about a
/// capacity larger than the free space, `pool info` shows the free space and warns, and
/// `qube start` is refused below the safety margin with the way out. Needs root (mounts
/// a tmpfs); skipped otherwise.
#[test]
fn a_nearly_full_host_filesystem_is_seen_from_the_cli() {
    let base = tempfile::Builder::new()
        .prefix("qc")
        .tempdir_in("/tmp")
        .unwrap();
    let mnt = base.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let ctl = Ctl::at(&mnt.join("r"));
    let out = ctl.output(&["pool", "init", "--size", "1G"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("more than"), "{}", stderr_of(&out));
    let img = base.path().join("t.img");
    std::fs::write(&img, pattern(4, MIB)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["qube", "create", "work", "--template", "tpl"]);
    let info = ctl.json(&["pool", "info"]);
    let free = info["host_free"].as_u64().unwrap();
    assert!(free > 128 << 20 && free <= 400 << 20, "{info}");
    assert!(info["warning"].is_string(), "under 1 GiB free: {info}");
    // Fill the filesystem to leave less than the start margin.
    let filler = mnt.join("filler");
    let keep = 64u64 << 20;
    let st = Command::new("fallocate")
        .args(["-l", &(free - keep).to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(st.success());
    let err = ctl.fails(&["qube", "start", "work", "--hypervisor", "none"]);
    assert!(
        err.contains("safety margin") && err.contains("Free space"),
        "{err}"
    );
    assert_eq!(ctl.state("work"), "halted");
    std::fs::remove_file(&filler).unwrap();
    ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.stop_daemon();
}

/// Issue 14.2, template builds: the CLI resolves the recipe (its `extends` chain and the
/// files it installs) and hands the result and descriptors to the daemon, which opens no
/// path the client named. The recipe lives in a mount only the CLI's mount namespace
/// sees; the build then fails at the bootstrap (a mirror on a closed port), after the
/// daemon got everything it needs. (Old code: the daemon opened the recipe by path and
/// failed with "reading recipe ...: No such file or directory".)
#[test]
fn template_builds_send_the_resolved_recipe_not_its_path() {
    let ctl = setup();
    ctl.ok(&["daemon", "start"]);
    let src = ctl.root.join("recipe-src");
    let seen = ctl.root.join("recipes");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&seen).unwrap();
    std::fs::write(
        src.join("base.toml"),
        "name = \"hidden\"\ndistribution = \"debian\"\nrelease = \"bookworm\"\n\
         image_size = \"64M\"\n\
         files = [{ src = \"motd\", dest = \"/etc/motd\" }]\n",
    )
    .unwrap();
    std::fs::write(src.join("motd"), b"only the client can see this\n").unwrap();
    std::fs::write(
        src.join("child.toml"),
        "extends = \"base.toml\"\npackages = [\"less\"]\n",
    )
    .unwrap();
    let script = format!(
        "mount --bind {} {} && exec {} --root {} template build {}/child.toml --mirror http://127.0.0.1:9/debian",
        src.display(),
        seen.display(),
        e2e_tests::qubes_ctl_bin().display(),
        ctl.root.display(),
        seen.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(
        !out.status.success(),
        "the bootstrap cannot reach the mirror"
    );
    assert!(
        !err.contains("No such file") && !err.contains("reading recipe"),
        "the daemon must not open the recipe or its files by path: {err}"
    );
    assert!(
        std::fs::read_dir(&seen).unwrap().next().is_none(),
        "the recipe is only visible to the CLI"
    );
    let log = std::fs::read_to_string(ctl.root.join("run/daemon.log")).unwrap_or_default();
    assert!(
        err.contains("mmdebstrap") || err.contains("bootstrap") || log.contains("bootstrap"),
        "the build got as far as the bootstrap: {err}"
    );
    ctl.stop_daemon();
}

/// Issue 14.10: a failed `qube start` leaves no `run/qubes/NAME/` behind, a later start
/// works, and a failed start of a running qube leaves its run directory alone. (Old code:
/// the directory stayed after the failure.)
#[test]
fn a_failed_start_leaves_no_run_directory() {
    let ctl = setup();
    let run = ctl.root.join("run/qubes/work");
    let out = ctl
        .cmd(&["qube", "start", "work", "--hypervisor", "qemu"])
        .env("QUBES_QEMU", "/nonexistent/qemu-system-x86_64")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "QEMU is missing");
    assert!(
        !run.exists(),
        "{} was left behind by a failed start ({})",
        run.display(),
        stderr_of(&out)
    );
    let started = ctl.json(&["qube", "start", "work", "--hypervisor", "none"]);
    assert_eq!(started["state"], "running");
    assert!(run.is_dir(), "{}", run.display());
    ctl.fails(&["qube", "start", "work", "--hypervisor", "none"]);
    assert!(run.is_dir(), "a running qube keeps its run directory");
    ctl.ok(&["qube", "shutdown", "work"]);
    ctl.stop_daemon();
}
