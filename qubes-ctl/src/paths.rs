//! Where the controller keeps things. Everything lives under one root directory
//! (`--root`, `QUBES_CTL_ROOT`; default `/var/lib/qubes-ctl` for root, else
//! `$XDG_DATA_HOME/qubes-ctl` or `~/.local/share/qubes-ctl`):
//!
//! ```text
//! ROOT/pool/                 the pool (driver files + lock)
//! ROOT/kernels/TEMPLATE/     vmlinuz, initrd.img of a template (direct kernel boot)
//! ROOT/cache/                template-builder cache (packages, built images)
//! ROOT/run/admin.sock        the daemon's admin socket (0600)
//! ROOT/run/daemon.pid|log
//! ROOT/run/qubes/QUBE/       nbd.sock (0600), console.log, qmp.sock, domain config
//! ```
//!
//! Every directory is 0700 and the pool files 0600: a qube's disk is private to the owner
//! of the root. [`Paths::secure`] creates the tree so and repairs an existing one.
//!
//! Unix socket paths are limited to 107 bytes. When `ROOT/run` is too long to hold the
//! longest socket (`run/qubes/QUBE/vif-QUBE.sock`, names of up to 31 bytes), the run
//! directory is a short one (`/run/qc-HASH`, or under `$XDG_RUNTIME_DIR` or `/tmp` for
//! other users) and `ROOT/run` is a symlink to it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Longest qube name (Qubes' limit).
pub const MAX_QUBE_NAME: usize = 31;
/// What the longest socket adds to the run directory: `/qubes/Q/vif-Q.sock`.
const LONGEST_SOCKET_SUFFIX: usize = "/qubes//vif-.sock".len() + 2 * MAX_QUBE_NAME;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Files of the pool directory that hold qube data or state.
const POOL_FILES: [&str; 4] = ["pool.data", "pool.meta", "lock", "pool.json"];

#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: PathBuf) -> Self {
        Paths { root }
    }

    /// The default root when neither `--root` nor `QUBES_CTL_ROOT` is given.
    pub fn default_root() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/qubes-ctl");
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("qubes-ctl");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".local/share/qubes-ctl")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn pool_dir(&self) -> PathBuf {
        self.root.join("pool")
    }
    pub fn kernels_dir(&self, template: &str) -> PathBuf {
        self.root.join("kernels").join(template)
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// `ROOT/run`, or a short directory when that is too long for socket paths.
    pub fn run_dir(&self) -> PathBuf {
        let long = self.root.join("run");
        if long.as_os_str().len() + LONGEST_SOCKET_SUFFIX <= MAX_SOCKET_PATH {
            return long;
        }
        // FNV-1a: stable across builds, so every qubes-ctl finds the same directory.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.root.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        let name = format!("qc-{:012x}", h >> 16);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let mut bases = Vec::new();
        if uid == 0 {
            bases.push(PathBuf::from("/run"));
        } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            bases.push(PathBuf::from(d));
        }
        bases.push(PathBuf::from("/tmp"));
        bases
            .into_iter()
            .map(|b| b.join(&name))
            .find(|d| {
                d.as_os_str().len() + LONGEST_SOCKET_SUFFIX <= MAX_SOCKET_PATH
                    && d.parent().is_some_and(Path::is_dir)
            })
            .unwrap_or_else(|| PathBuf::from("/tmp").join(name))
    }

    /// Creates the root's directories 0700 (the pool, run, cache and kernel directories)
    /// and repairs the modes of an existing tree (directories 0700, pool files 0600),
    /// warning about each repair: a pool file others can read exposes every qube's disk.
    pub fn secure(&self) -> Result<()> {
        let mut dirs = vec![
            self.root.clone(),
            self.pool_dir(),
            self.root.join("kernels"),
            self.cache_dir(),
        ];
        for d in &dirs {
            if !d.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .with_context(|| format!("creating {}", d.display()))?;
            }
        }
        let run = self.run_dir();
        let link = self.root.join("run");
        if run != link {
            self.make_short_run_dir(&run, &link)?;
        } else {
            // A `run` symlink was left by the root's earlier, longer path (the root was
            // moved or copied): its target belongs to that path. The run directory holds
            // only sockets and pids, so a real one replaces the link.
            if std::fs::symlink_metadata(&run).is_ok_and(|m| m.file_type().is_symlink()) {
                tracing::warn!(link = %run.display(), "replacing a run link left by an earlier root path");
                std::fs::remove_file(&run)
                    .with_context(|| format!("removing the stale link {}", run.display()))?;
            }
            if !run.exists() {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&run)
                    .with_context(|| format!("creating {}", run.display()))?;
            }
        }
        dirs.push(run.clone());
        dirs.push(self.pool_dir().join("vols"));
        if let Ok(rd) = std::fs::read_dir(self.root.join("kernels")) {
            dirs.extend(rd.flatten().map(|e| e.path()));
        }
        for d in dirs {
            repair_mode(&d, 0o700, 0, true);
        }
        // Qubes' QEMUs pass through `qubes/` and a netvm's run dir to their netvm's link
        // (see `Controller::open_run_dir_to`): search rights alone are no leak.
        let mut traversed = vec![run.join("qubes")];
        if let Ok(rd) = std::fs::read_dir(run.join("qubes")) {
            traversed.extend(rd.flatten().map(|e| e.path()));
        }
        for d in traversed {
            repair_mode(&d, 0o700, 0o011, true);
        }
        for f in POOL_FILES {
            repair_mode(&self.pool_dir().join(f), 0o600, 0, false);
        }
        repair_mode(&self.daemon_log(), 0o600, 0, false);
        Ok(())
    }

    /// A short run directory outside the root: ours alone (created 0700, owner checked,
    /// since `/tmp` is shared), with `ROOT/run` pointing at it.
    fn make_short_run_dir(&self, run: &Path, link: &Path) -> Result<()> {
        match std::fs::DirBuilder::new().mode(0o700).create(run) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", run.display())),
        }
        let md = std::fs::symlink_metadata(run)
            .with_context(|| format!("checking {}", run.display()))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if !md.is_dir() || md.uid() != uid {
            bail!(
                "{} (the short run directory of {}) is not a directory owned by uid {uid}; remove it",
                run.display(),
                self.root.display()
            );
        }
        // A link to another directory was made under the root's earlier path.
        let stale = std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
            && std::fs::read_link(link).is_ok_and(|t| t != run);
        if stale {
            std::fs::remove_file(link)
                .with_context(|| format!("removing the stale link {}", link.display()))?;
        }
        if std::fs::symlink_metadata(link).is_err() {
            std::os::unix::fs::symlink(run, link)
                .with_context(|| format!("linking {} to {}", link.display(), run.display()))?;
        }
        Ok(())
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir().join("admin.sock")
    }
    /// Held (flock) by the root's daemon for its whole life: one daemon per root.
    pub fn daemon_lock(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
    pub fn daemon_pid(&self) -> PathBuf {
        self.run_dir().join("daemon.pid")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.run_dir().join("daemon.log")
    }
    pub fn qube_run_dir(&self, qube: &str) -> PathBuf {
        self.run_dir().join("qubes").join(qube)
    }
    pub fn nbd_socket(&self, qube: &str) -> PathBuf {
        self.qube_run_dir(qube).join("nbd.sock")
    }
}

/// Takes group and other permissions away from `path` if it has any beyond `allowed`,
/// with a warning.
fn repair_mode(path: &Path, mode: u32, allowed: u32, dir: bool) {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() != dir || md.file_type().is_symlink() {
        return;
    }
    let have = md.permissions().mode() & 0o7777;
    if have & 0o077 & !allowed == 0 {
        return;
    }
    let mode = mode | (have & allowed);
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => eprintln!(
            "qubes-ctl: warning: {} was mode {have:o}, readable by other users; set it to {mode:o}",
            path.display()
        ),
        Err(e) => eprintln!(
            "qubes-ctl: warning: {} is mode {have:o}, readable by other users, and could not be set to {mode:o}: {e}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_stay_short_whatever_the_root() {
        let long = format!("/tmp/{}", "r".repeat(150));
        for root in ["/var/lib/qubes-ctl", "/tmp/qc1", long.as_str()] {
            let p = Paths::new(PathBuf::from(root));
            let q = "q".repeat(MAX_QUBE_NAME);
            let vif = p.qube_run_dir(&q).join(format!("vif-{q}.sock"));
            assert!(
                vif.as_os_str().len() <= MAX_SOCKET_PATH,
                "{}",
                vif.display()
            );
        }
        assert_eq!(
            Paths::new("/var/lib/qubes-ctl".into()).run_dir(),
            PathBuf::from("/var/lib/qubes-ctl/run")
        );
    }
}
