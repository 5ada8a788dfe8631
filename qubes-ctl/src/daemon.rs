//! `qubes-ctl daemon`: owns the pool while qubes run. It holds the pool lock, serves each
//! running qube's volumes on that qube's own NBD socket, answers the CLI on the admin
//! socket (0600, one JSON request and one JSON reply per connection), and watches the
//! domains: when a guest powers itself off, its storage is stopped as Qubes does on domain
//! death (private committed, root and volatile snapshots dropped).
//!
//! A daemon killed with SIGKILL leaves the pool at its last commit (every flush is a
//! commit) with the running qubes still marked running; the next daemon serves them again
//! at the same socket paths, so QEMU's `reconnect-delay` carries the guests across.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::{self, Reply, Request};
use crate::controller::Controller;
use crate::paths::Paths;

type Shared = Arc<Controller>;

/// How many qubes this daemon serves, for pings answered without the controller.
static SERVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

static STARTED: OnceLock<Instant> = OnceLock::new();
static ADMIN_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How long this process has served as the daemon (`None` outside the daemon).
pub fn uptime() -> Option<Duration> {
    STARTED.get().map(|t| t.elapsed())
}

/// Admin requests this daemon has answered.
pub fn admin_requests() -> u64 {
    ADMIN_REQUESTS.load(Ordering::Relaxed)
}

pub fn run(paths: &Paths) -> Result<()> {
    // Everything the daemon and the QEMUs it starts create (sockets, logs, pid files,
    // run directories) is its owner's alone from the start, with no window before a
    // chmod: others may not even connect to a qube's console or QMP socket.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // First, while this is the process's only thread (capability sets are per thread;
    // threads started later inherit the reduced ones).
    drop_capabilities();
    paths.secure()?;
    // Before anything else (the log, the pool, the socket): a second daemon on this
    // root stops here, even if the first one does not answer (stopped, hung).
    let lock = take_daemon_lock(paths)?;
    crate::logging::init_daemon(paths)?;
    let sock = paths.admin_socket();
    // A command run without a daemon may hold the pool for a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ctl = loop {
        match Controller::open(paths, true, true) {
            Ok(c) => break c,
            Err(e) if crate::cli::locked_by(&e).is_some() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    };
    // One broken qube must not keep the others from being served: it is reported (here
    // and by `qube list`) and left for the user to shut down.
    let (resumed, broken) = ctl.resume_running();
    for name in &resumed {
        tracing::info!(qube = %name, "serving the qube's exports again");
    }
    for (name, e) in &broken {
        tracing::warn!(qube = %name, "not serving the qube: {e:#}");
    }
    // We hold the daemon lock: a socket file here is a dead daemon's.
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(paths.daemon_pid(), format!("{}\n", std::process::id()))?;
    tracing::info!(
        pid = std::process::id(),
        socket = %sock.display(),
        root = %paths.root().display(),
        "daemon serving"
    );
    let _ = STARTED.set(Instant::now());

    SERVED.store(
        ctl.served_qubes().len(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let shared: Shared = Arc::new(ctl);
    spawn_monitor(shared.clone());
    spawn_signal_handler(shared.clone(), paths.clone())?;
    // Only now: the admin socket is bound and every running qube is served again.
    if let Err(e) = crate::notify::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {} qubes",
        std::process::id(),
        resumed.len()
    )) {
        tracing::warn!("telling systemd the daemon is ready: {e}");
    }

    // The lock is held until the process exits (exit_cleanly does not return).
    let _lock = lock;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let shared = shared.clone();
        let paths = paths.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_admin(conn, &shared, &paths) {
                tracing::warn!("admin connection: {e:#}");
            }
        });
    }
    Ok(())
}

fn serve_admin(conn: UnixStream, shared: &Shared, paths: &Paths) -> Result<()> {
    let mut writer = conn.try_clone()?;
    let (line, fds) = api::read_request(&conn)?;
    if line.is_empty() {
        return Ok(());
    }
    ADMIN_REQUESTS.fetch_add(1, Ordering::Relaxed);
    let files: Vec<std::fs::File> = fds.into_iter().map(std::fs::File::from).collect();
    let reply = match api::parse_request(&line) {
        Err(e) => Reply::Error(e),
        Ok(Request::DaemonStop) => {
            let served = shared.served_qubes();
            let mut out = serde_json::to_string(&Reply::Ok(serde_json::to_value(
                crate::results::Stopping {
                    stopping: true,
                    detached: Some(served),
                },
            )?))?;
            out.push('\n');
            writer.write_all(out.as_bytes())?;
            tracing::info!("stopping on request; running qubes stay marked running");
            let _ = crate::notify::notify("STOPPING=1");
            shared.detach_all();
            exit_cleanly(paths);
        }
        // A ping is answered at once, whatever else runs: the CLI tells a busy daemon
        // from a frozen one by it.
        Ok(Request::Ping) => {
            let pong = crate::results::Pong {
                pong: true,
                protocol: Some(api::PROTOCOL),
                pid: Some(std::process::id()),
                build: Some(api::build_id().to_string()),
                served: Some(SERVED.load(std::sync::atomic::Ordering::Relaxed) as u64),
                stats: Some(shared.serving_stats()),
            };
            Reply::Ok(serde_json::to_value(pong)?)
        }
        Ok(req) => {
            let t = std::time::Instant::now();
            // The op's wire name (serialising the request costs: only when logged).
            let op = tracing::enabled!(tracing::Level::DEBUG)
                .then(|| serde_json::to_value(&req).ok())
                .flatten()
                .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
                .unwrap_or_default();
            let r = shared.handle_with(req, files);
            tracing::debug!(op = %op, took_us = t.elapsed().as_micros() as u64, "request");
            SERVED.store(
                shared.served_qubes().len(),
                std::sync::atomic::Ordering::Relaxed,
            );
            match r {
                Ok(v) => Reply::Ok(v),
                Err(e) => Reply::Error(api::ApiError::of(&e)),
            }
        }
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    writer.write_all(out.as_bytes())?;
    Ok(())
}

/// Capabilities the daemon and what it runs (xl, lvm, losetup, mount, qemu-img, QEMU
/// before it drops to its qube's user) never use: loading kernel modules, rebooting,
/// setting the clock, process accounting, the kernel log, LSM policy, audit, BPF and
/// perf, immutable files, leases, wake alarms, suspend blocking. They leave the
/// bounding set too, so no program the daemon runs (a setuid or file-capability one
/// included) gets them back. Kept: what storage, Xen and QEMU paths do need (file
/// access overrides, SYS_ADMIN for mounts/loop/device-mapper, RAWIO, NET_ADMIN for
/// vif scripts, PTRACE to read a QEMU's /proc/PID/cwd as another uid, SETUID/SETGID to
/// start QEMU as its user, IPC_LOCK for lvm, MKNOD, NICE, RESOURCE...).
pub const DROPPED_CAPABILITIES: [rustix::thread::Capability; 15] = {
    use rustix::thread::Capability as C;
    [
        C::SystemModule,
        C::SystemBoot,
        C::SystemTime,
        C::SystemProcessAccounting,
        C::SystemTTYConfig,
        C::SystemLog,
        C::MACOverride,
        C::MACAdmin,
        C::AuditControl,
        C::AuditRead,
        C::WakeAlarm,
        C::BlockSuspend,
        C::LinuxImmutable,
        C::PerformanceMonitoring,
        C::BerkeleyPacketFilters,
    ]
};

/// Drops [`DROPPED_CAPABILITIES`] from this thread's bounding, permitted, effective and
/// inheritable sets. Best effort: a kernel that lacks one (EINVAL) or a daemon without
/// CAP_SETPCAP (not root) keeps what it has, with a log line.
fn drop_capabilities() {
    use rustix::thread::{capabilities, remove_capability_from_bounding_set, set_capabilities};
    let mut mask = rustix::thread::CapabilityFlags::empty();
    for cap in DROPPED_CAPABILITIES {
        mask |= rustix::thread::CapabilityFlags::from_bits_retain(1 << (cap as u32));
        match remove_capability_from_bounding_set(cap) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => tracing::debug!("dropping {cap:?} from the bounding set: {e}"),
        }
    }
    let r = capabilities(None).and_then(|mut sets| {
        sets.effective -= mask;
        sets.permitted -= mask;
        sets.inheritable -= mask;
        set_capabilities(None, sets)
    });
    if let Err(e) = r {
        tracing::debug!("dropping unneeded capabilities: {e}");
    }
}

/// Takes `ROOT/daemon.lock` (flock, exclusive, not waiting) and writes our pid in it.
/// The kernel drops the lock when the process dies, however it dies: a daemon killed by
/// SIGKILL leaves no lock behind, only a stale socket (removed before binding).
fn take_daemon_lock(paths: &Paths) -> Result<std::fs::File> {
    use storage::dirlock::{lock_file, LockFileError};
    match lock_file(&paths.daemon_lock()) {
        Ok(f) => Ok(f),
        Err(LockFileError::Held { path, pid }) => {
            let who = pid
                .map(|p| format!("pid {p}"))
                .unwrap_or_else(|| "another process".into());
            bail!(
                "another daemon ({who}) already owns {} (it holds {}); stop it with `qubes-ctl daemon stop`{}",
                paths.root().display(),
                path.display(),
                pid.map(|p| format!(", or `kill {p}` if it does not answer"))
                    .unwrap_or_default()
            );
        }
        Err(e) => Err(e.into()),
    }
}

fn exit_cleanly(paths: &Paths) -> ! {
    let _ = std::fs::remove_file(paths.admin_socket());
    let _ = std::fs::remove_file(paths.daemon_pid());
    std::process::exit(0)
}

/// Notices guests that powered themselves off.
fn spawn_monitor(shared: Shared) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        for (name, res) in shared.reap_halted() {
            match res {
                Ok(()) => {
                    tracing::info!(qube = %name, "guest powered off; its volumes are stopped")
                }
                Err(e) => tracing::error!(
                    qube = %name,
                    "guest powered off but stopping its volumes failed: {e:#}"
                ),
            }
        }
        SERVED.store(
            shared.served_qubes().len(),
            std::sync::atomic::Ordering::Relaxed,
        );
    });
}

/// SIGTERM/SIGINT: close the exports, commit, leave running qubes marked running.
fn spawn_signal_handler(shared: Shared, paths: Paths) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping; running qubes stay marked running");
            let _ = crate::notify::notify("STOPPING=1");
            shared.detach_all();
            exit_cleanly(&paths);
        }
    });
    Ok(())
}

/// Starts a daemon in the background (its own process group, output to
/// `ROOT/run/daemon.log`) and waits until it answers.
pub fn spawn(paths: &Paths) -> Result<()> {
    paths.secure()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(paths.daemon_log())
        .with_context(|| format!("opening {}", paths.daemon_log().display()))?;
    // Where this start's lines begin, to quote its error if it exits at once.
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("locating the qubes-ctl binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(paths.root()).arg("daemon").arg("run");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting qubes-ctl daemon")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if api::daemon_alive(&paths.admin_socket(), Duration::from_secs(1)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let said = last_error_since(&paths.daemon_log(), log_start)
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            bail!(
                "the daemon exited at start ({status}){said}; see {}",
                paths.daemon_log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the daemon did not answer within 30 s; see {}",
        paths.daemon_log().display()
    )
}

/// The last `qubes-ctl: error:` line written to `log` after byte `from` (what a daemon
/// that could not start said), without the prefix.
fn last_error_since(log: &std::path::Path, from: u64) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = String::from_utf8_lossy(text.get(from as usize..)?).into_owned();
    tail.lines().rev().find_map(|l| {
        l.split_once("qubes-ctl: error: ")
            .map(|(_, e)| e.to_string())
    })
}

pub fn is_running(paths: &Paths) -> bool {
    api::daemon_alive(&paths.admin_socket(), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_could_not_start_is_quoted_from_its_own_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        let earlier = "qubes-ctl: error: an older start's failure\n";
        std::fs::write(&log, earlier).unwrap();
        let from = earlier.len() as u64;
        assert_eq!(last_error_since(&log, from), None);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "INFO opening the pool\nqubes-ctl: error: devices are suspended: x-pool-tpool; run `dmsetup resume`").unwrap();
        assert_eq!(
            last_error_since(&log, from).as_deref(),
            Some("devices are suspended: x-pool-tpool; run `dmsetup resume`")
        );
    }
}
