//! The dom0 side of the blkif steps of `tests/xen.rs`: `work`'s disks come from the
//! daemon's userspace blkif backend (the default Xen disk path), the devices open and
//! close cleanly in xenstore, a SIGKILLed daemon's successor takes the running rings
//! over, and the kernel-NBD fallback still attaches.
//!
//! The guest's side is a tick loop that [`super::RC_LOCAL`] starts when the qube stays
//! up: every 2 s it drops its page cache, reads `/rw/tick` back from the disk, checks it
//! holds the previous tick (`ok`, else `LOST`), writes the next one and `sync`s, then
//! prints `QTICK n prev=p ok` on its console. A tick printed before the daemon is killed
//! was flushed; reading it back after the restart goes through the new daemon.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{wait_for, Ctl};

/// Where the daemon's blkif devices live in xenstore.
const BACKEND_DIR: &str = "/local/domain/0/backend/qubes-vbd";
/// xvda, xvdb, xvdc (root, private, volatile) as xenbus device ids.
const DEVIDS: [&str; 3] = ["51712", "51728", "51744"];

fn xenstore(args: &[&str]) -> Option<String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", args[0]));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn list(path: &str) -> Vec<String> {
    let mut v: Vec<String> = xenstore(&["xenstore-list", path])
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

pub fn read(path: &str) -> Option<String> {
    xenstore(&["xenstore-read", path])
}

pub fn domid(qube: &str) -> u32 {
    let (ok, out) = super::xl(&["domid", qube]);
    assert!(ok, "xl domid {qube}: {out}");
    out.trim().parse().unwrap()
}

/// The running `qube`'s three disks are ours: backend nodes under qubes-vbd, backend and
/// frontend Connected, nothing under the kernel's vbd type, no NBD device attached.
pub fn assert_served_by_blkif(qube: &str) -> u32 {
    let d = domid(qube);
    assert_eq!(
        super::attached_nbd_devices(),
        Vec::<String>::new(),
        "no /dev/nbd* may be attached: the disks come from the daemon's blkif backend"
    );
    assert_eq!(
        list(&format!("{BACKEND_DIR}/{d}")),
        DEVIDS.to_vec(),
        "the backend nodes of root, private, volatile"
    );
    for dev in DEVIDS {
        let be = format!("{BACKEND_DIR}/{d}/{dev}");
        assert_eq!(read(&format!("{be}/state")).as_deref(), Some("4"), "{be}");
        let fe = format!("/local/domain/{d}/device/vbd/{dev}");
        assert_eq!(read(&format!("{fe}/state")).as_deref(), Some("4"), "{fe}");
        assert_eq!(read(&format!("{fe}/backend")), Some(be.clone()));
    }
    assert_eq!(
        list(&format!("/local/domain/0/backend/vbd/{d}")),
        Vec::<String>::new(),
        "the kernel's blkback serves nothing for {qube}"
    );
    assert!(
        !Command::new("pgrep")
            .args(["-x", "qemu-nbd"])
            .status()
            .unwrap()
            .success(),
        "no qemu-nbd runs"
    );
    d
}

/// The daemon's log lines about blkif state changes of backend `be`, as the states.
fn logged_states(log: &str, be: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("blkif backend state") && l.contains(&format!("{be}\"")))
        .filter_map(|l| {
            l.split("state=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn daemon_log(root: &Path) -> String {
    std::fs::read(root.join("run/daemon.log"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// After `qube shutdown`: every device went Closing then Closed (5 -> 6) after being
/// Connected, and its nodes are gone.
pub fn assert_closed_cleanly(root: &Path, domid: u32) {
    let log = daemon_log(root);
    for dev in DEVIDS {
        let be = format!("{BACKEND_DIR}/{domid}/{dev}");
        // Exactly one Closed: the domain's directory vanishing after the frontend
        // closed wrote a second one (found by this test).
        let states = logged_states(&log, &be);
        let tail: Vec<u32> = states.iter().rev().take(2).rev().copied().collect();
        assert!(
            states.contains(&4) && tail == [5, 6],
            "{be} must have been Connected and closed 5 -> 6, the daemon logged {states:?}"
        );
    }
    assert_eq!(
        list(&format!("{BACKEND_DIR}/{domid}")),
        Vec::<String>::new(),
        "the backend nodes are removed after the shutdown"
    );
    assert_eq!(
        list(&format!("/local/domain/{domid}/device/vbd")),
        Vec::<String>::new()
    );
}

/// The `QTICK n prev=p s` lines of the console so far.
fn ticks(console: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read(console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("QTICK ")?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            Some((n, rest.trim().to_string()))
        })
        .collect()
}

fn last_tick(console: &Path) -> u64 {
    ticks(console).last().map_or(0, |t| t.0)
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            // A zombie (state Z) is dead: its descriptors and mappings are gone.
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// SIGKILLs the daemon while `qube` runs and its guest writes; a new daemon takes the
/// rings over; the tick the guest flushed last before the kill is read back from the
/// disk after it, and the guest's I/O goes on. Returns the last tick seen.
pub fn daemon_restart(ctl: &Ctl, root: &Path, qube: &str, console: &Path) -> u64 {
    wait_for("the guest's tick loop", Duration::from_secs(300), || {
        last_tick(console) >= 2
    });
    let pid: i32 = std::fs::read_to_string(root.join("run/daemon.pid"))
        .expect("the daemon's pid file")
        .trim()
        .parse()
        .unwrap();
    let before = last_tick(console);
    // SAFETY: kill(2) on the daemon's pid, read from its own pid file just now.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}");
    wait_for("the daemon to die", Duration::from_secs(60), || {
        !pid_alive(pid)
    });
    let killed = Instant::now();
    let flushed = last_tick(console);
    println!("daemon {pid} SIGKILLed after tick {before} (tick {flushed} flushed by then)");
    // The guest's next sync has nobody to answer it: its writes wait.
    std::thread::sleep(Duration::from_secs(6));
    let stalled = last_tick(console);
    assert!(
        stalled <= flushed + 1,
        "the guest went on writing ({flushed} -> {stalled}) with no backend"
    );
    ctl.ok(&["daemon", "start"]);
    let want = stalled + 3;
    wait_for(
        "the guest's ticks to go on after the daemon restart",
        Duration::from_secs(300),
        || last_tick(console) >= want,
    );
    println!(
        "guest I/O resumed: tick {} {:.0?} after the kill",
        last_tick(console),
        killed.elapsed()
    );
    let all = ticks(console);
    let bad: Vec<&(u64, String)> = all.iter().filter(|t| !t.1.ends_with(" ok")).collect();
    assert!(bad.is_empty(), "ticks not read back from the disk: {bad:?}");
    let after_kill = all
        .iter()
        .find(|t| t.0 == flushed + 1)
        .expect("the first tick written after the kill");
    assert!(
        after_kill.1.contains(&format!("prev={flushed} ")),
        "the tick flushed before the kill is on the disk: {after_kill:?}"
    );
    let log = daemon_log(root);
    let again = log.matches("blkif ring connected again").count();
    assert!(
        again >= 3,
        "the new daemon must take over the three rings ({again} logged)"
    );
    let d = assert_served_by_blkif(qube);
    println!("domain {d}: disks served by the restarted daemon");
    last_tick(console)
}

/// The tick file on the private volume (exported after the shutdown) holds at least
/// the tick seen last while the qube ran: the writes reached the pool.
pub fn assert_ticks_persisted(private_img: &Path, seen: u64) {
    let tick: u64 = super::ext4_cat(private_img, "/tick")
        .expect("/tick in the private volume")
        .parse()
        .unwrap();
    assert!(
        tick >= seen,
        "the private volume holds tick {tick}, the guest had flushed {seen}"
    );
}

/// `QUBES_XEN_DISKS=nbd` still gives `qube` kernel-NBD disks: a daemon started with it
/// attaches three /dev/nbd* to the kernel's blkback (`backend/vbd`); the domain is
/// killed at once (a boot costs minutes) and the devices detached. Leaves no daemon.
pub fn nbd_fallback(ctl: &Ctl, qube: &str) {
    ctl.ok(&["daemon", "stop"]);
    let out = ctl
        .cmd(&["qube", "start", qube, "--hypervisor", "xen"])
        .env("QUBES_XEN_DISKS", "nbd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qube start with QUBES_XEN_DISKS=nbd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = domid(qube);
    assert_eq!(super::attached_nbd_devices().len(), 3, "three /dev/nbd*");
    assert_eq!(
        list(&format!("/local/domain/0/backend/vbd/{d}")),
        DEVIDS.to_vec(),
        "the kernel's blkback serves the NBD devices"
    );
    assert_eq!(list(&format!("{BACKEND_DIR}/{d}")), Vec::<String>::new());
    ctl.ok(&["qube", "shutdown", qube, "--kill"]);
    assert_eq!(ctl.state(qube), "halted");
    assert_eq!(
        super::attached_nbd_devices(),
        Vec::<String>::new(),
        "NBD devices detached after the kill"
    );
    ctl.ok(&["daemon", "stop"]);
}
