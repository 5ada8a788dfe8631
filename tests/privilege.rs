//! Least privilege of the QEMU backend, end to end through the daemon: each running
//! qube's QEMU is a user of its own, without root's rights or a way back to them, and
//! its NBD socket is that user's alone, so one qube's QEMU cannot even connect to
//! another qube's disks. The guests need not boot for this (their disks hold no
//! bootloader: the firmware reads them over NBD and waits), so the test takes ~15 s.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e_tests::{pattern, proc_status, wait_for, Ctl};

fn status_ids(pid: i32, field: &str) -> Vec<u32> {
    proc_status(pid, field)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

fn qemu_pid(run: &Path) -> i32 {
    std::fs::read_to_string(run.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Connects to `socket` (relative to `cwd`) as `uid`/`gid` with no supplementary
/// groups, in a forked child (the test process keeps root), and reads the NBD
/// server's greeting. `Err(errno)` when the connection is refused.
fn connect_as(uid: u32, gid: u32, cwd: &Path, socket: &str) -> Result<(), i32> {
    let path = CString::new(socket).unwrap();
    let mut cmd = Command::new("/bin/true");
    cmd.current_dir(cwd);
    // SAFETY: runs in the forked child before exec; only async-signal-safe calls
    // (setgroups, setres[ug]id, socket, connect, read, close) on memory prepared
    // before the fork; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setresgid(gid, gid, gid) < 0
                || libc::setresuid(uid, uid, uid) < 0
            {
                return fail();
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return fail();
            }
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = path.as_bytes();
            for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len as u32) < 0 {
                return fail();
            }
            let mut magic = [0u8; 8];
            let n = libc::read(fd, magic.as_mut_ptr().cast(), 8);
            libc::close(fd);
            if n != 8 || &magic != b"NBDMAGIC" {
                return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
            }
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut c) => {
            assert!(c.wait().unwrap().success());
            Ok(())
        }
        Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
    }
}

#[test]
fn each_qemu_is_its_own_user_and_reaches_only_its_own_disks() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "2G"]);
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, pattern(3, 4 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    for q in ["qa", "qb"] {
        ctl.ok(&["qube", "create", q, "--template", "tpl"]);
        ctl.ok(&["qube", "prefs", q, "kernel", "none"]);
        ctl.ok(&["qube", "prefs", q, "memory", "128"]);
        ctl.ok(&["qube", "prefs", q, "maxmem", "128"]);
    }
    // TCG: this host's /dev/kvm may hang guests, and the KVM probe is not under test.
    let daemon = ctl
        .cmd(&["daemon", "start"])
        .env("QUBES_QEMU_ACCEL", "tcg")
        .output()
        .unwrap();
    assert!(
        daemon.status.success(),
        "{}",
        String::from_utf8_lossy(&daemon.stderr)
    );
    for q in ["qa", "qb"] {
        ctl.ok(&["qube", "start", q, "--hypervisor", "qemu"]);
    }
    let run = |q: &str| -> PathBuf { ctl.root.join("run/qubes").join(q) };
    let (pa, pb) = (qemu_pid(&run("qa")), qemu_pid(&run("qb")));

    // (a) Each QEMU runs as its own unprivileged user, real, effective, saved and
    // filesystem ids alike, without supplementary groups or capabilities, under a
    // seccomp filter.
    let uid_a = status_ids(pa, "Uid");
    let uid_b = status_ids(pb, "Uid");
    for (pid, uids) in [(pa, &uid_a), (pb, &uid_b)] {
        assert_eq!(uids.len(), 4);
        assert!(
            uids.iter().all(|u| *u == uids[0]),
            "pid {pid}: Uid {uids:?}"
        );
        assert_ne!(uids[0], 0, "QEMU pid {pid} runs as root");
        let gids = status_ids(pid, "Gid");
        assert!(gids.iter().all(|g| *g == gids[0] && *g != 0), "{gids:?}");
        assert!(
            status_ids(pid, "Groups").is_empty(),
            "pid {pid} keeps groups"
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains("CapEff:\t0000000000000000"),
            "pid {pid}: {status}"
        );
        assert!(
            status.contains("Seccomp:\t2"),
            "pid {pid}: no seccomp filter"
        );
    }
    assert_ne!(uid_a[0], uid_b[0], "two running qubes share a QEMU uid");
    let (ua, ub) = (uid_a[0], uid_b[0]);
    let ga = status_ids(pa, "Gid")[0];

    // (b) qb's NBD socket is qb's QEMU user's alone, and so is its run dir.
    let sock_b = std::fs::symlink_metadata(run("qb").join("nbd.sock")).unwrap();
    assert_eq!(sock_b.uid(), ub);
    assert_eq!(sock_b.mode() & 0o777, 0o600, "mode {:o}", sock_b.mode());
    let dir_b = std::fs::metadata(run("qb")).unwrap();
    assert_eq!((dir_b.uid(), dir_b.mode() & 0o777), (ub, 0o700));

    // (c) As qa's QEMU user: refused on qb's socket, served on its own (the path
    // QEMU itself uses, from its run dir).
    assert_eq!(
        connect_as(ua, ga, &run("qa"), "../qb/nbd.sock"),
        Err(libc::EACCES)
    );
    assert_eq!(connect_as(ua, ga, &run("qa"), "nbd.sock"), Ok(()));
    // Even with the way through qb's directory open, the socket's own mode refuses.
    let chmod =
        |mode| std::fs::set_permissions(run("qb"), std::fs::Permissions::from_mode(mode)).unwrap();
    chmod(0o711);
    assert_eq!(
        connect_as(ua, ga, &run("qa"), "../qb/nbd.sock"),
        Err(libc::EACCES)
    );
    chmod(0o700);

    // A qube of another root on the same host gets yet another uid.
    let other = Ctl::new();
    other.ok(&["pool", "init", "--size", "1G"]);
    other.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    other.ok(&["qube", "prefs", "tpl", "memory", "128"]);
    other.ok(&["qube", "prefs", "tpl", "maxmem", "128"]);
    let started = other
        .cmd(&["qube", "start", "tpl", "--hypervisor", "qemu"])
        .env("QUBES_QEMU_ACCEL", "tcg")
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let uo = status_ids(qemu_pid(&other.root.join("run/qubes/tpl")), "Uid")[0];
    assert!(uo != ua && uo != ub, "another root's QEMU shares uid {uo}");
    other.ok(&["qube", "shutdown", "tpl", "--kill"]);

    // (d) Both QEMUs opened their disks as their users (QEMU exits when a -blockdev
    // cannot connect) and still run; a restarted daemon gives qb its socket again.
    ctl.ok(&["daemon", "stop"]);
    let daemon = ctl
        .cmd(&["daemon", "start"])
        .env("QUBES_QEMU_ACCEL", "tcg")
        .output()
        .unwrap();
    assert!(daemon.status.success());
    wait_for(
        "qb's NBD socket served again",
        Duration::from_secs(30),
        || std::fs::symlink_metadata(run("qb").join("nbd.sock")).is_ok_and(|m| m.uid() == ub),
    );
    assert_eq!(connect_as(ub, ub, &run("qb"), "nbd.sock"), Ok(()));
    for (q, pid) in [("qa", pa), ("qb", pb)] {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{q}'s QEMU ended: {}",
            std::fs::read_to_string(run(q).join("qemu.log")).unwrap_or_default()
        );
        ctl.ok(&["qube", "shutdown", q, "--kill"]);
    }
    // A stopped qube's id is free again: qb starts anew, with an id of the range.
    ctl.ok(&["qube", "start", "qb", "--hypervisor", "qemu"]);
    let again = status_ids(qemu_pid(&run("qb")), "Uid")[0];
    assert!(again >= 0x7000_0000 && again != 0, "{again}");
    ctl.ok(&["qube", "shutdown", "qb", "--kill"]);
}

fn cap_mask(status: &str, field: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// The daemon gives up, in every thread and for every program it runs, the
/// capabilities it never needs, and keeps the ones its storage, Xen and QEMU paths do.
#[test]
fn the_daemon_drops_capabilities_it_never_needs() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "1G"]);
    let img = ctl.root.join("tpl.img");
    std::fs::write(&img, pattern(4, 1 << 20)).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    ctl.ok(&["daemon", "start"]);
    // A qube served: the daemon's NBD threads exist too.
    ctl.ok(&["qube", "start", "tpl", "--hypervisor", "none"]);
    let pid = ctl.daemon_pid();
    // capability(7) numbers.
    let (sys_module, sys_rawio, sys_admin, sys_boot, sys_time, dac_override, setuid, ptrace) =
        (16, 17, 21, 22, 25, 1, 7, 19);
    let mut tasks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        for field in ["CapBnd", "CapPrm", "CapEff"] {
            let m = cap_mask(&status, field);
            for (name, bit) in [
                ("SYS_MODULE", sys_module),
                ("SYS_BOOT", sys_boot),
                ("SYS_TIME", sys_time),
            ] {
                assert_eq!(
                    m >> bit & 1,
                    0,
                    "task {:?} {field} keeps CAP_{name}: {m:x}",
                    t.file_name()
                );
            }
            for (name, bit) in [
                ("SYS_ADMIN", sys_admin),
                ("SYS_RAWIO", sys_rawio),
                ("DAC_OVERRIDE", dac_override),
                ("SETUID", setuid),
                ("SYS_PTRACE", ptrace),
            ] {
                assert_eq!(
                    m >> bit & 1,
                    1,
                    "task {:?} {field} lost CAP_{name}: {m:x}",
                    t.file_name()
                );
            }
        }
        tasks += 1;
    }
    assert!(
        tasks > 1,
        "only {tasks} task: the daemon's threads were not checked"
    );
    ctl.ok(&["qube", "shutdown", "tpl"]);
}
