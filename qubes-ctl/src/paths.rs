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

use std::path::{Path, PathBuf};

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
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir().join("admin.sock")
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
